"""The deep hierarchical VAE (`model.kind: hierarchical`), after VDVAE (Child 2021) and NVAE (Vahdat &
Kautz 2020), sized by two block layouts (vae_dist.layout) and `model.width`.

Bottom-up, a residual encoder keeps its activations at each resolution. Top-down, the decoder runs
one block per latent group, from the lowest resolution to the image's: from its state h one block
gives the group's prior p(z | groups above) = N(pm, ps^2) and an update of h, another gives the
posterior q(z | x, groups above) = N(qm, qs^2) from h and the encoder's activations at that
resolution; z (from q in training, from p when sampling, every ps times the temperature) is
projected onto h, and a residual block follows. At a new resolution h is upsampled (nearest) and a
learned map is added. The decoder's state at the image's resolution gives the likelihood's
parameters through a 1x1 convolution. Each group's KL is in closed form, summed over groups.

Every block is a residual bottleneck: 1x1, 3x3, 3x3, 1x1 convolutions, each after a SiLU (1x1
throughout on maps of 2 pixels or less), `model.bottleneck` times `model.width` channels inside.
The last convolution of each residual branch starts scaled by 1/sqrt(blocks) and the prior's last
convolution at zero, so that a deep stack starts near the identity with the prior N(0, I).

Noise: one flat vector per image, eps [B, latent_dim]: the groups' noises in top-down order, each
[latent_channels, h, w] in C order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vae_dist import layout
from vae_dist.config import ModelConfig
from vae_dist.interface import VAE
from vae_dist.losses import gaussian_kl


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one batched matrix product over the pixels: on the CPU its forward and
    backward take 0.6-0.9 of oneDNN's convolution's time, which reorders NCHW maps into its
    blocked layout and back (docs/benchmarks.md#the-hierarchical-vaes)."""
    b, c, h, w = x.shape
    weight = weight.view(1, weight.shape[0], c).expand(b, -1, -1)
    flat = x.reshape(b, c, h * w)
    out = torch.bmm(weight, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, flat)
    return out.view(b, -1, h, w)


