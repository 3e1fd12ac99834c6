"""What a run leaves behind: the self-describing model file, metrics lines and image grids."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_dist.config import ModelConfig
from vae_dist.errors import UserError
from vae_dist.losses import LIKELIHOODS
from vae_dist.models import MODELS, VAE, build_model

MODEL_FILE = "model.safetensors"
FORMAT = "vae-dist-model/1"
GRID_PAD = 2  # black pixels between grid cells
MIN_CELL_PIXELS = 84  # grids are upscaled (nearest neighbour) until each image is at least this wide


class ModelFileError(UserError):
    """A model file that is missing, damaged or not a vae-dist model."""


# ---------------------------------------------------------------- writing files


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename over `path`: a kill or a full disk leaves the old file (or none),
    never a partial one; a failed write's partial temporary file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # a full disk, quota or file size limit


def write_failure(e: BaseException, folder: Path) -> str | None:
    """Why a write failed, if `e` is a failed write (disk full, file too large, read-only, ...);
    None for anything else, which stays a bug. safetensors and torch's checkpoint writer do not
    raise OSError: their messages are recognised here."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    found = re.search(r"os error (\d+)", text)  # safetensors (Rust) reports the errno this way
    if found:
        return os.strerror(int(found.group(1)))
    if isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        # torch's zip writer drops the errno; say what is most likely
        try:
            full = shutil.disk_usage(folder).free < 16 * 2**20
        except OSError:
            full = False
        return os.strerror(errno.ENOSPC) if full else "the write was cut short (disk full or a file size limit)"
    return None


def newest_file(where: Path) -> Path:
    """The file under `where` written last (the one a failed write was writing), else `where`."""
    if not where.is_dir():
        return where
    files = [p for p in where.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else where


# ---------------------------------------------------------------- the model file


def save_model(path: Path, model: VAE, model_cfg: ModelConfig, extra: dict[str, Any]) -> None:
    """Weights in safetensors; in its header, everything needed to rebuild the model. The same
    weights and metadata always give the same bytes (keys sorted)."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "model": json.dumps(model_cfg.__dict__, sort_keys=True),
        "image_shape": json.dumps(list(model.image_shape)),
        **{k: json.dumps(v, sort_keys=True) for k, v in extra.items()},
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tensors, metadata = dict(sorted(state.items())), dict(sorted(meta.items()))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} not found; train a model first (make train)")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelFileError(
            f"{path} cannot be read as a safetensors file ({str(e).splitlines()[0]}); it is damaged or truncated: "
            "copy it again, or train the run again"
        ) from None
    if raw.get("format") != FORMAT:
        raise ModelFileError(
            f"{path} is not a vae-dist model file (format {raw.get('format')!r}, expected {FORMAT!r}); "
            "give the model.safetensors of a vae-dist run"
        )
    try:
        meta = {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}
    except ValueError:
        raise ModelFileError(f"{path} has damaged metadata; train or copy the model again") from None
    model, shape = meta.get("model"), meta.get("image_shape")
    if not isinstance(model, dict) or not isinstance(shape, list) or len(shape) != 3:
        raise ModelFileError(f"{path} has damaged metadata (model or image_shape); train or copy the model again")
    if model.get("kind") not in MODELS:
        raise ModelFileError(
            f"{path} describes a model of kind {model.get('kind')!r}; this vae-dist knows {', '.join(MODELS)}: "
            "use the vae-dist version that trained it"
        )
    if meta.get("likelihood", "bernoulli") not in LIKELIHOODS:
        raise ModelFileError(
            f"{path} names the likelihood {meta['likelihood']!r}; known: {', '.join(LIKELIHOODS)}: "
            "use the vae-dist version that trained it"
        )
    return meta


def load_model(path: str | Path) -> tuple[VAE, dict[str, Any]]:
    """Rebuild a model from its file alone (no YAML); returns it in eval mode with its metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_model_metadata(path)
    try:
        model = build_model(ModelConfig(**meta["model"]), tuple(meta["image_shape"]))
        model.load_state_dict(load_file(str(path)))
    except (TypeError, ValueError, RuntimeError, SafetensorError, OSError) as e:  # a damaged or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{path} does not hold the model its metadata describes ({reason[:200]}); train or copy it again"
        ) from None
    return model.eval(), meta


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # a last line torn by a kill during the append; its epoch will be run again
    return records


# ---------------------------------------------------------------- image grids


def grid_scale(width: int) -> int:
    """The nearest-neighbour upscale that makes an image `width` pixels wide at least MIN_CELL_PIXELS."""
    return max(1, math.ceil(MIN_CELL_PIXELS / width))


def grid_pixels(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of images [n, C, H, W] in [0, 1] laid out on black, GRID_PAD pixels apart, then
    upscaled by `grid_scale`: uint8 [C, H', W']. export/sample.py draws the same layout."""
    c, h, w = rows[0].shape[1:]
    cols = max(r.shape[0] for r in rows)
    canvas = torch.zeros(c, GRID_PAD + len(rows) * (h + GRID_PAD), GRID_PAD + cols * (w + GRID_PAD))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = GRID_PAD + i * (h + GRID_PAD), GRID_PAD + j * (w + GRID_PAD)
            canvas[:, y : y + h, x : x + w] = img.float().cpu()
    pixels = (canvas * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()  # round half up
    s = grid_scale(w)
    return pixels.repeat(s, axis=1).repeat(s, axis=2)


def save_grid(path: Path, rows: list[torch.Tensor]) -> None:
    from PIL import Image

    pixels = grid_pixels(rows)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_reconstruction_grid(path: Path, originals: torch.Tensor, recon: torch.Tensor) -> None:
    """One row of originals above one row of their reconstructions, as in the reference."""
    save_grid(path, [originals, recon])


def save_sample_grid(path: Path, samples: torch.Tensor) -> None:
    per_row = max(1, int(round(samples.shape[0] ** 0.5)))
    save_grid(path, [samples[i : i + per_row] for i in range(0, samples.shape[0], per_row)])
