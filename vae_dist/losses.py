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

from vae_dist.likelihoods import PixelLikelihood, gaussian_nll

PROB_EPS = 1e-7  # float32 sigmoid reaches exactly 1.0 near logit 17; keeps log(1 - p) finite


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def gaussian_kl(q_mean, q_log_std, p_mean, p_log_std) -> torch.Tensor:
    """KL(N(q_mean, q_std^2) || N(p_mean, p_std^2)) per element, in closed form:
    log(p_std / q_std) + (q_std^2 + (q_mean - p_mean)^2) / (2 p_std^2) - 1/2."""
    return (
        p_log_std
        - q_log_std
        + 0.5 * (torch.exp(2 * (q_log_std - p_log_std)) + ((q_mean - p_mean) * torch.exp(-p_log_std)).pow(2))
        - 0.5
    )


def reconstruction_nll(out: torch.Tensor, x: torch.Tensor, likelihood: str | PixelLikelihood) -> torch.Tensor:
    """-log p(x|z) per image, summed over pixels (vae_dist.likelihoods).

    bernoulli: p(x|z) = prod Bernoulli(sigmoid(logits)), evaluated stably from logits (x may be
    grey levels in [0, 1], the usual continuous relaxation).
    gaussian: N(x; sigmoid(logits), 1/2) per pixel, i.e. the squared error plus its constant, so
    that it too is a log-likelihood in nats.
    dlm: the mass the discretised mixture of logistics gives the 8-bit values (vae_dist.dlm).
    """
    return PixelLikelihood.of(likelihood, x.shape[1]).nll(out, x)


def reconstruction_nll_from_mean(x_mean: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The same -log p(x|z) per image, in float64, from the decoder's mean sigmoid(logits) instead
    of its logits: what an exported decoder returns (bernoulli and gaussian). Bernoulli
    probabilities are clipped to [PROB_EPS, 1 - PROB_EPS]."""
    p, x = x_mean.double().flatten(1), x.double().flatten(1)
    if likelihood == "bernoulli":
        p = p.clamp(PROB_EPS, 1.0 - PROB_EPS)
        nll = -(x * torch.log(p) + (1.0 - x) * torch.log1p(-p))
    elif likelihood == "gaussian":
        nll = gaussian_nll(p, x)
    else:
        raise ValueError(f"no -log p(x|z) from the mean alone for the likelihood {likelihood!r}")
    return nll.sum(dim=1)


def log_likelihood_samples(out: torch.Tensor, x: torch.Tensor, likelihood: str | PixelLikelihood) -> torch.Tensor:
    """log p(x|z) of each image under each of its S latents: `out` [B, S, P, H, W] decoded from
    them, `x` [B, C, H, W]; returns [B, S]. The same value as `-reconstruction_nll`, computed
    without copying x S times where the likelihood allows."""
    return PixelLikelihood.of(likelihood, x.shape[1]).log_prob_samples(out, x)


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
    out: torch.Tensor,
    x: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 1.0,
    likelihood: str | PixelLikelihood = "bernoulli",
) -> ElboTerms:
    """The terms of a model's forward (decoder output, KL per image). Losses are computed in
    float32 even under mixed precision: sums over thousands of pixels lose too much in half
    precision."""
    recon = reconstruction_nll(out, x, likelihood)
    kl = kl.float()
    return ElboTerms(loss=recon + beta * kl, recon=recon, kl=kl)


def neg_elbo_from_mean(
    x_mean: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """Per-image -ELBO in float64 from the decoder's mean (see `reconstruction_nll_from_mean`)."""
    return reconstruction_nll_from_mean(x_mean, x, likelihood) + kl_to_standard_normal(mu.double(), logvar.double())


def bits_per_dim(nats: float, dims: int) -> float:
    """Nats per image -> bits per dimension (sub-pixel)."""
    return nats / (dims * math.log(2))


def kl_weight(beta: float, warmup_steps: int, step: int) -> float:
    """Linear KL warm-up: beta * min(1, step / warmup_steps); plain beta without warm-up."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
