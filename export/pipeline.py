"""The export pipeline: a run's model file -> RUN/onnx/{encoder.onnx, decoder.onnx, manifest.json},
verified, then the edge variants beside them, each made, judged and recorded in the manifest.

    find the run -> export each sub-model (export.convert) -> verify (export.verify)
        -> make and judge the variants (export.variants, export.verify) -> manifest (export.manifest)

The files are written and verified in a staging folder inside the run, which is renamed to
RUN/onnx only when every fp32 check passed. A failed export lands in RUN/onnx-failed with
"verified": false in its manifest, for inspection; a good RUN/onnx from before is left alone.
A variant that cannot be made or does not pass never fails the export: it gets a status in the
manifest instead. `verify_run` checks an existing export again, variants included.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export import manifest as manifest_lib
from export import variants as variants_lib
from export.convert import export_submodel, opset_of, versions
from export.spec import DEFAULT_OPSET, ELBO_TOL, MANIFEST_FILE, ONNX_DIR, onnx_metadata, vae_specs
from export.variants import FP32, QUALITY_BUDGET, VARIANTS, VariantSpec
from export.verify import Check, Reference, Report, judge, load_test_images, verify_export
from vae_dist import artifacts, files, runs
from vae_dist.errors import UserError
from vae_dist.kinds import LIKELIHOODS, MODEL_KINDS
from vae_dist.models import VAE
from vae_dist.record import ModelFileError, ModelRecord
from vae_dist.record import read as read_record

log = logging.getLogger(__name__)

FAILED_DIR = "onnx-failed"


# ---------------------------------------------------------------- finding runs


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, model file) for a run directory or for its model file, of a model the ONNX
    contract covers."""
    path = Path(path)
    if path.is_file():
        return path.parent, refuse_what_is_not_exported(path)
    if path.is_dir():
        model_path = path / runs.MODEL_FILE
        if model_path.is_file():
            return path, refuse_what_is_not_exported(model_path)
        raise UserError(f"{path} holds no {runs.MODEL_FILE}; is it a finished run (runs/NAME)?")
    raise UserError(f"run {str(path)!r} not found")


def refuse_what_is_not_exported(model_path: Path) -> Path:
    """`model_path`, when its model kind and likelihood are ones the ONNX files can carry (encoder
    x -> mu, logvar; decoder z -> x_mean, from which -log p(x|z) follows); else a UserError."""
    record = read_record(model_path)
    if not exported(record):
        unsupported = [f"model.kind {record.kind}"] if not MODEL_KINDS[record.kind].exported else []
        if not LIKELIHOODS[record.likelihood].exported:
            unsupported.append(f"loss.likelihood {record.likelihood}")
        raise UserError(
            f"{model_path} is a {' with '.join(unsupported)} model, which the ONNX export does not carry yet "
            "(its graphs are one latent vector's encoder and a decoder's mean); use it from Python "
            "(vae_dist.load) or export a linear or conv run with bernoulli or gaussian"
        )
    return model_path


def exported(record: ModelRecord) -> bool:
    """Whether the ONNX files can carry the model of `record`: its kind and its likelihood."""
    return MODEL_KINDS[record.kind].exported and LIKELIHOODS[record.likelihood].exported


def find_latest_runs(output_dir: str | Path) -> dict[str, Path]:
    """The newest run of each model kind under `output_dir` that the export carries (runs of a
    kind or likelihood it does not carry yet are left out), as {kind: run directory}.

    The kind comes from the model file's own metadata, not from the folder name (runs may be
    named anything); "newest" is the model file's modification time, i.e. when training ended.
    Files that are not vae-dist models are skipped with a warning.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    newest: dict[str, tuple[float, Path]] = {}
    for model_path in sorted(output_dir.glob(f"*/{runs.MODEL_FILE}")):
        try:
            record = read_record(model_path)
        except ModelFileError as e:  # a half-written or foreign file must not stop the others
            log.warning("skipping %s: %s", model_path, e)
            continue
        if not exported(record):
            log.info("skipping %s: a %s model with %s, which the export does not carry yet", model_path,
                     record.kind, record.likelihood)
            continue
        kind = record.kind
        mtime = model_path.stat().st_mtime
        if kind not in newest or mtime > newest[kind][0]:
            newest[kind] = (mtime, model_path.parent)
    return {kind: run_dir for kind, (_, run_dir) in sorted(newest.items())}


def find_latest_exports(output_dir: str | Path) -> dict[str, Path]:
    """The run with the newest verified export of each model kind under `output_dir`, as
    {kind: run directory}; "newest" is the manifest's modification time (the last export or verify)."""
    output_dir = Path(output_dir)
    newest: dict[str, tuple[float, Path]] = {}
    for manifest_path in sorted(output_dir.glob(f"*/{ONNX_DIR}/{MANIFEST_FILE}")):
        try:
            manifest = json.loads(manifest_path.read_text())
            kind = manifest["model"]["kind"]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("skipping %s: %s", manifest_path, e)
            continue
        if manifest.get("verified") is not True:
            log.warning("skipping %s: not verified", manifest_path.parent)
            continue
        mtime = manifest_path.stat().st_mtime
        if kind not in newest or mtime > newest[kind][0]:
            newest[kind] = (mtime, manifest_path.parent.parent)
    return {kind: run_dir for kind, (_, run_dir) in sorted(newest.items())}


