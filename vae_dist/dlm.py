"""The discretised mixture of logistics (Salimans et al. 2017, PixelCNN++; as VDVAE uses it): a
probability mass over the 256 values of each 8-bit sub-pixel, so that -log p(x) is a true
likelihood of the data and bits per dimension are comparable with the literature.

Data: an 8-bit value k is the point 2k/255 - 1 in [-1, 1]; its bin is that point +- 1/255, the
bins of 0 and 255 reach to -infinity and +infinity. Each pixel has `mixtures` components, shared
by its channels; component i gives channel c a logistic of mean mu and scale s, and for RGB the
means are coupled as in PixelCNN++: mu_g += a * x_r, mu_b += b * x_r + c * x_g (a, b, c in
(-1, 1) by tanh), so the channels are drawn in order. Per pixel,
    p(x) = sum_i pi_i prod_c P_i,c(bin of x_c),
with P the logistic's mass of the bin, computed in closed form without cancellation:
    log(sigmoid(u) - sigmoid(v)) = u + log(-expm1(v - u)) - softplus(u) - softplus(v),  u > v.

The decoder's output per pixel, `parameter_count(channels, mixtures)` channels, in this order:
mixture logits [M], then per channel its means [M], then per channel its log-scales [M], then for
RGB the three coupling coefficients [M each] (before tanh).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_LOG_SCALE = -7.0  # as PixelCNN++: a bin is then at least e^7 / 127.5 ~ 8.6 scale units wide
HALF_BIN = 1.0 / 255.0  # half the width of a bin in [-1, 1]


def parameter_count(channels: int, mixtures: int) -> int:
    """Channels of the decoder's output per pixel: logits, means, log-scales (and RGB couplings)."""
    if channels not in (1, 3):
        raise ValueError(f"the mixture of logistics takes grey (1) or RGB (3) images, not {channels} channels")
    return mixtures * (1 + 2 * channels + (3 if channels == 3 else 0))


def split(params: torch.Tensor, channels: int, mixtures: int):
    """[B, P, H, W] -> logits [B, M, H, W], means, log-scales [B, C, M, H, W], coefficients
    [B, 3, M, H, W] (tanh applied; None for grey)."""
    b, _, h, w = params.shape
    m = mixtures
    parts = params.split([m, channels * m, channels * m] + ([3 * m] if channels == 3 else []), dim=1)
    logits = parts[0]
    means = parts[1].reshape(b, channels, m, h, w)
    log_scales = parts[2].reshape(b, channels, m, h, w).clamp(min=MIN_LOG_SCALE)
    coeffs = torch.tanh(parts[3].reshape(b, 3, m, h, w)) if channels == 3 else None
    return logits, means, log_scales, coeffs


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The means given the channels before: x [B, C, H, W] in [-1, 1]; returns [B, C, M, H, W]."""
    if coeffs is None:
        return means
    r, g = x[:, 0:1], x[:, 1:2]  # [B, 1, H, W], broadcast over the mixtures
    return torch.stack(
        [means[:, 0], means[:, 1] + coeffs[:, 0] * r, means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], dim=1
    )


def bin_log_mass(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log of the logistic's mass on the bin of x (x on the grid 2k/255 - 1; the edge bins open)."""
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + HALF_BIN)
    lower = inv_scale * (x - mean - HALF_BIN)
    # upper - lower = width / scale; log(1 - e^-width) taken as log(width) - width / 2 when the
    # bin is a sliver of the logistic (a very large scale), where e^-width rounds to 1
    log_width = math.log(2 * HALF_BIN) - log_scale
    width = torch.exp(log_width)
    log_gap = torch.where(width < 1e-4, log_width - width / 2, torch.log(-torch.expm1(-width.clamp(min=1e-4))))
    softplus_upper, softplus_lower = F.softplus(upper), F.softplus(lower)
    first = upper - softplus_upper  # log sigmoid(upper): the bin of 0 reaches to -infinity
    last = -softplus_lower  # log(1 - sigmoid(lower)): the bin of 255 reaches to +infinity
    inner = first + log_gap - softplus_lower
    return torch.where(x < -1 + HALF_BIN, first, torch.where(x > 1 - HALF_BIN, last, inner))


def log_prob(params: torch.Tensor, x: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log p(x) per image in nats: `params` [B, P, H, W] from the decoder, `x` [B, C, H, W] the
    8-bit images as k/255 (the toolkit's float images)."""
    channels = x.shape[1]
    logits, means, log_scales, coeffs = split(_at_least_float32(params), channels, mixtures)
    grid = (x.to(means.dtype) * 255).round() * (2 / 255) - 1  # exactly the bin centres
    means = coupled_means(means, coeffs, grid)
    per_component = bin_log_mass(grid[:, :, None], means, log_scales).sum(dim=1)  # [B, M, H, W]
    per_pixel = torch.logsumexp(per_component + F.log_softmax(logits, dim=1), dim=1)  # [B, H, W]
    return per_pixel.flatten(1).sum(dim=1)


def mean_image(params: torch.Tensor, channels: int, mixtures: int) -> torch.Tensor:
    """The mixture's mean image in [0, 1], for display: [B, C, H, W]. For RGB each channel's mean
    is taken given the channels before it at their means."""
    logits, means, _, coeffs = split(_at_least_float32(params), channels, mixtures)
    weights = F.softmax(logits, dim=1)  # [B, M, H, W]
    shown: list[torch.Tensor] = []  # the channels' means so far, [B, 1, H, W] each, in [-1, 1]
    for c in range(channels):
        mean_c = means[:, c]
        if coeffs is not None and c == 1:
            mean_c = mean_c + coeffs[:, 0] * shown[0]
        elif coeffs is not None and c == 2:
            mean_c = mean_c + coeffs[:, 1] * shown[0] + coeffs[:, 2] * shown[1]
        shown.append((weights * mean_c).sum(dim=1, keepdim=True).clamp(-1, 1))
    return (torch.cat(shown, dim=1) + 1) / 2


def _at_least_float32(params: torch.Tensor) -> torch.Tensor:
    """float32 under mixed precision (sums over thousands of sub-pixels), float64 kept as it is."""
    return params if params.dtype == torch.float64 else params.float()
