"""The edge variants of one export folder: made (export.produce), judged (export.quality), and
recorded in the manifest's "variants" section, one entry per variant:

    "int8-static": {
      "status": "verified" | "rejected" | "failed",
      "reasons": [...],                     # why it is not "verified"
      "description", "format", "source",
      "files": {"encoder.int8-static.onnx": {"size", "sha256", "inputs", "outputs"}, ...},
      "tolerance": {"encoder": atol, "decoder": atol},
      "production": {"encoder": {tool, options, op census, what was quantised...}, "decoder": {...}},
      "verification": {...},                # export.verify.Report.to_dict()
      "quality": {"neg_elbo_change", "recon_mse_change", "budget", "within_budget", ...}
    }

The fp32 files are the product: nothing here raises because a variant could not be made or did
not pass; the variant gets a status and the reasons instead.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from export import manifest as manifest_lib
from export.produce import Job, write_required_operators
from export.quality import Reference, judge
from export.variants import FP32, QUALITY_BUDGET, VARIANTS, VariantSpec, select
from export.verify import Report, load_test_images
from vae_dist import data
from vae_dist.models import VAE

log = logging.getLogger(__name__)

REQUIRED_OPERATORS_FILE = "required_operators.config"
CALIBRATION_SEED = 0
CALIBRATION_STREAM = 3  # data.generator stream for calibration draws (training uses 0-2)


def make_variants(
    onnx_dir: Path,
    model: VAE,
    model_meta: dict[str, Any],
    names: Iterable[str] | None = None,
    budget: float = QUALITY_BUDGET,
    data_root: str | Path | None = None,
    fp32_report: Report | None = None,
) -> dict[str, Any]:
    """Make, check and judge the variants `names` (all that apply when None) beside the verified
    fp32 files in `onnx_dir`; the manifest's "variants" section."""
    onnx_dir = Path(onnx_dir)
    chosen = select(names, model_meta["model"]["kind"])
    if not chosen:
        return {}
    reference = _reference(model, model_meta, data_root, fp32_report)
    calibration: dict[str, np.ndarray] | None = None
    section: dict[str, Any] = {}
    for variant in chosen:
        entry = _describe(variant)
        section[variant.name] = entry
        source = section.get(variant.source, {}).get("status") if variant.source != FP32 else "verified"
        if source not in ("verified", "rejected"):  # a rejected source still makes a usable copy
            _fail(entry, f"made from {variant.source}, which could not be made")
            continue
        try:
            if variant.calibrated and calibration is None:
                calibration = calibration_inputs(model, model_meta, variant.options["calibration_images"], data_root)
            entry["production"] = _produce(onnx_dir, variant, calibration)
        except Exception as e:  # the tools raise anything from ValueError to onnxruntime's own types
            log.warning("variant %s could not be made: %s", variant.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            for role in ("encoder", "decoder"):
                (onnx_dir / variant.filename(role)).unlink(missing_ok=True)
            _fail(entry, f"production: {type(e).__name__}: {e}".splitlines()[0])
            continue
        _record_verdict(entry, onnx_dir, variant, model, model_meta, reference, budget)
    return section


def reverify_variants(
    onnx_dir: Path,
    model: VAE,
    model_meta: dict[str, Any],
    section: dict[str, Any],
    budget: float,
    data_root: str | Path | None = None,
    fp32_report: Report | None = None,
) -> dict[str, Any]:
    """Judge the variants an existing export folder lists again (`vae-dist verify`), keeping how
    they were made; failed ones stay failed."""
    onnx_dir = Path(onnx_dir)
    todo = {name: entry for name, entry in section.items() if entry.get("status") != "failed"}
    if not todo:
        return section
    reference = _reference(model, model_meta, data_root, fp32_report)
    updated = dict(section)
    for name, entry in todo.items():
        entry = dict(entry)
        updated[name] = entry
        variant = VARIANTS.get(name)
        if variant is None:
            entry.update(status="rejected", reasons=[f"unknown variant {name!r}; export the run again"])
            continue
        _record_verdict(entry, onnx_dir, variant, model, model_meta, reference, budget)
    return updated


def write_operator_config(onnx_dir: Path, section: dict[str, Any]) -> dict[str, Any] | None:
    """required_operators.config for a minimal onnxruntime build running this folder's ORT files."""
    files = sorted(
        onnx_dir / name
        for variant, entry in section.items()
        if VARIANTS[variant].format == "ort" and entry.get("status") in ("verified", "rejected")
        for name in entry.get("files", {})
    )
    if not files:
        return None
    try:
        path = write_required_operators(files, onnx_dir / REQUIRED_OPERATORS_FILE)
    except Exception as e:  # informational only: never worth failing the export over
        log.warning("could not write %s: %s", REQUIRED_OPERATORS_FILE, e)
        return None
    return {"file": path.name, "models": [f.name for f in files], **manifest_lib.file_record(path)}


def calibration_inputs(
    model: VAE, model_meta: dict[str, Any], count: int, data_root: str | Path | None = None, seed: int = CALIBRATION_SEED
) -> dict[str, np.ndarray]:
    """Inputs for static quantisation, by role.

    encoder: `count` training images, drawn at random (fixed seed) from the whole training split.
    decoder: what a decoder is fed in use: posterior samples z = mu + sigma * eps of those images
    (reconstruction) and as many draws from the prior N(0, I) (sampling).
    """
    name = model_meta["dataset"]
    root = data.resolve(name, data_root, download=False)
    train = data.load_split(name, True, root).images
    g = data.generator(seed, CALIBRATION_STREAM)
    x = data.to_float(train[torch.randperm(len(train), generator=g)[:count]])
    with torch.no_grad():
        mu, logvar = model.eval().encode(x)
        posterior = model.reparameterize(mu, logvar, torch.randn(mu.shape, generator=g))
    prior = torch.randn(mu.shape, generator=g)
    return {"encoder": x.numpy(), "decoder": torch.cat([posterior, prior]).numpy()}


def summary_lines(section: dict[str, Any]) -> list[str]:
    """One line per variant, for the export and verify commands."""
    lines = []
    for name, entry in section.items():
        q = entry.get("quality")
        sizes = ", ".join(f"{f} {r['size'] / 1e6:.2f} MB" for f, r in entry.get("files", {}).items() if "size" in r)
        cost = (
            f"-ELBO {q['neg_elbo_change']:+.4f} nats, recon MSE {q['recon_mse_change']:+.2e}; " if q else ""
        )
        lines.append(f"{name:<16} {entry['status']:<8}  {cost}{sizes}")
        lines += [f"    {reason}" for reason in entry.get("reasons", [])]
    return lines


# ---------------------------------------------------------------- pieces


def _describe(variant: VariantSpec) -> dict[str, Any]:
    return {
        "status": None,
        "reasons": [],
        "description": variant.description,
        "format": variant.format,
        "source": variant.source,
        "tolerance": dict(variant.atol),
    }


def _fail(entry: dict[str, Any], reason: str) -> None:
    entry.update(status="failed", reasons=[reason])


def _reference(model: VAE, model_meta: dict[str, Any], data_root, fp32_report: Report | None) -> Reference:
    images = load_test_images(model, model_meta, data_root)
    if fp32_report is not None and fp32_report.elbo and "recon_mse_torch" in fp32_report.elbo:
        return Reference.from_elbo(fp32_report.elbo, model, images)
    return Reference.compute(model, images, model_meta.get("likelihood", "bernoulli"))


def _produce(onnx_dir: Path, variant: VariantSpec, calibration: dict[str, np.ndarray] | None) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {}
    for role in ("encoder", "decoder"):
        source = onnx_dir / (f"{role}.onnx" if variant.source == FP32 else VARIANTS[variant.source].filename(role))
        job = Job(
            source=source, target=onnx_dir / variant.filename(role), role=role, variant=variant.name,
            options=variant.options, calibration=calibration[role] if variant.calibrated and calibration else None,
        )
        record[role] = variant.produce(job)
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.info("made variant %s in %.1f s", variant.name, record["seconds"])
    return record


def _record_verdict(
    entry: dict[str, Any], onnx_dir: Path, variant: VariantSpec, model: VAE, model_meta: dict[str, Any],
    reference: Reference, budget: float,
) -> None:
    try:
        verdict = judge(onnx_dir, variant, model, model_meta, reference, budget)
    except Exception as e:  # a check that crashes rejects the variant, never the export
        log.warning("variant %s could not be checked: %s", variant.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
        entry.update(status="rejected", reasons=[f"verification: {type(e).__name__}: {e}".splitlines()[0]])
        return
    entry.update(
        status=verdict.status,
        reasons=verdict.reasons,
        files=manifest_lib.files_section(onnx_dir, verdict.specs),
        tolerance=dict(variant.atol),
        verification=verdict.report.to_dict(),
        quality=verdict.quality,
    )
    level = logging.INFO if verdict.status == "verified" else logging.WARNING
    log.log(level, "variant %s %s%s", variant.name, verdict.status, f": {verdict.reasons[0]}" if verdict.reasons else "")