def _apply(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return pointwise(x, conv.weight, conv.bias) if conv.kernel_size == (1, 1) else conv(x)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int, small: bool, residual: bool, last_scale: float = 1.0):
        super().__init__()
        k = 1 if small else 3
        self.convs = nn.ModuleList(
            [_conv(c_in, c_mid, 1), _conv(c_mid, c_mid, k), _conv(c_mid, c_mid, k), _conv(c_mid, c_out, 1)]
        )
        with torch.no_grad():
            self.convs[-1].weight.mul_(last_scale)
            if last_scale == 0:
                self.convs[-1].bias.zero_()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, _apply(self.convs[0], F.silu(x)))

    def finish(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The branch from its first convolution's output h on, plus the residual x."""
        for conv in self.convs[1:]:
            h = _apply(conv, F.silu(h))
        return x + h if self.residual else h


class Group(nn.Module):
    """One decoder block: a latent group's prior and posterior, then a residual block."""

    def __init__(self, width: int, mid: int, zdim: int, small: bool, scale: float):
        super().__init__()
        self.zdim, self.width = zdim, width
        self.prior = Bottleneck(width, mid, 2 * zdim + width, small, residual=False, last_scale=0.0)
        self.posterior = Bottleneck(2 * width, mid, 2 * zdim, small, residual=False)
        self.z_in = nn.Conv2d(zdim, width, 1)
        with torch.no_grad():
            self.z_in.weight.mul_(scale)
        self.block = Bottleneck(width, mid, width, small, residual=True, last_scale=scale)

    def first_convs(self, silu_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's first convolution and the posterior's share of its own on the state (both
        read silu(x)) as one convolution: the posterior's input is [x, encoder activations], so its
        first convolution is the sum of one on each (`HierarchicalVAE._encoder_terms`)."""
        prior, posterior = self.prior.convs[0], self.posterior.convs[0]
        weight = torch.cat([prior.weight, posterior.weight[:, : self.width]])
        out = pointwise(silu_x, weight, torch.cat([prior.bias, posterior.bias]))
        return out.split([prior.out_channels, posterior.out_channels], dim=1)


@dataclass
class TopDown:
    """One top-down pass: the decoder's output and, along the posterior, the KL per image (float32)
    and log p(z) - log q(z|x) at the drawn z (float64), summed over groups."""

    out: torch.Tensor
    kl: torch.Tensor | None = None
    log_ratio: torch.Tensor | None = None


class HierarchicalVAE(VAE):
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        encoder_blocks: list[tuple[int, int]],
        decoder_blocks: list[tuple[int, int]],
        width: int,
        latent_channels: int,
        bottleneck: float,
        out_channels: int,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.out_channels, self.width = out_channels, width
        self.sizes = layout.sizes(encoder_blocks, decoder_blocks, self.image_shape)
        mid = max(1, round(width * bottleneck))
        small = {r: min(hw) <= 2 for r, hw in self.sizes.items()}

        self.down_resolutions = [r for r, _ in encoder_blocks]
        enc_scale = 1 / math.sqrt(sum(n for _, n in encoder_blocks))
        self.stem = _conv(image_shape[0], width, 3)
        self.down = nn.ModuleList(
            nn.Sequential(*[Bottleneck(width, mid, width, small[r], True, enc_scale) for _ in range(n)])
            for r, n in encoder_blocks
        )

        self.group_resolutions = [r for r, n in decoder_blocks for _ in range(n)]
        dec_scale = 1 / math.sqrt(len(self.group_resolutions))
        self.groups = nn.ModuleList(
            Group(width, mid, latent_channels, small[r], dec_scale) for r in self.group_resolutions
        )
        self.start = nn.ParameterDict(
            {str(r): nn.Parameter(torch.zeros(1, width, *self.sizes[r])) for r, _ in decoder_blocks}
        )
        self.head = nn.Conv2d(width, out_channels, 1)
        self.group_shapes = [(latent_channels, *self.sizes[r]) for r in self.group_resolutions]
        self.latent_dim = sum(math.prod(s) for s in self.group_shapes)

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_shape, out_channels: int) -> HierarchicalVAE:
        encoder = layout.parse("model.encoder_blocks", cfg.encoder_blocks)
        decoder = layout.parse("model.decoder_blocks", cfg.decoder_blocks)
        layout.check(encoder, decoder)
        return cls(image_shape, encoder, decoder, cfg.width, cfg.latent_channels, cfg.bottleneck, out_channels)

    @property
    def floats_per_latent(self) -> int:
        return max(2 * self.width, self.out_channels) * math.prod(self.image_shape[1:])

    # ------------------------------------------------------------ the interface

    def forward(self, x, eps=None):
        if eps is None:
            eps = torch.randn(x.shape[0], self.latent_dim, device=x.device)
        result = self._top_down(self._encoder_terms(x), eps, "posterior")
        return result.out, result.kl

    def importance(self, x, eps):
        b, s = eps.shape[:2]
        terms = [t[:, None].expand(b, s, *t.shape[1:]).flatten(0, 1) for t in self._encoder_terms(x)]
        result = self._top_down(terms, eps.flatten(0, 1), "posterior", log_ratio=True)
        out = result.out
        return out.view(b, s, *out.shape[1:]), result.log_ratio.view(b, s), result.kl.view(b, s)[:, 0].double()

    def sample(self, eps, temperature=1.0):
        return self._top_down(None, eps, "prior", temperature=temperature).out

    def reconstruct(self, x):
        return self._top_down(self._encoder_terms(x), None, "mean").out

    # ------------------------------------------------------------ the two passes

    def _activations(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The encoder's output at each resolution."""
        h = self.stem(x * 2 - 1)
        acts = {}
        for i, (r, stage) in enumerate(zip(self.down_resolutions, self.down)):
            h = stage(h)
            acts[r] = h
            if i + 1 < len(self.down):
                (h0, w0), (h1, w1) = self.sizes[r], self.sizes[self.down_resolutions[i + 1]]
                h = F.avg_pool2d(h, (h0 // h1, w0 // w1))
        return acts

    def _encoder_terms(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per group, in top-down order, the posterior's first convolution on the encoder's
        activations at the group's resolution (without its bias, which `Group.first_convs` adds):
        one convolution per resolution for all of its groups, so that the activations' SiLU is
        taken once and no [state, activations] concatenation is made."""
        acts, terms = self._activations(x), []
        for r in dict.fromkeys(self.group_resolutions):
            groups = [g for g, at in zip(self.groups, self.group_resolutions) if at == r]
            weight = torch.cat([g.posterior.convs[0].weight[:, g.width :] for g in groups])
            terms += pointwise(F.silu(acts[r]), weight, None).split(groups[0].posterior.convs[0].out_channels, dim=1)
        return terms

    def _top_down(
        self,
        terms: list[torch.Tensor] | None,
        eps: torch.Tensor | None,
        mode: str,
        temperature: float = 1.0,
        log_ratio: bool = False,
    ) -> TopDown:
        """mode: "posterior" (z from q with `eps`), "mean" (z = q's mean) or "prior" (z from p with
        `eps`, its scales times `temperature`)."""
        batch = (eps if eps is not None else terms[0]).shape[0]
        noises = eps.split([math.prod(s) for s in self.group_shapes], dim=1) if eps is not None else None
        x, here = None, None
        kl = torch.zeros(batch, device=self.head.weight.device)
        ratio = torch.zeros(batch, dtype=torch.float64, device=self.head.weight.device) if log_ratio else None
        for i, (r, group) in enumerate(zip(self.group_resolutions, self.groups)):
            if r != here:
                start = self.start[str(r)]
                x = start.expand(batch, -1, -1, -1) if x is None else F.interpolate(x, size=self.sizes[r]) + start
                here = r
            silu_x = F.silu(x)
            if mode == "prior":
                p_first, q_first = _apply(group.prior.convs[0], silu_x), None
            else:
                p_first, q_first = group.first_convs(silu_x)
            p_mean, p_log_std, update = group.prior.finish(x, p_first).split([group.zdim, group.zdim, group.width], 1)
            noise = noises[i].view(batch, *self.group_shapes[i]) if noises is not None else None
            if mode == "prior":
                z = p_mean + torch.exp(p_log_std) * (noise * temperature).to(p_mean.dtype)
            else:
                q_mean, q_log_std = group.posterior.finish(x, q_first + terms[i]).chunk(2, dim=1)
                z = q_mean if mode == "mean" else q_mean + torch.exp(q_log_std) * noise.to(q_mean.dtype)
                pm, pl, qm, ql = p_mean.float(), p_log_std.float(), q_mean.float(), q_log_std.float()
                kl = kl + gaussian_kl(qm, ql, pm, pl).flatten(1).sum(1)
                if ratio is not None:  # log N(z; pm, ps) - log N(z; qm, qs); z = qm + qs * noise
                    zf = z.float()
                    log_pq = 0.5 * noise.float().pow(2) + ql - pl - 0.5 * ((zf - pm) * torch.exp(-pl)).pow(2)
                    ratio = ratio + log_pq.flatten(1).double().sum(1)
            x = group.block(x + update + _apply(group.z_in, z))
        with torch.autocast(x.device.type, enabled=False):  # the likelihood's parameters in float32 (bf16
            out = _apply(self.head, x.float())  # spaces its values near 1 by half a bin of an 8-bit image)
        return TopDown(out, kl if mode != "prior" else None, ratio)
