"""The model kinds and how each is built. The two flat VAEs map images in [0, 1] of shape
(C, H, W) to a diagonal Gaussian q(z|x) over one latent vector with the prior N(0, I), and latents
back to the decoder's output per pixel:

    encode(x) -> (mu, logvar)      decode(z) -> out

which gives them the whole interface of vae_dist.interface (and the export its two graphs). The
hierarchical VAE is vae_dist.hierarchical's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vae_dist.config import ModelConfig
from vae_dist.hierarchical import HierarchicalVAE
from vae_dist.interface import VAE
from vae_dist.losses import kl_to_standard_normal


class FlatVAE(VAE):
    """One latent vector per image with the prior N(0, I): `encode` and `decode` (the export's two
    graphs) give the whole interface."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): its mean and log-variance, [B, latent_dim] each."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # z = mu + sigma * eps (Kingma & Welling 2013, eq. 10)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x, eps=None):
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = self.reparameterize(mu, logvar, eps.to(mu.dtype))
        return self.decode(z), kl_to_standard_normal(mu.float(), logvar.float())

    def importance(self, x, eps):
        b, s = eps.shape[:2]
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu[:, None] + std[:, None] * eps.to(mu.dtype)  # [B, S, latent]
        out = self.decode(z.flatten(0, 1))
        # log p(z) - log q(z|x) at z = mu + std * eps: the 2 pi terms cancel, (z - mu)^2 / std^2 = eps^2
        log_ratio = 0.5 * (eps.double().pow(2) - z.double().pow(2)).sum(2) + 0.5 * logvar.double().sum(1)[:, None]
        return out.view(b, s, *out.shape[1:]), log_ratio, kl_to_standard_normal(mu.double(), logvar.double())

    def sample(self, eps, temperature=1.0):
        return self.decode(eps * temperature)

    def reconstruct(self, x):
        return self.decode(self.encode(x)[0])


class LinearVAE(FlatVAE):
    """MLP VAE; with hidden_dims=[400] and latent_dim=20 it is the classic 784-400-20 model."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, hidden_dims: list[int], out_channels: int):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_dim, self.out_channels = latent_dim, out_channels
        n_pixels = math.prod(self.image_shape)
        n_out = out_channels * math.prod(self.image_shape[1:])
        widths = [n_pixels, *hidden_dims]
        self.encoder = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        # mu and logvar come from one layer: a single matmul instead of two.
        self.to_stats = nn.Linear(widths[-1], 2 * latent_dim)
        back = [latent_dim, *reversed(hidden_dims)]
        self.decoder = nn.Sequential(
            *[m for a, b in zip(back, back[1:]) for m in (nn.Linear(a, b), nn.ReLU())],
            nn.Linear(back[-1], n_out),
        )

    def encode(self, x):
        mu, logvar = self.to_stats(self.encoder(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.decoder(z).view(-1, self.out_channels, *self.image_shape[1:])


class ConvVAE(FlatVAE):
    """Stride-2 3x3 convolutions down, a linear bottleneck, and back up in as many stages.

    Each down stage halves H and W (rounding up); the decoder mirrors the exact sizes, so odd
    sizes such as 28 -> 14 -> 7 -> 4 come back to 28. Up, `upsample` picks either 3x3 stride-2
    transposed convolutions (`output_padding` gives the odd sizes) or a nearest-neighbour resize
    to the stage's size followed by a 3x3 convolution: every output pixel then sees the same number
    of weights, which avoids the checkerboard pattern transposed convolutions leave on large images.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: list[int],
        hidden_dims: list[int],
        upsample: str = "transposed",
        out_channels: int = 0,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.out_channels = out_channels or image_shape[0]
        c_in, h, w = self.image_shape
        sizes = [(h, w)]
        for _ in channels:
            h, w = (h + 1) // 2, (w + 1) // 2
            sizes.append((h, w))
        self.feature_shape = (channels[-1], h, w)
        flat = math.prod(self.feature_shape)

        down, c = [], c_in
        for c_out in channels:
            down += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.ReLU()]
            c = c_out
        widths = [flat, *hidden_dims]
        fc = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.encoder = nn.Sequential(*down, nn.Flatten(), *fc)
        self.to_stats = nn.Linear(widths[-1], 2 * latent_dim)

        back = [latent_dim, *reversed(hidden_dims), flat]
        self.from_latent = nn.Sequential(*[m for a, b in zip(back, back[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        up = []
        outs = list(reversed(channels[:-1])) + [self.out_channels]
        for i, c_out in enumerate(outs):
            (h_small, w_small), (h_big, w_big) = sizes[-1 - i], sizes[-2 - i]
            if upsample == "nearest":
                up += [nn.Upsample(size=(h_big, w_big), mode="nearest"), nn.Conv2d(c, c_out, 3, padding=1)]
            elif upsample == "transposed4":  # an odd size: one more pixel of padding, one of output padding
                pad = (h_big % 2, w_big % 2)
                padding = (1 + pad[0], 1 + pad[1])
                up.append(nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=padding, output_padding=pad))
            else:
                pad = (h_big - (2 * h_small - 1), w_big - (2 * w_small - 1))
                up.append(nn.ConvTranspose2d(c, c_out, 3, stride=2, padding=1, output_padding=pad))
            if i < len(outs) - 1:
                up.append(nn.ReLU())
            c = c_out
        self.decoder = nn.Sequential(*up)

    def encode(self, x):
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.decoder(self.from_latent(z).view(-1, *self.feature_shape))


# How each kind of vae_dist.kinds.MODEL_KINDS is built, for images of a shape and a decoder output of
# so many channels per pixel (tests/test_models.py checks there is one per kind).
BUILDERS: dict[str, Callable[[ModelConfig, tuple[int, int, int], int], VAE]] = {
    "linear": lambda cfg, shape, out: LinearVAE(shape, cfg.latent_dim, cfg.hidden_dims, out),
    "conv": lambda cfg, shape, out: ConvVAE(shape, cfg.latent_dim, cfg.channels, cfg.hidden_dims, cfg.upsample, out),
    "hierarchical": lambda cfg, shape, out: HierarchicalVAE.from_config(cfg, shape, out),
}


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], out_channels: int | None = None) -> VAE:
    """The model named by `cfg.kind`, sized for images of `image_shape` (C, H, W) and a decoder output
    of `out_channels` per pixel (vae_dist.likelihoods.PixelLikelihood.out_channels; default C)."""
    return BUILDERS[cfg.kind](cfg, tuple(image_shape), out_channels or image_shape[0])
