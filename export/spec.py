"""What gets exported, kept apart from how: one `SubModelSpec` per ONNX file.

A spec names the graph's inputs and outputs, marks the dynamic batch axis, says how to wrap the
VAE into the module that is traced, how to make example inputs, and how close onnxruntime must
come to torch. The exporter (export.convert) and the verifier (export.verify) only read specs.
The metadata every file carries is declared here once (METADATA_KEYS, `onnx_metadata`).

The contract seen by a consumer such as export/sample.py:

    encoder.onnx   x  float32 [batch, C, H, W] in [0, 1]  ->  mu, logvar  float32 [batch, latent]
    decoder.onnx   z  float32 [batch, latent]             ->  x_mean      float32 [batch, C, H, W] in [0, 1]

Neither graph draws noise: the host samples z = mu + exp(logvar / 2) * eps itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vae_dist.models import VAE
from vae_dist.record import ModelRecord
from vae_dist.runs import MANIFEST_FILE, ONNX_DIR  # noqa: F401  (re-exported for the export package)

ONNX_FORMAT = "vae-dist-onnx/1"  # metadata "format"; bump when the contract above changes
MANIFEST_FORMAT = "vae-dist-onnx-manifest/1"
# ONNX_DIR and MANIFEST_FILE: where an export lives in a run folder (vae_dist.runs owns the layout)
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
# ONNX and torch -ELBO on the test split must agree within ELBO_TOL nats per image of ELBO_TOL_PIXELS
# pixels (one 28x28 image), scaled by the images' size: the decoder's float32 probabilities round
# differently in onnxruntime and torch near 0 and 1, and those differences add up over the pixels.
ELBO_TOL = 0.01
ELBO_TOL_PIXELS = 784


def nats_for_image(nats: float, image_shape) -> float:
    """A tolerance or budget of `nats` per ELBO_TOL_PIXELS pixels of -ELBO, for one image of
    `image_shape` (C, H, W); never less than `nats`."""
    return nats * max(1.0, math.prod(image_shape) / ELBO_TOL_PIXELS)
BATCH_AXIS = "batch"
# torch.export specialises sizes 0 and 1, so the example batch must be larger for the batch
# axis to stay symbolic.
TRACE_BATCH = 2

# Operators that draw random numbers. The host owns the noise, so none may appear in a graph.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

# metadata_props keys written into every file (values are strings; JSON for lists). The first
# IDENTITY_KEYS say what the file is; a file must carry them to be used for a model.
IDENTITY_KEYS = ("format", "role", "model_kind", "latent_dim", "image_shape")
METADATA_KEYS = (
    *IDENTITY_KEYS,
    "dataset",
    "fit",
    "likelihood",
    "opset",
    "test_neg_elbo",
    "torch_version",
    "onnx_version",
    "vae_dist_version",
)
VARIANT_KEY = "variant"  # added to the files of an edge variant (export.variants), e.g. "int8-static"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name and dimensions, `BATCH_AXIS` marking the dynamic one."""

    name: str
    dims: tuple[int | str, ...]

    def shape_for(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH_AXIS else d for d in self.dims)


@dataclass(frozen=True)
class SubModelSpec:
    role: str  # "encoder" | "decoder", also the file stem and the "role" metadata
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float
    wrap: Callable[[VAE], nn.Module]
    # File name after the role: ".onnx" for the fp32 export, e.g. ".int8-dynamic.onnx" or ".ort"
    # for an edge variant (export.variants), which keeps the same inputs and outputs.
    suffix: str = ".onnx"

    @property
    def filename(self) -> str:
        return f"{self.role}{self.suffix}"

    def with_file(self, suffix: str, atol: float) -> SubModelSpec:
        """The same contract in another file, checked against its own tolerance."""
        return replace(self, suffix=suffix, atol=atol)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def example_inputs(self, batch: int = TRACE_BATCH) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing; values only need the right shape and range."""
        g = torch.Generator().manual_seed(0)
        return tuple(torch.rand(t.shape_for(batch), generator=g) for t in self.inputs)

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """torch.export's form of the dynamic axes, keyed by the wrapper's argument names."""
        batch = torch.export.Dim(BATCH_AXIS)
        return {t.name: {i: batch for i, d in enumerate(t.dims) if d == BATCH_AXIS} for t in self.inputs}


class EncoderGraph(nn.Module):
    """x -> (mu, logvar). The argument is named like the graph input."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x)


class DecoderGraph(nn.Module):
    """z -> x_mean = sigmoid(logits): the mean of the Bernoulli (or of the Gaussian) likelihood."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.vae.decode(z))


def vae_specs(model: VAE, atol: float | None = None) -> tuple[SubModelSpec, SubModelSpec]:
    """The encoder and decoder specs for `model`; `atol` overrides every sub-model's tolerance."""
    image = (BATCH_AXIS, *model.image_shape)
    latent = (BATCH_AXIS, model.latent_dim)
    encoder = SubModelSpec(
        role="encoder",
        inputs=(TensorSpec("x", image),),
        outputs=(TensorSpec("mu", latent), TensorSpec("logvar", latent)),
        atol=DEFAULT_ATOL if atol is None else atol,
        wrap=EncoderGraph,
    )
    decoder = SubModelSpec(
        role="decoder",
        inputs=(TensorSpec("z", latent),),
        outputs=(TensorSpec("x_mean", image),),
        atol=DEFAULT_ATOL if atol is None else atol,
        wrap=DecoderGraph,
    )
    return encoder, decoder


def onnx_metadata(
    spec: SubModelSpec, record: ModelRecord, opset: int, versions: dict[str, str]
) -> dict[str, str]:
    """metadata_props for one file, from the run's model metadata (see vae_dist.artifacts)."""
    neg_elbo = record.test_neg_elbo
    values = {
        **identity_metadata(spec.role, record),
        "dataset": record.dataset or "",
        # how the dataset's images were made rows (vae-dist prepare); the sampler fits new images the same way
        "fit": json.dumps(record.fit, sort_keys=True),
        "likelihood": record.likelihood,
        "opset": str(opset),
        "test_neg_elbo": "" if neg_elbo is None else repr(float(neg_elbo)),
        "torch_version": versions["torch"],
        "onnx_version": versions["onnx"],
        "vae_dist_version": versions["vae_dist"],
    }
    return {k: values[k] for k in METADATA_KEYS}


def identity_metadata(role: str, record: ModelRecord) -> dict[str, str]:
    """The IDENTITY_KEYS values of a file describing the model of `record` in `role`."""
    return {
        "format": ONNX_FORMAT,
        "role": role,
        "model_kind": record.kind,
        "latent_dim": str(record.latent_dim),
        "image_shape": json.dumps(list(record.image_shape)),
    }
