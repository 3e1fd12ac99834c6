"""What a run leaves behind: the self-describing model file (its header is vae_dist.record's) and
the image grids."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_dist import files
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.models import VAE, build_model
from vae_dist.record import ModelFileError, ModelRecord
from vae_dist.record import read as read_record

GRID_PAD = 2  # black pixels between grid cells
MIN_CELL_PIXELS = 84  # grids are upscaled (nearest neighbour) until each image is at least this wide


# ---------------------------------------------------------------- the model file


def save_model(path: Path, model: VAE, record: ModelRecord) -> None:
    """Weights in safetensors; in its header, the record that rebuilds the model. The bytes are a
    function of the weights and the record alone (see `safetensors_bytes`)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    blob = safetensors_bytes(state, record.to_metadata())
    files.atomic_write(path, lambda tmp: tmp.write_bytes(blob))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of float32 `tensors` with `metadata`, every key of its header in
    sorted order. (The safetensors library writes the metadata in its hash map's order, which
    changes from one process to the next, so equal models got different bytes.) The format: the
    header's length (8 bytes, little-endian), the header as JSON padded with spaces to a multiple
    of 8 bytes, then each tensor's little-endian bytes at the offsets the header gives."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        blob = tensor.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def load_model(path: str | Path) -> tuple[VAE, ModelRecord]:
    """Rebuild a model from its file alone (no YAML); returns it in eval mode with its record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = read_record(path)
    try:
        model = build_model(record.model, record.image_shape, PixelLikelihood.of_record(record).out_channels)
        model.load_state_dict(load_file(str(path)))
    except (TypeError, ValueError, RuntimeError, SafetensorError, OSError) as e:  # a damaged or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{path} does not hold the model its metadata describes ({reason[:200]}); train or copy it again"
        ) from None
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        raise ModelFileError(f"{path} holds weights that are not finite (its training diverged); train it again")
    return model.eval(), record


# ---------------------------------------------------------------- image grids


def grid_scale(width: int) -> int:
    """The nearest-neighbour upscale that makes an image `width` pixels wide at least MIN_CELL_PIXELS."""
    return max(1, math.ceil(MIN_CELL_PIXELS / width))


def grid_pixels(rows: list[torch.Tensor], scale: int | None = None) -> np.ndarray:
    """Rows of images [n, C, H, W] in [0, 1] laid out on black, GRID_PAD pixels apart, then
    upscaled (nearest neighbour; `scale` None: by `grid_scale`): uint8 [C, H', W'].
    export/sample.py draws the same layout."""
    c, h, w = rows[0].shape[1:]
    cols = max(r.shape[0] for r in rows)
    canvas = torch.zeros(c, GRID_PAD + len(rows) * (h + GRID_PAD), GRID_PAD + cols * (w + GRID_PAD))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = GRID_PAD + i * (h + GRID_PAD), GRID_PAD + j * (w + GRID_PAD)
            canvas[:, y : y + h, x : x + w] = img.float().cpu()
    pixels = (canvas * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()  # round half up
    return upscaled(pixels, grid_scale(w) if scale is None else scale)


def upscaled(pixels: np.ndarray, scale: int) -> np.ndarray:
    """[C, H, W] -> [C, H * scale, W * scale], nearest neighbour."""
    return pixels.repeat(scale, axis=1).repeat(scale, axis=2)


def save_grid(path: Path, rows: list[torch.Tensor]) -> np.ndarray:
    """The grid of `rows` as a PNG at `path`, upscaled; returns its pixels at scale 1 (uint8 [C, H, W])."""
    from PIL import Image

    pixels = grid_pixels(rows, scale=1)
    big = upscaled(pixels, grid_scale(rows[0].shape[-1]))
    image = Image.fromarray(big[0] if big.shape[0] == 1 else np.ascontiguousarray(big.transpose(1, 2, 0)))
    files.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return pixels


def save_reconstruction_grid(path: Path, originals: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """One row of originals above one row of their reconstructions, as in the reference."""
    return save_grid(path, [originals, recon])


def save_sample_grid(path: Path, samples: torch.Tensor) -> np.ndarray:
    per_row = max(1, int(round(samples.shape[0] ** 0.5)))
    return save_grid(path, [samples[i : i + per_row] for i in range(0, samples.shape[0], per_row)])
