"""What every model kind is to the rest of vae-dist: one interface of four methods.

Images in [0, 1] of shape (C, H, W) go in, the decoder's output `out` [B, P, H, W] comes back
(vae_dist.likelihoods says what it means), and each image's latent noise is one flat vector of
`latent_dim` standard normals that the caller draws, so that the noise can be made independent of
the number of processes:

    forward(x, eps) -> (out, kl)                 training and the test -ELBO
    importance(x, eps) -> (out, log_ratio, kl)   the importance-weighted estimate, S latents each
    sample(eps, temperature) -> out              from the prior, every scale times the temperature
    reconstruct(x) -> out                        along the posterior's means

Training, evaluation, the grids and the Python API only ever use this interface.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class VAE(nn.Module):
    latent_dim: int  # standard normals per image: the flat noise vector eps
    image_shape: tuple[int, int, int]
    out_channels: int  # of the decoder's output per pixel

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's output at one posterior sample z(eps) of each image, and the KL of the
        posterior to the prior per image (float32 [B]; in closed form, summed over latents)."""
        raise NotImplementedError

    def importance(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For S latents of each image (`eps` [B, S, latent_dim]): the decoder's outputs
        [B, S, P, H, W], log p(z) - log q(z|x) at each latent (float64 [B, S]), and the closed-form
        KL along the first latent (float64 [B])."""
        raise NotImplementedError

    def sample(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The decoder's output for latents drawn from the prior with noise `eps` [B, latent_dim],
        the prior's scales times `temperature`."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output at the posterior's mean (every group's mean, given the groups above)."""
        raise NotImplementedError

    @property
    def floats_per_latent(self) -> int:
        """Floats of the largest tensor one latent sample of one image holds in a decoder pass:
        what the importance-weighted estimate sizes its chunks by."""
        return self.out_channels * math.prod(self.image_shape[1:])
