"""The negative ELBO, per image, in nats.

-ELBO(x) = -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I))

The reconstruction term is one Monte-Carlo sample (the z drawn in `forward`); the KL term is the
closed form for diagonal Gaussians (Kingma & Welling 2013, appendix B):
    KL = -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).

Reduction rule: every function returns one value per image, and training minimises their
*mean*. Under DDP each process averages over its share of the global batch and the gradient
all-reduce averages over processes, so the gradient is the mean over the global batch no matter
how many processes there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae_dist.kinds import LIKELIHOODS

GAUSSIAN_VARIANCE = 0.5  # N(x; mean, 1/2): -log p is then the squared error plus a constant
PROB_EPS = 1e-7  # float32 sigmoid reaches exactly 1.0 near logit 17; keeps log(1 - p) finite


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x|z) per image, summed over pixels.

    bernoulli: p(x|z) = prod Bernoulli(sigmoid(logits)), evaluated stably from logits (x may be
    grey levels in [0, 1], the usual continuous relaxation).
    gaussian: N(x; sigmoid(logits), 1/2) per pixel, i.e. the squared error plus its constant, so
    that it too is a log-likelihood in nats.
    """
    x = x.to(logits.dtype)
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = _gaussian_nll(torch.sigmoid(logits), x)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {tuple(LIKELIHOODS)}")
    return nll.flatten(1).sum(dim=1)


def reconstruction_nll_from_mean(x_mean: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The same -log p(x|z) per image, in float64, from the decoder's mean sigmoid(logits) instead
    of its logits: what an exported decoder returns. Bernoulli probabilities are clipped to
    [PROB_EPS, 1 - PROB_EPS]."""
    p, x = x_mean.double().flatten(1), x.double().flatten(1)
    if likelihood == "bernoulli":
        p = p.clamp(PROB_EPS, 1.0 - PROB_EPS)
        nll = -(x * torch.log(p) + (1.0 - x) * torch.log1p(-p))
    elif likelihood == "gaussian":
        nll = _gaussian_nll(p, x)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {tuple(LIKELIHOODS)}")
    return nll.sum(dim=1)


def log_likelihood_samples(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x|z) of each image under each of its S latents: `logits` [B, S, C, H, W] decoded from
    them, `x` [B, C, H, W]; returns [B, S]. The same value as `-reconstruction_nll`, computed
    without copying x S times: BCE with logits is softplus(l) - x * l."""
    logits = logits.float().flatten(2)  # [B, S, D]
    x = x.to(logits.dtype).flatten(1)  # [B, D]
    if likelihood == "bernoulli":  # sum_d x_d l_d as one batched matrix product: no [B, S, D] temporary
        return torch.bmm(logits, x[:, :, None])[:, :, 0] - F.softplus(logits).sum(2)
    if likelihood == "gaussian":
        return -_gaussian_nll(torch.sigmoid(logits), x[:, None]).sum(2)
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {tuple(LIKELIHOODS)}")


def _gaussian_nll(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (mean - x).pow(2) / (2 * GAUSSIAN_VARIANCE) + 0.5 * math.log(2 * math.pi * GAUSSIAN_VARIANCE)


@dataclass
class ElboTerms:
    """Per-image terms; `loss` is what training averages."""

    loss: torch.Tensor  # recon + beta * kl
    recon: torch.Tensor
    kl: torch.Tensor

    def neg_elbo(self) -> torch.Tensor:
        """The true -ELBO (beta = 1), whatever beta training uses."""
        return self.recon + self.kl


def negative_elbo(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    likelihood: str = "bernoulli",
) -> ElboTerms:
    # Losses are computed in float32 even under mixed precision: sums over 784 pixels lose
    # too much in half precision.
    recon = reconstruction_nll(logits.float(), x, likelihood)
    kl = kl_to_standard_normal(mu.float(), logvar.float())
    return ElboTerms(loss=recon + beta * kl, recon=recon, kl=kl)


def neg_elbo_from_mean(
    x_mean: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """Per-image -ELBO in float64 from the decoder's mean (see `reconstruction_nll_from_mean`)."""
    return reconstruction_nll_from_mean(x_mean, x, likelihood) + kl_to_standard_normal(mu.double(), logvar.double())


def discrete(likelihood: str, binarize: str) -> bool:
    """Whether -log p(x|z) is a probability mass of the data the run is evaluated on, so that its
    -ELBO in bits per dimension is a true figure: the Bernoulli on binarised images. (On grey
    levels the Bernoulli is not a likelihood of the data, and the Gaussian is a density.)"""
    return likelihood == "bernoulli" and binarize == "dynamic"


def bits_per_dim(nats: float, dims: int) -> float:
    """Nats per image -> bits per dimension (sub-pixel)."""
    return nats / (dims * math.log(2))


def kl_weight(beta: float, warmup_steps: int, step: int) -> float:
    """Linear KL warm-up: beta * min(1, step / warmup_steps); plain beta without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