# ---------------------------------------------------------------- export and verify


@dataclass
class ExportResult:
    run_dir: Path
    onnx_dir: Path  # RUN/onnx when verified, RUN/onnx-failed otherwise
    report: Report
    manifest: dict[str, Any]

    @property
    def verified(self) -> bool:
        return self.report.passed


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
    with files.one_writer(run_dir / ONNX_DIR, f"the export of {run_dir}", "wait for it to end"):
        model, record = artifacts.load_model(model_path)
        specs = vae_specs(model, atol)
        vers = versions()
        recorded = recorded_test_images(run_dir, record)
        final = run_dir / ONNX_DIR
        files.restore_moved_aside(run_dir / FAILED_DIR)
        refuse_what_is_not_an_export(run_dir)
        staging = None
        try:
            with files.writing(run_dir):
                staging = files.new_staging(final)  # also puts back an export a kill left aside
            for spec in specs:
                metadata = onnx_metadata(spec, record, opset, vers)
                with files.writing(staging / spec.filename):
                    export_submodel(model, spec, staging / spec.filename, opset, metadata)
            report = verify_export(staging, model, record, atol, data_root, elbo_tol=elbo_tol, recorded_images=recorded)
            manifest = manifest_lib.new_manifest(run_dir, model_path, record, opset, vers)
            manifest = manifest_lib.record_verification(manifest, staging, specs, report.to_dict())
            section, operators = {}, None
            if report.passed:  # variants are made from verified fp32 files only
                section = make_variants(staging, model, record, variants, quality_budget, data_root, fp32_report=report)
                operators = write_operator_config(staging, section)
            manifest = manifest_lib.record_variants(manifest, section, quality_budget, operators)
            with files.writing(staging / MANIFEST_FILE):
                manifest_lib.write_manifest(staging, manifest)
            if not report.passed:
                final = run_dir / FAILED_DIR
            with files.writing(final):
                files.publish(staging, final)
        except BaseException as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            found = None if isinstance(e, files.WriteError) else files.failure_reason(e, run_dir)
            if not isinstance(e, files.WriteError) and not (found and found[1]):  # only a full disk, found anywhere
                raise
            raise _export_not_written(run_dir, staging or final, e) from None
        if report.passed:
            shutil.rmtree(run_dir / FAILED_DIR, ignore_errors=True)  # superseded by a good export
            log.info("export of %s verified: %s", run_dir, final)
        else:
            log.error("export of %s failed verification; files kept in %s", run_dir, final)
        return ExportResult(run_dir, final, report, manifest)


def refuse_what_is_not_an_export(run_dir: Path) -> None:
    """RUN/onnx and RUN/onnx-failed are replaced whole: only an earlier export may be there."""
    for folder in (run_dir / ONNX_DIR, run_dir / FAILED_DIR):
        if folder.exists() and not (folder / MANIFEST_FILE).is_file() and not files.moved_aside(folder):
            raise UserError(f"{folder} exists and is not an export (no {MANIFEST_FILE}); move it away first")


def recorded_test_images(run_dir: Path, record: ModelRecord) -> int | None:
    """How many test images training's recorded -ELBO (the model file's test_neg_elbo) was measured
    on: the model file's own record when it has one, else that of the run's metrics line holding
    the same figure; None when neither says (a model file copied without its run)."""
    if record.test_images is not None:
        return record.test_images
    recorded = record.test_neg_elbo
    try:
        lines = files.read_jsonl(run_dir / runs.METRICS_FILE)
    except (OSError, ValueError):  # a damaged log only costs the figure's context
        return None
    for line in reversed(lines):
        if recorded is not None and line.get("test_neg_elbo") == recorded and isinstance(line.get("test_images"), int):
            return line["test_images"]
    return None


# ---------------------------------------------------------------- a full disk


