"""Finding runs: a run directory from a path, the latest run of each model kind, and the latest
export of each model kind."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from vae_dist import artifacts

log = logging.getLogger(__name__)


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, model file) for a run directory or for its model file."""
    path = Path(path)
    if path.is_file():
        return path.parent, path
    if path.is_dir():
        model_path = path / artifacts.MODEL_FILE
        if model_path.is_file():
            return path, model_path
        raise FileNotFoundError(f"{path} holds no {artifacts.MODEL_FILE}; is it a finished run (runs/NAME)?")
    raise FileNotFoundError(f"run {str(path)!r} not found")


def find_latest_runs(output_dir: str | Path) -> dict[str, Path]:
    """The newest run of each model kind under `output_dir`, as {kind: run directory}.

    The kind comes from the model file's own metadata, not from the folder name (runs may be
    named anything); "newest" is the model file's modification time, i.e. when training ended.
    Files that are not vae-dist models are skipped with a warning.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return {}
    newest: dict[str, tuple[float, Path]] = {}
    for model_path in sorted(output_dir.glob(f"*/{artifacts.MODEL_FILE}")):
        try:
            kind = artifacts.read_model_metadata(model_path)["model"]["kind"]
        except Exception as e:  # a half-written or foreign file must not stop the others
            log.warning("skipping %s: %s", model_path, e)
            continue
        mtime = model_path.stat().st_mtime
        if kind not in newest or mtime > newest[kind][0]:
            newest[kind] = (mtime, model_path.parent)
    return {kind: run_dir for kind, (_, run_dir) in sorted(newest.items())}


def find_latest_exports(output_dir: str | Path, onnx_dir: str = "onnx") -> dict[str, Path]:
    """The run with the newest verified export of each model kind under `output_dir`, as
    {kind: run directory}; "newest" is the manifest's modification time (the last export or verify)."""
    output_dir = Path(output_dir)
    newest: dict[str, tuple[float, Path]] = {}
    for manifest_path in sorted(output_dir.glob(f"*/{onnx_dir}/manifest.json")):
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
