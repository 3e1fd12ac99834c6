"""manifest.json: what an export folder holds, where it came from, and whether it passed.

    {
      "format": "vae-dist-onnx-manifest/1",
      "run": "conv-20240101-120000",
      "source": {"file": "model.safetensors", "size": ..., "sha256": ...},
      "model": {"kind", "latent_dim", "image_shape", "dataset", "likelihood", "test_neg_elbo"},
      "opset": 18,
      "versions": {...},                      # software that produced the files
      "files": {"encoder.onnx": {"size", "sha256", "inputs", "outputs"}, "decoder.onnx": {...}},
      "verified": true,
      "verification": {...},                  # export.verify.Report.to_dict()
      "quality_budget": 0.5,                  # nats of test -ELBO a variant may move
      "variants": {"fp16": {"status", "reasons", "files", "quality", ...}, ...},  # see export.edge
      "required_operators": {"file": "required_operators.config", ...}          # for the .ort files
    }

Consumers (export/sample.py) trust the files only when "verified" is true and the hashes match,
so a file changed after verification is refused until it is verified again; a variant's files
only when its own status is "verified" too (or "rejected", when the user says so).
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.spec import MANIFEST_FILE, MANIFEST_FORMAT, SubModelSpec


def file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def files_section(onnx_dir: Path, specs: tuple[SubModelSpec, ...]) -> dict[str, Any]:
    section = {}
    for spec in specs:
        path = onnx_dir / spec.filename
        record = file_record(path) if path.is_file() else {"missing": True}
        record["inputs"] = {t.name: list(t.dims) for t in spec.inputs}
        record["outputs"] = {t.name: list(t.dims) for t in spec.outputs}
        section[spec.filename] = record
    return section


def new_manifest(
    run_dir: Path, model_path: Path, model_meta: dict[str, Any], opset: int, versions: dict[str, str]
) -> dict[str, Any]:
    """Everything but the files and the verification, which `record_verification` fills in."""
    m = model_meta["model"]
    return {
        "format": MANIFEST_FORMAT,
        "run": run_dir.name,
        "exported_at": _now(),
        "source": {"file": model_path.name, **file_record(model_path)},
        "model": {
            "kind": m["kind"],
            "latent_dim": m["latent_dim"],
            "image_shape": list(model_meta["image_shape"]),
            "dataset": model_meta.get("dataset"),
            "likelihood": model_meta.get("likelihood", "bernoulli"),
            "test_neg_elbo": model_meta.get("test_neg_elbo"),
        },
        "opset": opset,
        "versions": versions,
    }


def record_verification(
    manifest: dict[str, Any], onnx_dir: Path, specs: tuple[SubModelSpec, ...], report_dict: dict[str, Any]
) -> dict[str, Any]:
    """The manifest with the files as they are now and the verdict on exactly those bytes."""
    manifest = dict(manifest)
    manifest["files"] = files_section(onnx_dir, specs)
    manifest["verified"] = bool(report_dict["passed"])
    manifest["verified_at"] = _now()
    manifest["verification"] = report_dict
    return manifest


def read_manifest(onnx_dir: Path) -> dict[str, Any] | None:
    path = onnx_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(onnx_dir: Path, manifest: dict[str, Any]) -> Path:
    path = onnx_dir / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a manifest
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
