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
      "variants": {"int8-static": VARIANT ENTRY, ...},
      "required_operators": {"file": "required_operators.config", ...}          # for the .ort files
    }

A variant entry:

    {
      "status": "verified" | "rejected" | "failed",
      "reasons": [...],                     # why it is not "verified"
      "description", "format", "source",
      "files": {"encoder.int8-static.onnx": {"size", "sha256", "inputs", "outputs"}, ...},
      "tolerance": {"encoder": atol, "decoder": atol},
      "production": {"encoder": {tool, options, op census, what was quantised...}, "decoder": {...}},
      "verification": {...},                # export.verify.Report.to_dict()
      "quality": {"neg_elbo_change", "recon_mse_change", "budget", "within_budget", ...}
    }

This module is the only one that sets these keys; the others read them.

Consumers (export/sample.py) trust the files only when "verified" is true and the hashes match,
so a file changed after verification is refused until it is verified again; a variant's files
only when its own status is "verified" too (or "rejected", when the user says so).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.spec import MANIFEST_FILE, MANIFEST_FORMAT, SubModelSpec
from vae_dist import files
from vae_dist.errors import UserError
from vae_dist.record import ModelRecord

if TYPE_CHECKING:
    from export.variants import VariantSpec
    from export.verify import Verdict


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": files.sha256_file(path)}


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
    run_dir: Path, model_path: Path, record: ModelRecord, opset: int, versions: dict[str, str]
) -> dict[str, Any]:
    """Everything but the files and the verification, which `record_verification` fills in."""
    return {
        "format": MANIFEST_FORMAT,
        "run": run_dir.name,
        "exported_at": _now(),
        "source": {"file": model_path.name, **file_record(model_path)},
        "model": {
            "kind": record.kind,
            "latent_dim": record.latent_dim,
            "image_shape": list(record.image_shape),
            "dataset": record.dataset,
            "likelihood": record.likelihood,
            "test_neg_elbo": record.test_neg_elbo,
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


def record_variants(
    manifest: dict[str, Any], section: dict[str, Any], budget: float, required_operators: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest with the variants' entries, the budget they were judged against, and the
    operator list of their ORT files."""
    manifest = dict(manifest)
    manifest["quality_budget"] = budget
    manifest["variants"] = section
    if required_operators is not None or "required_operators" in manifest:
        manifest["required_operators"] = required_operators
    return manifest


def variant_entry(variant: VariantSpec) -> dict[str, Any]:
    """A variant's entry before it is made: what it is."""
    return {
        "status": None,
        "reasons": [],
        "description": variant.description,
        "format": variant.format,
        "source": variant.source,
        "tolerance": dict(variant.atol),
    }


def record_production(entry: dict[str, Any], production: dict[str, Any]) -> None:
    entry["production"] = production


def record_failure(entry: dict[str, Any], reason: str) -> None:
    """A variant that could not be made (its files are removed)."""
    entry.update(status="failed", reasons=[reason])


def record_rejection(entry: dict[str, Any], reason: str) -> None:
    """A variant whose files exist but could not be judged."""
    entry.update(status="rejected", reasons=[reason])


def record_verdict(entry: dict[str, Any], onnx_dir: Path, variant: VariantSpec, verdict: Verdict) -> None:
    entry.update(
        status=verdict.status,
        reasons=verdict.reasons,
        files=files_section(onnx_dir, verdict.specs),
        tolerance=dict(variant.atol),
        verification=verdict.report.to_dict(),
        quality=verdict.quality,
    )


def operators_record(path: Path, models: list[Path]) -> dict[str, Any]:
    return {"file": path.name, "models": [f.name for f in models], **file_record(path)}


class ManifestError(UserError, ValueError):
    """A manifest.json that is not a JSON object."""


def read_manifest(onnx_dir: Path) -> dict[str, Any] | None:
    """The manifest of an export folder; None when there is none."""
    path = onnx_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ManifestError(f"{path} is not valid JSON; verify or export the run again") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a manifest (a JSON object); verify or export the run again")
    return manifest


def write_manifest(onnx_dir: Path, manifest: dict[str, Any]) -> Path:
    path = onnx_dir / MANIFEST_FILE
    files.atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")  # a reader never sees half a manifest
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
