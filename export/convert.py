"""The export: a run's model file -> RUN/onnx/{encoder.onnx, decoder.onnx, manifest.json}, and
beside them the edge variants (export.variants) made from the verified fp32 files.

The files are written and verified in a staging folder inside the run, which is renamed to
RUN/onnx only when every fp32 check passed. A failed export lands in RUN/onnx-failed with
"verified": false in its manifest, for inspection; a good RUN/onnx from before is left alone.
A variant that cannot be made or does not pass never fails the export: it gets a status in the
manifest instead (export.edge).
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from export import edge
from export import manifest as manifest_lib
from export.runs import resolve_run
from export.spec import DEFAULT_OPSET, ELBO_TOL, ONNX_DIR, SubModelSpec, onnx_metadata, vae_specs
from export.variants import QUALITY_BUDGET
from export.verify import Check, Report, verify_export
from vae_dist import artifacts
from vae_dist.models import VAE

log = logging.getLogger(__name__)

FAILED_DIR = "onnx-failed"
MAX_SINGLE_FILE = 2**31 - 1  # protobuf's limit: beyond it ONNX needs external data files


class ExportError(RuntimeError):
    """The model could not be written as a single self-contained ONNX file."""


@dataclass
class ExportResult:
    run_dir: Path
    onnx_dir: Path  # RUN/onnx when verified, RUN/onnx-failed otherwise
    report: Report
    manifest: dict[str, Any]

    @property
    def verified(self) -> bool:
        return self.report.passed


def versions() -> dict[str, str]:
    """Versions of the software that produces (and verifies) an export."""
    import numpy
    import onnxruntime
    import onnxscript

    from vae_dist import __version__

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "vae_dist": __version__,
        "python": platform.python_version(),
    }


def export_submodel(model: VAE, spec: SubModelSpec, path: Path, opset: int, metadata: dict[str, str]) -> Path:
    """Trace `spec.wrap(model)` with torch.onnx.export (dynamo) and write one self-contained file."""
    module = spec.wrap(model).eval()
    program = torch.onnx.export(
        module,
        spec.example_inputs(),
        dynamo=True,  # torch.export-based exporter; the default since torch 2.9, stated for older ones
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=opset,
        dynamic_shapes=spec.dynamic_shapes(),
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto
    # Below its native opset the exporter converts down, and keeps its own opset when it cannot.
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"{spec.filename}: the exporter could not target opset {opset} (it produced {got})")
    proto.graph.name = f"vae_dist_{spec.role}"
    proto.doc_string = f"vae-dist {metadata['model_kind']} VAE {spec.role}: {_signature(spec)}"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{spec.filename}: weights left in external data ({external[:3]}...)")
    if proto.ByteSize() > MAX_SINGLE_FILE:
        raise ExportError(f"{spec.filename}: {proto.ByteSize()} bytes does not fit in one ONNX file (2 GiB limit)")
    onnx.save_model(proto, str(path), save_as_external_data=False)
    log.info("wrote %s (%d bytes, opset %d)", path, path.stat().st_size, opset)
    return path


def _signature(spec: SubModelSpec) -> str:
    def fmt(ts):
        return ", ".join(f"{t.name} float32 {list(t.dims)}" for t in ts)

    return f"{fmt(spec.inputs)} -> {fmt(spec.outputs)}"


def export_run(
    run: str | Path,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    data_root: str | Path | None = None,
    elbo_tol: float = ELBO_TOL,
    variants: list[str] | None = None,
    quality_budget: float = QUALITY_BUDGET,
) -> ExportResult:
    """Export and verify one run (a run directory or its model file); never raises on a failed
    verification: the result says whether it passed and where the files are.

    `variants`: the edge variants to make beside the fp32 files (None: all that apply to the
    model kind; []: none); `quality_budget`: largest |change| of the test -ELBO, in nats, for a
    variant to be "verified" rather than "rejected".
    """
    run_dir, model_path = resolve_run(run)
    model, meta = artifacts.load_model(model_path)
    specs = vae_specs(model, atol)
    vers = versions()
    staging = run_dir / f".onnx-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for spec in specs:
            export_submodel(model, spec, staging / spec.filename, opset, onnx_metadata(spec, meta, opset, vers))
        report = verify_export(staging, model, meta, atol, data_root, elbo_tol=elbo_tol)
        manifest = manifest_lib.new_manifest(run_dir, model_path, meta, opset, vers)
        manifest = manifest_lib.record_verification(manifest, staging, specs, report.to_dict())
        manifest["quality_budget"] = quality_budget
        if report.passed:
            manifest["variants"] = edge.make_variants(
                staging, model, meta, variants, quality_budget, data_root, fp32_report=report
            )
            manifest["required_operators"] = edge.write_operator_config(staging, manifest["variants"])
        else:  # variants are made from verified fp32 files only
            manifest["variants"] = {}
        manifest_lib.write_manifest(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if report.passed:
        final = run_dir / ONNX_DIR
        _replace_dir(staging, final)
        shutil.rmtree(run_dir / FAILED_DIR, ignore_errors=True)  # superseded by a good export
        log.info("export of %s verified: %s", run_dir, final)
    else:
        final = run_dir / FAILED_DIR
        _replace_dir(staging, final)
        log.error("export of %s failed verification; files kept in %s", run_dir, final)
    return ExportResult(run_dir, final, report, manifest)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing it; `dst` is never a mix of old and new files."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify_run(
    run: str | Path,
    atol: float | None = None,
    data_root: str | Path | None = None,
    elbo_tol: float = ELBO_TOL,
    quality_budget: float | None = None,
) -> tuple[Report, Path]:
    """Verify RUN/onnx against RUN's model file and record the verdict in its manifest.

    A failure marks the manifest "verified": false, so consumers refuse the files. The variants
    the manifest lists are judged again too, against `quality_budget` (default: the one the
    export used); their verdicts do not change the returned report.
    """
    run_dir, model_path = resolve_run(run)
    onnx_dir = run_dir / ONNX_DIR
    if not onnx_dir.is_dir():
        raise FileNotFoundError(f"{onnx_dir} not found; export the run first (vae-dist export {run_dir})")
    model, meta = artifacts.load_model(model_path)
    specs = vae_specs(model, atol)
    report = verify_export(onnx_dir, model, meta, atol, data_root, elbo_tol=elbo_tol)
    try:
        previous = manifest_lib.read_manifest(onnx_dir)
    except ValueError:  # a damaged manifest is rebuilt; the verdict below is what counts
        log.warning("%s/manifest.json is not valid JSON; writing a new one", onnx_dir)
        previous = None
    source = manifest_lib.file_record(model_path)
    if previous is None:
        opset = _opset_of(onnx_dir / specs[0].filename)
        previous = manifest_lib.new_manifest(run_dir, model_path, meta, opset, versions())
    elif previous.get("source", {}).get("sha256") != source["sha256"]:
        report.checks.append(
            Check("", "source", False, f"{model_path.name} changed since the export; export the run again")
        )
    manifest = manifest_lib.record_verification(previous, onnx_dir, specs, report.to_dict())
    if manifest.get("variants"):
        budget = quality_budget if quality_budget is not None else manifest.get("quality_budget", QUALITY_BUDGET)
        manifest["quality_budget"] = budget
        manifest["variants"] = edge.reverify_variants(
            onnx_dir, model, meta, manifest["variants"], budget, data_root, fp32_report=report
        )
    manifest_lib.write_manifest(onnx_dir, manifest)
    return report, onnx_dir


def _opset_of(path: Path) -> int | None:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
