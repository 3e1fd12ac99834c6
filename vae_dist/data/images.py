"""One image made one array row: the conversion every image of a prepared dataset goes through
(docs/data.md). No torch; export/sample.py repeats it (`fit_pixels`), as it imports nothing of this
package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FITS = ("crop", "pad", "stretch")
BACKGROUND = 255  # transparent pixels are composited over white, and `pad` pads with white
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # a survey sees no colour in these
GREY_16_BIT = ("I", "I;16", "I;16B", "I;16L")
MAX_SIZE = 65535  # a PNG's own limit is far larger; no image a VAE trains on comes near this


@dataclass(frozen=True)
class Fit:
    """How every image is made into one array row."""

    height: int
    width: int
    channels: int  # 1 (grey) or 3 (RGB)
    policy: str  # crop | pad | stretch

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": [self.height, self.width],
            "channels": self.channels,
            "fit": self.policy,
            "background": BACKGROUND,
        }

    @classmethod
    def from_dict(cls, fit: dict[str, Any]) -> Fit:
        """The `Fit` that `to_dict` wrote (dataset.json's and the model file's "fit"), checked:
        ValueError (or KeyError, TypeError) names what is wrong."""
        (height, width), channels, policy = fit["size"], fit["channels"], fit["fit"]
        sizes = (height, width)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE for v in sizes):
            raise ValueError(f"size {list(sizes)} is not two whole numbers from 1 to {MAX_SIZE}")
        if channels not in (1, 3) or policy not in FITS:
            raise ValueError(f"channels {channels!r} or fit {policy!r} is not one of (1, 3) and {', '.join(FITS)}")
        return cls(height, width, channels, policy)


def unsupported(path: str) -> str | None:
    """Why an image file cannot be read faithfully, or None. Pillow reads a 16-bit grey PNG with
    transparency (colour type 4, bit depth 16) as the low byte of each value, which is noise; such
    files are refused rather than turned into it."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24:26] == b"\x10\x04":
        return "a 16-bit grey PNG with transparency, which Pillow cannot read faithfully; save it with 8 bits"
    return None


def _eight_bit(image):
    """16- and 32-bit grey images scaled to 8 bits (65535 -> 255, rounded); float images clipped."""
    from PIL import Image

    if image.mode in GREY_16_BIT:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.asarray(image, dtype=np.float32).clip(0, 255).round().astype(np.uint8), "L")
    return image


def fit_image(image, fit: Fit) -> np.ndarray:
    """A PIL image (first frame, any mode) as uint8 [C, H, W]: EXIF orientation applied, 16-bit
    scaled to 8, transparency composited over the background, converted to grey or RGB, then fitted
    to the size by the policy and resized with Lanczos (antialiased)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    image = _eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("L" if fit.channels == 1 else "RGB")
    size = (fit.width, fit.height)
    w, h = image.size
    if fit.policy == "crop":  # the centred box of the target's aspect ratio, then resized
        if w * fit.height > h * fit.width:
            cw = max(1, round(h * fit.width / fit.height))
            box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
        else:
            ch = max(1, round(w * fit.height / fit.width))
            box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
        image = image.resize(size, Image.Resampling.LANCZOS, box=box)
    elif fit.policy == "pad":  # resized to fit inside, centred on the background
        scale = min(fit.width / w, fit.height / h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new(image.mode, size, BACKGROUND if image.mode == "L" else (BACKGROUND,) * 3)
        canvas.paste(
            image.resize(inner, Image.Resampling.LANCZOS), ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2)
        )
        image = canvas
    else:
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))
