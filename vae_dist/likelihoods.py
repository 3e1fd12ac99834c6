"""p(x|z): what a decoder's output means, for each likelihood of vae_dist.kinds.LIKELIHOODS.

A decoder returns `out` [B, P, H, W]: for `bernoulli` and `gaussian` P = C logits (the mean is
sigmoid(logits)); for `dlm` P = dlm.parameter_count(C, mixtures) mixture parameters. Everything
that turns that output into a figure or a picture goes through `PixelLikelihood`: -log p(x|z) per
image (training, evaluation), the same for many latents of each image (the importance-weighted
estimate), and the image to show (grids, the Python API).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae_dist import dlm
from vae_dist.kinds import LIKELIHOODS
from vae_dist.record import ModelRecord

logger = logging.getLogger(__name__)

GAUSSIAN_VARIANCE = 0.5  # N(x; mean, 1/2): -log p is then the squared error plus a constant
DEFAULT_MIXTURES = 10  # loss.mixtures, as PixelCNN++ and VDVAE


@dataclass(frozen=True)
class PixelLikelihood:
    name: str  # loss.likelihood
    channels: int  # the images' C
    mixtures: int = DEFAULT_MIXTURES  # dlm only
    compiled: bool = False  # dlm only: nll through torch.compile (loss.compile)

    def __post_init__(self):
        if self.name not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.name!r}; expected one of {tuple(LIKELIHOODS)}")
        if self.name == "dlm":
            dlm.parameter_count(self.channels, self.mixtures)  # grey or RGB images only

    @classmethod
    def of(cls, likelihood: str | PixelLikelihood, channels: int) -> PixelLikelihood:
        """`likelihood` as given, or the named one for images of `channels` channels."""
        return likelihood if isinstance(likelihood, PixelLikelihood) else cls(likelihood, channels)

    @classmethod
    def of_record(cls, record: ModelRecord) -> PixelLikelihood:
        """The likelihood a model file's record names, for its images."""
        return cls(record.likelihood, record.image_shape[0], record.mixtures)

    @property
    def out_channels(self) -> int:
        """Channels of the decoder's output per pixel."""
        if self.name == "dlm":
            return dlm.parameter_count(self.channels, self.mixtures)
        return self.channels

    def discrete(self, binarize: str) -> bool:
        """Whether -log p(x|z) is a probability mass of the data the run is evaluated on, so that
        its -ELBO in bits per dimension is a true figure: the mixture of logistics on 8-bit images,
        the Bernoulli on binarised ones. (On grey levels the Bernoulli is not a likelihood of the
        data, and the Gaussian is a density.)"""
        return self.name == "dlm" or (self.name == "bernoulli" and binarize == "dynamic")

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image [B], summed over sub-pixels; float32 at least (sums over
        thousands of sub-pixels lose too much in half precision)."""
        self._check(out)
        out = out if out.dtype == torch.float64 else out.float()
        if self.name == "dlm":
            return -(fused_dlm_log_prob if self.compiled else dlm.log_prob)(out, x, self.mixtures)
        x = x.to(out.dtype)
        if self.name == "bernoulli":  # evaluated stably from the logits; x may be grey levels in [0, 1]
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:
            nll = gaussian_nll(torch.sigmoid(out), x)
        return nll.flatten(1).sum(dim=1)

    def log_prob_samples(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) of each image under each of its S latents: `out` [B, S, P, H, W] decoded from
        them, `x` [B, C, H, W]; returns [B, S], the same values as -nll."""
        self._check(out)
        b, s = out.shape[:2]
        if self.name == "dlm":
            images = x[:, None].expand(b, s, *x.shape[1:]).flatten(0, 1)
            return dlm.log_prob(out.flatten(0, 1), images, self.mixtures).view(b, s)
        logits = out.float().flatten(2)  # [B, S, D]
        x = x.to(logits.dtype).flatten(1)  # [B, D]
        if self.name == "bernoulli":  # BCE with logits is softplus(l) - x l: sum_d x_d l_d as one matrix product
            return torch.bmm(logits, x[:, :, None])[:, :, 0] - F.softplus(logits).sum(2)
        return -gaussian_nll(torch.sigmoid(logits), x[:, None]).sum(2)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The image to show, float [B, C, H, W] in [0, 1]: the likelihood's mean."""
        self._check(out)
        if self.name == "dlm":
            return dlm.mean_image(out, self.channels, self.mixtures)
        return torch.sigmoid(out)

    def _check(self, out: torch.Tensor) -> None:
        if out.ndim >= 4 and out.shape[-3] != self.out_channels:  # images [..., P, H, W]
            raise ValueError(
                f"a {self.name} likelihood of {self.channels}-channel images takes {self.out_channels} decoder "
                f"channels per pixel, got {out.shape[-3]}"
            )


def gaussian_nll(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, GAUSSIAN_VARIANCE) per element."""
    return (mean - x).pow(2) / (2 * GAUSSIAN_VARIANCE) + 0.5 * math.log(2 * math.pi * GAUSSIAN_VARIANCE)


_FUSED: dict[str, object] = {}


def fused_dlm_log_prob(params: torch.Tensor, x: torch.Tensor, mixtures: int) -> torch.Tensor:
    """dlm.log_prob through torch.compile (`loss.compile`): its forward and backward each become a
    few fused loops instead of dozens of passes over [B, C, M, H, W] tensors (about 3x faster on 2
    CPU cores, docs/benchmarks.md#the-hierarchical-vaes). The first call compiles (about 45 s on 2
    cores; cached on disk for later processes), with the batch size dynamic. Where it cannot
    compile (no C++ compiler, say), one warning and the plain function from then on."""
    fn = _FUSED.get("dlm")
    if fn is None:
        logger.info("loss.compile: compiling the mixture of logistics (about a minute the first time)")
        fn = _FUSED["dlm"] = torch.compile(dlm.log_prob, dynamic=True)
    try:
        return fn(params, x, mixtures)
    except Exception as e:  # torch's compile errors have no common base class
        if fn is dlm.log_prob:
            raise
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.warning("loss.compile: torch.compile failed (%s); the likelihood runs uncompiled", first_line)
        _FUSED["dlm"] = dlm.log_prob
        return dlm.log_prob(params, x, mixtures)
