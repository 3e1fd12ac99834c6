"""The model record: what a model.safetensors says about itself in its header, as one dataclass,
validated once where the file is read. Training writes it; export, evaluate, `vae-dist runs`, the
Python API and the ONNX files' metadata read it. No torch: the header is read as the safetensors
format defines it (an 8-byte length, then JSON), so listing runs does not load torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_dist.config import ConfigError, ModelConfig, from_dict
from vae_dist.errors import UserError
from vae_dist.kinds import LIKELIHOODS, MODEL_KINDS

FORMAT = "vae-dist-model/1"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


class ModelFileError(UserError):
    """A model file that is missing, damaged or not a vae-dist model."""


@dataclass(frozen=True)
class ModelRecord:
    model: ModelConfig  # rebuilds the network (vae_dist.models.build_model)
    image_shape: tuple[int, int, int]  # C, H, W
    dataset: str | None = None  # a built-in set's name or a prepared dataset's folder (splits.dataset_name)
    likelihood: str = "bernoulli"  # files older than the key were all bernoulli
    mixtures: int = 10  # dlm: components per pixel (loss.mixtures)
    binarize: str | None = None  # how training binarised its images; None in files older than the key
    epochs: int | None = None
    steps: int | None = None
    test_neg_elbo: float | None = None  # the last epoch's test -ELBO, nats per image
    test_images: int | None = None  # the test images it was measured on (data.test_subset)
    fit: dict[str, Any] | None = None  # how images were made rows (vae-dist prepare), or None: as published
    eval_seed: int = 0  # export verification draws the same evaluation noise as training did
    versions: dict[str, str] = field(default_factory=dict)  # software that trained it

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def to_metadata(self) -> dict[str, str]:
        """The header's metadata: every value as JSON, keys sorted, so equal records give equal bytes."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = dataclasses.asdict(self.model)
        values["image_shape"] = list(self.image_shape)
        meta = {k: json.dumps(v, sort_keys=True) for k, v in values.items()}
        return dict(sorted({**meta, "format": FORMAT}.items()))

    @classmethod
    def from_metadata(cls, raw: dict[str, str], path: Path) -> ModelRecord:
        """The record of a header's metadata, every value checked; a ModelFileError names `path`."""
        if raw.get("format") != FORMAT:
            raise ModelFileError(
                f"{path} is not a vae-dist model file (format {raw.get('format')!r}, expected {FORMAT!r}); "
                "give the model.safetensors of a vae-dist run"
            )
        try:
            meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        except (TypeError, ValueError):
            raise ModelFileError(f"{path} has damaged metadata; train or copy the model again") from None
        model, shape = meta.get("model"), meta.get("image_shape")
        if not isinstance(model, dict) or not _is_shape(shape):
            raise ModelFileError(f"{path} has damaged metadata (model or image_shape); train or copy the model again")
        if model.get("kind") not in MODEL_KINDS:
            raise ModelFileError(
                f"{path} describes a model of kind {model.get('kind')!r}; this vae-dist knows "
                f"{', '.join(MODEL_KINDS)}: use the vae-dist version that trained it"
            )
        if meta.get("likelihood", "bernoulli") not in LIKELIHOODS:
            raise ModelFileError(
                f"{path} names the likelihood {meta['likelihood']!r}; known: {', '.join(LIKELIHOODS)}: "
                "use the vae-dist version that trained it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in meta.items() if k in known}  # keys of a newer version are left aside
        try:
            values["model"] = _model_config(model)
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{path} has damaged metadata (model: {e}); train or copy the model again") from None
        values["image_shape"] = tuple(shape)
        for name, wrong in _wrong_values(values):
            raise ModelFileError(f"{path} has damaged metadata ({name}={wrong!r}); train or copy the model again")
        return cls(**values)


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and len(shape) == 3 and all(_count(v) and v > 0 for v in shape)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _model_config(model: dict[str, Any]) -> ModelConfig:
    try:
        return from_dict({"model": model}).model
    except ConfigError as e:
        raise ValueError(str(e)) from None


# The check each value must pass when the header has it; NULLABLE ones may also be null.
NULLABLE = frozenset({"dataset", "binarize", "epochs", "steps", "test_neg_elbo", "test_images", "fit"})
CHECKS = {
    "dataset": lambda v: isinstance(v, str) and bool(v),
    "binarize": lambda v: isinstance(v, str),
    "epochs": _count,
    "steps": _count,
    "test_neg_elbo": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "test_images": lambda v: _count(v) and v > 0,
    "fit": lambda v: isinstance(v, dict),
    "eval_seed": _count,
    "mixtures": lambda v: _count(v) and v > 0,
    "versions": lambda v: isinstance(v, dict),
}


def _wrong_values(values: dict[str, Any]):
    for name, check in CHECKS.items():
        if name in values and not (values[name] is None and name in NULLABLE) and not check(values[name]):
            yield name, values[name]


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (its tensors' entries and "__metadata__"), checked to describe
    exactly the bytes that follow it."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header's length")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"its header claims {length} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(
            f"{path} cannot be read as a safetensors file ({str(e).splitlines()[0]}); it is damaged or truncated: "
            "copy it again, or train the run again"
        ) from None
    entries = [entry for name, entry in header.items() if name != "__metadata__"] if isinstance(header, dict) else []
    offsets = [entry.get("data_offsets") if isinstance(entry, dict) else None for entry in entries]
    whole = all(isinstance(o, list) and len(o) == 2 and all(_count(v) for v in o) for o in offsets)
    if not isinstance(header, dict) or not whole or 8 + length + max((o[1] for o in offsets), default=0) != size:
        raise ModelFileError(
            f"{path} cannot be read as a safetensors file (its tensors do not cover the file); it is damaged or "
            "truncated: copy it again, or train the run again"
        )
    return header


def read(path: str | Path) -> ModelRecord:
    """The record of the model file at `path`, checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} not found; train a model first (make train)")
    raw = read_header(path).get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} has damaged metadata; train or copy the model again")
    return ModelRecord.from_metadata(raw, path)
