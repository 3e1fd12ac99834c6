"""What a run leaves behind: the self-describing model file, metrics and image grids."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

from vae_dist.config import ModelConfig
from vae_dist.models import VAE, build_model

MODEL_FILE = "model.safetensors"
FORMAT = "vae-dist-model/1"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(path: Path, model: VAE, model_cfg: ModelConfig, extra: dict[str, Any]) -> None:
    """Weights in safetensors; in its header, everything needed to rebuild the model."""
    meta = {
        "format": FORMAT,
        "model": json.dumps(model_cfg.__dict__),
        "image_shape": json.dumps(list(model.image_shape)),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} not found; train a model first (make train)")
    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vae-dist model file (format {raw.get('format')!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_model(path: str | Path) -> tuple[VAE, dict[str, Any]]:
    """Rebuild a model from its file alone (no YAML); returns it in eval mode with its metadata."""
    meta = read_model_metadata(path)
    model = build_model(ModelConfig(**meta["model"]), tuple(meta["image_shape"]))
    model.load_state_dict(load_file(str(path)))
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


@torch.no_grad()
def save_reconstruction_grid(path: Path, originals: torch.Tensor, recon: torch.Tensor) -> None:
    """One row of originals above one row of their reconstructions, as in the reference."""
    n = originals.shape[0]
    save_image(torch.cat([originals, recon]).float().cpu(), str(path), nrow=n, padding=2)


@torch.no_grad()
def save_sample_grid(path: Path, samples: torch.Tensor) -> None:
    n = samples.shape[0]
    nrow = max(1, int(round(n**0.5)))
    save_image(samples.float().cpu(), str(path), nrow=nrow, padding=2)