def _export_not_written(run_dir: Path, staging: Path, error: BaseException) -> files.WriteError:
    """The one line for an export stopped by a failed write: which file, and that nothing else changed."""
    if isinstance(error, files.WriteError):
        path, reason, no_room = error.path, error.reason, error.no_room
    else:
        reason, no_room, cause = files.failure_reason(error, run_dir)
        path = Path(os.fsdecode(cause.filename)) if cause is not None and cause.filename else None
    if path is not None and path.is_relative_to(staging):  # the staging folder is not the user's business
        name = path.relative_to(staging).as_posix()
        what = f"{name} of the new export of {run_dir}" if name != "." else f"the new export of {run_dir}"
    else:
        what = str(path) if path is not None else f"a file while exporting {run_dir}"
    previous = run_dir / ONNX_DIR
    kept = f"the previous export in {previous} is untouched" if previous.is_dir() else "nothing was exported"
    todo = "free some space (or raise the quota or file size limit)" if no_room else "make the folder writable"
    return files.WriteError(f"cannot write {what} ({reason}); {kept}; {todo} and run the export again", path, reason,
                            no_room)


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
    with files.one_writer(run_dir / ONNX_DIR, f"the export of {run_dir}", "wait for it to end"):
        onnx_dir = run_dir / ONNX_DIR
        files.restore_moved_aside(onnx_dir)
        if not onnx_dir.is_dir():
            raise UserError(f"{onnx_dir} not found; export the run first (vae-dist export {run_dir})")
        model, record = artifacts.load_model(model_path)
        specs = vae_specs(model, atol)
        recorded = recorded_test_images(run_dir, record)
        report = verify_export(onnx_dir, model, record, atol, data_root, elbo_tol=elbo_tol, recorded_images=recorded)
        previous, rebuilt = _previous_manifest(run_dir, model_path, record, onnx_dir, specs)
        if not rebuilt and previous.get("source", {}).get("sha256") != manifest_lib.file_record(model_path)["sha256"]:
            report.checks.insert(
                0, Check("", "source", False, f"{model_path.name} changed since the export; export the run again")
            )
        manifest = manifest_lib.record_verification(previous, onnx_dir, specs, report.to_dict())
        try:
            if manifest.get("variants"):
                budget = manifest.get("quality_budget", QUALITY_BUDGET) if quality_budget is None else quality_budget
                section = reverify_variants(
                    onnx_dir, model, record, manifest["variants"], budget, data_root, fp32_report=report
                )
                operators = write_operator_config(onnx_dir, section) if rebuilt else manifest.get("required_operators")
                manifest = manifest_lib.record_variants(manifest, section, budget, operators)
            with files.writing(onnx_dir / MANIFEST_FILE):
                manifest_lib.write_manifest(onnx_dir, manifest)
        except files.WriteError as e:  # both files are replaced whole, so the old ones are still there
            raise files.WriteError(
                f"{e} while recording the verdict; {onnx_dir} is as it was; "
                + ("free some space (or raise the quota or file size limit)" if e.no_room else "make it writable")
                + " and run verify again",
                e.path,
                e.reason,
                e.no_room,
            ) from None
        if report.passed:  # the verdict comes last, after every check including the source's
            log.info("%s verified", onnx_dir)
        else:
            log.error("%s failed %d check(s)", onnx_dir, len(report.failures()))
        return report, onnx_dir


def _previous_manifest(
    run_dir: Path, model_path: Path, record: ModelRecord, onnx_dir: Path, specs
) -> tuple[dict[str, Any], bool]:
    """The export's manifest, or one rebuilt when it is missing or damaged (and whether it was)."""
    try:
        previous = manifest_lib.read_manifest(onnx_dir)
    except manifest_lib.ManifestError as e:  # a damaged manifest is rebuilt; the verdict is what counts
        log.warning("%s; writing a new one", e)
        previous = None
    if previous is not None:
        return previous, False
    opset = _opset_of(onnx_dir / specs[0].filename)
    rebuilt = manifest_lib.new_manifest(run_dir, model_path, record, opset, versions())
    # The variants' records are gone with the old manifest: those whose files are here are judged
    # again (how they were made cannot be re-derived), so no file is left unlisted.
    found = {
        v.name: manifest_lib.variant_entry(v)
        for v in variants_lib.select(None, record.kind)
        if all((onnx_dir / v.filename(role)).is_file() for role in ("encoder", "decoder"))
    }
    return manifest_lib.record_variants(rebuilt, found, QUALITY_BUDGET, None), True


def _opset_of(path: Path) -> int | None:
    import onnx

    try:
        return opset_of(onnx.load(str(path), load_external_data=False))
    except Exception:  # a damaged file: the verification above has already said so
        return None


# ---------------------------------------------------------------- the variants


