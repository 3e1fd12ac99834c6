"""The names a run is built from, each declared once: the model kinds and the likelihoods.

Adding a model kind or a likelihood touches these tables and its implementation (the builder in
vae_dist.models, the terms in vae_dist.losses); the configuration's choices, the model file's
checks, the benchmark, the export's variants and the parametrized tests all read the tables
(docs/training.md, "Adding a model kind"). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    name: str  # model.kind
    description: str
    config: str  # the shipped config that trains it on Fashion-MNIST (configs/NAME.yaml): benchmarks, tests
    static_int8: bool = False  # export makes an int8-static variant: calibrated activations pay off for convolutions
    exported: bool = True  # vae-dist export takes it (ONNX: encoder x -> mu, logvar; decoder z -> x_mean)


@dataclass(frozen=True)
class Likelihood:
    name: str  # loss.likelihood
    description: str
    exported: bool = True  # the exported decoder's mean gives its -log p(x|z) (docs/export.md)


MODEL_KINDS = {
    kind.name: kind
    for kind in (
        ModelKind("linear", "MLP encoder and decoder; 784-400-20 is the classic VAE", "linear"),
        ModelKind("conv", "stride-2 convolutions down, transposed (or resize) convolutions up", "conv", True),
        ModelKind(
            "hierarchical",
            "groups of latents at several resolutions, top-down, each with a learned prior (VDVAE-like)",
            "hierarchical",
            exported=False,
        ),
    )
}

LIKELIHOODS = {
    likelihood.name: likelihood
    for likelihood in (
        Likelihood("bernoulli", "Bernoulli per pixel; a likelihood of binarised images, not of grey levels"),
        Likelihood("gaussian", "N(x; mean, 1/2) per pixel: the squared error plus a constant"),
        Likelihood(
            "dlm",
            "discretised mixture of logistics over the 256 values of each sub-pixel: a likelihood of 8-bit images",
            exported=False,
        ),
    )
}
