"""`vae-dist runs`: one line per run in a runs folder, read from the files each run holds (its
config.yaml, metrics.jsonl, model file, eval.jsonl and export manifest); nothing is written."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from vae_dist import files, runs
from vae_dist.errors import UserError
from vae_dist.record import read as read_record

COLUMNS = (  # (header, key in a summary, how it is shown)
    ("run", "name", str),
    ("model", "kind", str),
    ("data", "dataset", lambda v: Path(v).name if v else "?"),
    ("shape", "image_shape", lambda v: "x".join(map(str, v)) if v else "?"),
    ("epochs", "epochs", str),
    ("test -ELBO", "test_neg_elbo", lambda v: f"{v:.2f}" if v is not None else "-"),
    ("bits/dim", "test_bits_per_dim", lambda v: f"{v:.4f}" if v is not None else "-"),
    ("best NLL (K)", "best_nll", lambda v: f"{v['nll']:.2f} ({v['k']})" if v else "-"),
    ("export", "export", str),
    ("finished", "state", str),
    ("last written", "time", str),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_status(run_dir: Path) -> tuple[str, list[str]]:
    """"verified", "FAILED", "damaged", "set aside ..." or "-" (none), and the variants the manifest
    accepted."""
    manifest_path = run_dir / runs.ONNX_DIR / runs.MANIFEST_FILE
    if not manifest_path.is_file():  # an export a kill left aside comes back with the next verify
        return ("set aside (vae-dist verify puts it back)" if files.moved_aside(run_dir / runs.ONNX_DIR) else "-"), []
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        return "damaged", []
    variants = manifest.get("variants") or {}
    accepted = [name for name, v in variants.items() if isinstance(v, dict) and v.get("status") == "verified"]
    return ("verified" if manifest.get("verified") is True else "FAILED"), accepted


def summarize(run_dir: Path) -> dict[str, Any] | None:
    """What a run folder says about itself, or None when it is not a run (no config.yaml, no model)."""
    config_path, model_path = run_dir / runs.CONFIG_FILE, run_dir / runs.MODEL_FILE
    if not config_path.is_file() and not model_path.is_file():
        return None
    try:
        saved = runs.read_saved_config(run_dir) if config_path.is_file() else {}
    except UserError:
        saved = {}
    record, damaged = None, None
    if model_path.is_file():
        try:
            record = read_record(model_path)
        except UserError as e:  # listed all the same, marked, with the reason in --json
            damaged = str(e)
    model_cfg, data_cfg, train_cfg = (saved.get(k) or {} for k in ("model", "data", "train"))
    try:
        metrics = files.read_jsonl(run_dir / runs.METRICS_FILE)
    except ValueError:
        metrics = []
    try:
        evals = [r for r in files.read_jsonl(run_dir / runs.EVAL_FILE) if isinstance(r.get("nll"), (int, float))]
    except ValueError:
        evals = []
    best = min(evals, key=lambda r: r["nll"], default=None)
    planned = train_cfg.get("epochs", record.epochs if record else None)
    done = len({r.get("epoch") for r in metrics})
    status, variants = _export_status(run_dir)
    finished = record is not None and planned is not None and done >= planned
    present = [
        p for p in (config_path, model_path, run_dir / runs.METRICS_FILE, run_dir / runs.EVAL_FILE) if p.exists()
    ]
    newest = max((p.stat().st_mtime for p in present), default=run_dir.stat().st_mtime)
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "kind": record.kind if record else model_cfg.get("kind", "?"),
        "dataset": (record and record.dataset) or data_cfg.get("path") or data_cfg.get("name"),
        "image_shape": list(record.image_shape) if record else _shape_of(data_cfg),
        "epochs_done": done,
        "epochs_planned": planned,
        "epochs": f"{done}/{planned if planned is not None else '?'}",
        "test_neg_elbo": metrics[-1].get("test_neg_elbo") if metrics else record and record.test_neg_elbo,
        "test_bits_per_dim": metrics[-1].get("test_bits_per_dim") if metrics else None,
        "best_nll": {"nll": best["nll"], "k": best.get("k"), "split": best.get("split")} if best else None,
        "export": status + (f" ({', '.join(variants)})" if variants else ""),
        "export_verified": status == "verified",
        "variants": variants,
        "finished": finished,
        "state": "damaged" if damaged else "yes" if finished else "no",  # the table's "finished" column
        "damaged": damaged,  # why the model file cannot be read, or None
        "time": datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M"),
        "mtime": newest,
    }


def _shape_of(data_cfg: dict[str, Any]) -> list[int] | None:
    """A run still training has no model file: the dataset.json of its prepared dataset (its
    data.path, or the built-in set prepared under the data folder) says its image shape."""
    from vae_dist.data import builtin, prepared

    if data_cfg.get("root"):
        return None  # a user's IDX folder, read in place: not opened for a listing
    folder = Path(data_cfg["path"]) if data_cfg.get("path") else builtin.prepared_folder(str(data_cfg.get("name")))
    info = _read_json(folder / prepared.INFO_FILE)
    return info.get("shape") if isinstance(info, dict) else None


def summaries(folder: Path) -> list[dict[str, Any]]:
    """Every run in `folder`, oldest first (by the newest file each holds)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of runs; give one with --output-dir")
    found = [s for p in folder.iterdir() if p.is_dir() and (s := summarize(p)) is not None]
    return sorted(found, key=lambda s: (s["mtime"], s["name"]))


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[header for header, _, _ in COLUMNS]] + [[show(r[key]) for _, key, show in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


@click.command("runs")
@click.option("--output-dir", help="Folder of runs (default $VAE_DIST_RUNS or ./runs).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the runs, for scripts.")
def runs_command(output_dir, as_json):
    """List the runs in a folder: model, data, epochs, test -ELBO, best NLL, export, finished."""
    from vae_dist import paths

    folder = Path(output_dir) if output_dir else paths.runs_dir()
    try:
        rows = summaries(folder)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "mtime"} for r in rows], indent=1))
    elif rows:
        click.echo(table(rows))
    else:
        click.echo(f"no runs in {folder}")