def make_variants(
    onnx_dir: Path,
    model: VAE,
    record: ModelRecord,
    names: Iterable[str] | None = None,
    budget: float = QUALITY_BUDGET,
    data_root: str | Path | None = None,
    fp32_report: Report | None = None,
) -> dict[str, Any]:
    """Make, check and judge the variants `names` (all that apply when None) beside the verified
    fp32 files in `onnx_dir`; the manifest's "variants" section."""
    onnx_dir = Path(onnx_dir)
    chosen = variants_lib.select(names, record.kind)
    if not chosen:
        return {}
    reference = _reference(model, record, data_root, fp32_report)
    calibration: dict[str, np.ndarray] | None = None
    section: dict[str, Any] = {}
    for variant in chosen:
        entry = manifest_lib.variant_entry(variant)
        section[variant.name] = entry
        source = section.get(variant.source, {}).get("status") if variant.source != FP32 else "verified"
        if source not in ("verified", "rejected"):  # a rejected source still makes a usable copy
            manifest_lib.record_failure(entry, f"made from {variant.source}, which could not be made")
            continue
        try:
            if variant.calibrated and calibration is None:
                count = variant.options["calibration_images"]
                calibration = variants_lib.calibration_inputs(model, record, count, data_root)
            manifest_lib.record_production(entry, _produce(onnx_dir, variant, calibration))
        except files.WriteError:  # a full disk stops the export: the variant itself is not at fault
            raise
        except Exception as e:  # the tools raise anything from ValueError to onnxruntime's own types
            log.warning("variant %s could not be made: %s", variant.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            for role in ("encoder", "decoder"):
                (onnx_dir / variant.filename(role)).unlink(missing_ok=True)
            manifest_lib.record_failure(entry, f"production: {type(e).__name__}: {e}".splitlines()[0])
            continue
        _judge(entry, onnx_dir, variant, model, record, reference, budget)
    return section


def reverify_variants(
    onnx_dir: Path,
    model: VAE,
    record: ModelRecord,
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
    reference = _reference(model, record, data_root, fp32_report)
    updated = dict(section)
    for name, entry in todo.items():
        entry = dict(entry)
        updated[name] = entry
        variant = VARIANTS.get(name)
        if variant is None:
            manifest_lib.record_rejection(entry, f"unknown variant {name!r}; export the run again")
            continue
        _judge(entry, onnx_dir, variant, model, record, reference, budget)
    return updated


def write_operator_config(onnx_dir: Path, section: dict[str, Any]) -> dict[str, Any] | None:
    """required_operators.config for a minimal onnxruntime build running this folder's ORT files."""
    ort_files = sorted(
        onnx_dir / name
        for variant, entry in section.items()
        if VARIANTS[variant].format == "ort" and entry.get("status") in ("verified", "rejected")
        for name in entry.get("files", {})
    )
    if not ort_files:
        return None
    path = onnx_dir / variants_lib.REQUIRED_OPERATORS_FILE
    try:
        with files.writing(path):
            variants_lib.write_required_operators(ort_files, path)
    except files.WriteError:
        raise
    except Exception as e:  # informational only: never worth failing the export over
        log.warning("could not write %s: %s", path.name, e)
        return None
    return manifest_lib.operators_record(path, ort_files)


def _reference(model: VAE, record: ModelRecord, data_root, fp32_report: Report | None) -> Reference:
    images = load_test_images(model, record, data_root)
    if fp32_report is not None and fp32_report.elbo and "recon_mse_torch" in fp32_report.elbo:
        return Reference.from_elbo(fp32_report.elbo, model, images)
    return Reference.compute(model, record, images)


def _produce(onnx_dir: Path, variant: VariantSpec, calibration: dict[str, np.ndarray] | None) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {}
    for role in ("encoder", "decoder"):
        source = onnx_dir / (f"{role}.onnx" if variant.source == FP32 else VARIANTS[variant.source].filename(role))
        job = variants_lib.Job(
            source=source,
            target=onnx_dir / variant.filename(role),
            role=role,
            variant=variant.name,
            options=variant.options,
            calibration=calibration[role] if variant.calibrated and calibration else None,
        )
        # The tools write the target and temporary copies of about the source's size beside it.
        with files.writing(job.target, room_for=2 * source.stat().st_size):
            record[role] = variant.produce(job)
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.debug("made variant %s in %.1f s", variant.name, record["seconds"])  # its verdict is logged next
    return record


def _judge(
    entry: dict[str, Any],
    onnx_dir: Path,
    variant: VariantSpec,
    model: VAE,
    record: ModelRecord,
    reference: Reference,
    budget: float,
) -> None:
    try:
        verdict = judge(onnx_dir, variant, model, record, reference, budget)
    except Exception as e:  # a check that crashes rejects the variant, never the export
        log.warning("variant %s could not be checked: %s", variant.name, e, exc_info=log.isEnabledFor(logging.DEBUG))
        manifest_lib.record_rejection(entry, f"verification: {type(e).__name__}: {e}".splitlines()[0])
        return
    manifest_lib.record_verdict(entry, onnx_dir, variant, verdict)
    level = logging.INFO if verdict.status == "verified" else logging.WARNING
    log.log(
        level, "variant %s %s%s", variant.name, verdict.status, f": {verdict.reasons[0]}" if verdict.reasons else ""
    )
