"""The hierarchical VAE's block layouts, as the config writes them.

Comma-separated `RESOLUTIONxBLOCKS`, e.g. `model.encoder_blocks: "28x3,14x3,7x3,1x2"` (three residual blocks at
28x28, then 14x14, ...) and `model.decoder_blocks: "1x1,7x2,14x2,28x2"` (one latent group per
decoder block, top-down). A resolution is the height of the feature maps; the width follows the
image's aspect. VDVAE's published layouts are written this way with each of its pooling (`d`) and
mixing (`m`) blocks counted as a block of its resolution: its CIFAR-10 encoder
"32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3" is "32x12,16x7,8x7,4x4,1x3" here, its decoder
"1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21" is "1x1,4x3,8x6,16x11,32x22". No torch.
"""

from __future__ import annotations

import re

from vae_dist.errors import UserError

ENTRY = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
EXAMPLE = '"28x2,14x2,7x2,1x1"'


class LayoutError(UserError, ValueError):
    pass


def parse(key: str, text: str) -> list[tuple[int, int]]:
    """[(resolution, blocks), ...] in the order written; a LayoutError names `key`."""
    entries = [ENTRY.match(part) for part in text.split(",")] if text.strip() else []
    if not entries:
        raise LayoutError(f"{key} is empty: give at least one RESOLUTIONxBLOCKS entry, such as {EXAMPLE}")
    if not all(entries):
        bad = next(part for part, m in zip(text.split(","), entries) if not m)
        raise LayoutError(f"{key}: {bad.strip()!r} in {text!r} is not RESOLUTIONxBLOCKS; write the layout as {EXAMPLE}")
    layout = [(int(m.group(1)), int(m.group(2))) for m in entries]
    for resolution, blocks in layout:
        if resolution < 1 or blocks < 1:
            raise LayoutError(f"{key}: {resolution}x{blocks} needs a resolution and a block count of at least 1")
    return layout


def check(encoder: list[tuple[int, int]], decoder: list[tuple[int, int]]) -> None:
    """The two layouts fit each other (before the image size is known): the encoder goes down and
    the decoder up, one entry per resolution, and every decoder resolution finds the encoder's
    activations there."""
    down = [r for r, _ in encoder]
    up = [r for r, _ in decoder]
    if any(a <= b for a, b in zip(down, down[1:])):
        raise LayoutError(f"model.encoder_blocks: resolutions must go down, one entry each, got {down}")
    if any(a >= b for a, b in zip(up, up[1:])):
        raise LayoutError(f"model.decoder_blocks: resolutions must go up, one entry each, got {up}")
    for a, b in zip(down, down[1:]):
        if a % b:
            raise LayoutError(f"model.encoder_blocks: resolution {b} does not divide resolution {a} above it")
    if down[-1] != up[0]:
        raise LayoutError(
            f"model.decoder_blocks starts at resolution {up[0]}, but model.encoder_blocks goes down to {down[-1]}: "
            f"start the decoder at {down[-1]}, or end the encoder at {up[0]} (blocks below it would not be used)"
        )
    missing = [r for r in up if r not in down]
    if missing:
        raise LayoutError(
            f"model.decoder_blocks: resolution {missing[0]} has no encoder blocks to condition its latents on; "
            f"use resolutions of model.encoder_blocks ({', '.join(map(str, down))})"
        )


def sizes(
    encoder: list[tuple[int, int]], decoder: list[tuple[int, int]], image_shape: tuple[int, int, int]
) -> dict[int, tuple[int, int]]:
    """The feature maps' (height, width) at each resolution of the encoder, for images of
    `image_shape`: resolution r is the image scaled down by H / r, which must divide H and W. The
    encoder starts and the decoder ends at the image's own resolution."""
    _, h, w = image_shape
    for key, r in (("model.encoder_blocks starts", encoder[0][0]), ("model.decoder_blocks ends", decoder[-1][0])):
        if r != h:
            raise LayoutError(f"{key} at resolution {r}, but the images are {h} pixels high: make it {h}")
    out = {}
    for r, _ in encoder:
        factor = h // r
        if h % r or w % factor:
            raise LayoutError(
                f"model.encoder_blocks: resolution {r} does not divide the {h}x{w} images "
                f"(scaling down by {h}/{r} must leave whole pixels); choose divisors of {h}"
            )
        out[r] = (h // factor, w // factor)
    return out
