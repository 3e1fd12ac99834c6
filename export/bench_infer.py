"""Inference benchmark of exported VAEs and their edge variants on onnxruntime's CPU provider,
against the PyTorch eager model at the same thread count, in one process.

    python -m export.bench_infer [RUN ...] [--output-dir runs] [--threads 1] [--seconds 1]
                                 [--batch-sizes 1,64] [--json bench/infer.json] [--io-binding] [--check]

Without RUN: the newest verified export of each model kind under --output-dir. For each model, each
sub-model (encoder, decoder), each file in the export's manifest (fp32 and every variant that was
made, whatever its status) and each batch size: file size, latency p50 and p90 of one call,
images/s. Each measurement is a warm-up, then --seconds of timed calls; torch and all the files
of one sub-model and batch size take turns in 50 ms slices, so that the machine's slow and fast
phases fall on all of them alike.

Both runtimes get the same fixed thread count: onnxruntime intra_op_num_threads = --threads with
inter_op_num_threads = 1 (sequential execution), torch.set_num_threads(--threads). Inputs are
random (uniform images, normal latents): the timings do not depend on the values. onnxruntime is
called with session.run(output_names, feed), or with --io-binding through IOBinding with
preallocated outputs (what a C/C++ deployment does; it saves the per-call output allocation).

Targets, each reported as passed or missed in the output and the JSON (see TARGETS):
    batch 1, onnxruntime fp32 linear decoder p50 <= 0.5 x PyTorch eager's
    batch 1, onnxruntime fp32 CNN decoder p50 <= 1.0 x PyTorch eager's
    every int8 decoder file <= 30% of the fp32 decoder file
    every int8 variant's quality cost within the export's budget (from the manifest)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnxruntime as ort
import torch

from export.cli import newest_note
from export.manifest import read_manifest
from export.pipeline import find_latest_exports, resolve_run
from export.spec import ONNX_DIR, SubModelSpec, vae_specs
from export.variants import FP32, VARIANTS
from vae_dist import artifacts, files, paths
from vae_dist.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "vae-dist-bench-infer/1"
ROLES = ("encoder", "decoder")
INT8 = ("int8-dynamic", "int8-static")
# (model kind, largest onnxruntime/torch p50 ratio) for the fp32 decoder at batch 1
LATENCY_TARGETS = (("linear", 0.5), ("conv", 1.0))
INT8_SIZE_TARGET = 0.30  # int8 decoder file / fp32 decoder file
OPTIMIZATION_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
TORCH = "torch-eager"
SLICE_SECONDS = 0.05  # candidates take turns this long (see time_interleaved)


@dataclass
class Timing:
    calls: int
    seconds: float
    p50_ms: float
    p90_ms: float
    images_per_s: float


def time_interleaved(
    calls: dict[str, Callable[[], Any]], batch: int, seconds: float, warmup: float, slice_seconds: float = SLICE_SECONDS
) -> dict[str, Timing]:
    """Time every call in `calls` for `seconds` each, timing every call separately.

    The candidates take turns in slices of `slice_seconds`, so that a slow phase of the machine
    (another tenant on the host, a frequency change) lands on all of them rather than on
    whichever ran at the time: the ratios between them are what the targets judge. Each gets
    a warm-up of `warmup` seconds (at least 3 calls) first.
    """
    for call in calls.values():
        started = time.perf_counter()
        for i in range(1_000_000):
            call()
            if i >= 2 and time.perf_counter() - started >= warmup:
                break
    durations: dict[str, list[int]] = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call is noise, not inference cost
    try:
        while min(spent.values()) < seconds or min(len(d) for d in durations.values()) < 3:
            for name, call in calls.items():
                times, started = durations[name], time.perf_counter()
                while True:
                    t0 = time.perf_counter_ns()
                    call()
                    times.append(time.perf_counter_ns() - t0)
                    if time.perf_counter() - started >= min(slice_seconds, seconds):
                        break
                spent[name] += time.perf_counter() - started
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _timing(times, batch) for name, times in durations.items()}


def _timing(durations_ns: list[int], batch: int) -> Timing:
    ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
    total = ms.sum() / 1e3
    return Timing(
        len(ms), float(total), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), batch * len(ms) / total
    )


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVEL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_call(
    session: ort.InferenceSession, spec: SubModelSpec, inputs: np.ndarray, io_binding: bool
) -> Callable[[], Any]:
    """One inference as a deployment would call it: output names given once (looking them up on
    every call costs microseconds at batch 1), or with `io_binding` the input bound once and the
    outputs written into preallocated buffers, so no output array is made per call."""
    if not io_binding:
        feed, names = {spec.inputs[0].name: inputs}, spec.output_names
        return lambda: session.run(names, feed)
    binding = session.io_binding()
    binding.bind_ortvalue_input(spec.inputs[0].name, ort.OrtValue.ortvalue_from_numpy(inputs))
    for t in spec.outputs:
        binding.bind_ortvalue_output(
            t.name, ort.OrtValue.ortvalue_from_shape_and_type(t.shape_for(len(inputs)), np.float32)
        )
    return lambda: session.run_with_iobinding(binding)


def used_parameter_bytes(module: torch.nn.Module, example: torch.Tensor) -> int:
    """Bytes of the parameters a forward pass of `module` touches (the encoder or decoder part of the VAE)."""
    used: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: used.update(id(p) for p in m.parameters(recurse=False)))
        for m in module.modules()
    ]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) in used)


# ---------------------------------------------------------------- one model


def export_files(onnx_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """fp32 and every variant whose files exist: name, format, status, files by role, quality."""
    status = "verified" if manifest.get("verified") is True else "unverified"
    entries = [
        {"variant": FP32, "format": "onnx", "status": status, "files": {r: f"{r}.onnx" for r in ROLES}, "quality": None}
    ]
    for name, entry in (manifest.get("variants") or {}).items():
        spec = VARIANTS.get(name)
        if spec is None or entry.get("status") == "failed":
            continue
        exported = {r: spec.filename(r) for r in ROLES}
        if all((onnx_dir / f).is_file() for f in exported.values()):
            entries.append(
                {
                    "variant": name,
                    "format": spec.format,
                    "status": entry.get("status"),
                    "files": exported,
                    "quality": entry.get("quality"),
                }
            )
    return entries


def bench_run(
    run_dir: Path, threads: int, batch_sizes: list[int], seconds: float, warmup: float, io_binding: bool = False
) -> dict[str, Any]:
    """Every file of one export, and the torch model, at every batch size."""
    run_dir, model_path = resolve_run(run_dir)
    onnx_dir = run_dir / ONNX_DIR
    manifest = read_manifest(onnx_dir)
    if manifest is None:
        raise UserError(f"{onnx_dir} holds no export; run `vae-dist export {run_dir}` first")
    model, record = artifacts.load_model(model_path)
    kind = record.kind
    exported = export_files(onnx_dir, manifest)
    rng = np.random.default_rng(0)
    rows = []
    for spec in vae_specs(model):
        module = spec.wrap(model).eval()
        shape = spec.inputs[0].shape_for(max(batch_sizes))
        pool = (
            rng.random(shape, dtype=np.float32)
            if spec.role == "encoder"
            else rng.standard_normal(shape, dtype=np.float32)
        )
        param_bytes = used_parameter_bytes(module, torch.from_numpy(pool[:1]))
        sessions = {f["variant"]: ort_session(onnx_dir / f["files"][spec.role], threads) for f in exported}
        for batch in batch_sizes:
            inputs = np.ascontiguousarray(pool[:batch])
            x = torch.from_numpy(inputs)
            base = {"kind": kind, "run": run_dir.name, "role": spec.role, "batch": batch}

            calls = {TORCH: lambda module=module, x=x: module(x)}
            calls.update({name: ort_call(sess, spec, inputs, io_binding) for name, sess in sessions.items()})
            with torch.inference_mode():  # entered once: its own cost is not the model's
                timings = time_interleaved(calls, batch, seconds, warmup)
            rows += timing_rows(base, timings, exported, onnx_dir, spec.role, param_bytes)
            log.info("%s %s batch %d done", kind, spec.role, batch)
    quality = {f["variant"]: {"status": f["status"], **(f["quality"] or {})} for f in exported if f["variant"] != FP32}
    return {
        "model": {
            "kind": kind,
            "run": run_dir.name,
            "onnx_dir": str(onnx_dir),
            "quality_budget": manifest.get("quality_budget"),
        },
        "rows": rows,
        "quality": quality,
    }


def timing_rows(
    base: dict[str, Any], timings: dict, exported: list[dict[str, Any]], onnx_dir: Path, role: str, param_bytes: int
) -> list[dict[str, Any]]:
    """The rows of one sub-model at one batch size: torch eager, then every file of the export."""
    torch_p50 = timings[TORCH].p50_ms
    rows = [
        {
            **base,
            "variant": TORCH,
            "runtime": "torch",
            "format": "torch",
            "status": None,
            "file": None,
            "size_bytes": param_bytes,
            **asdict(timings[TORCH]),
            "vs_torch": 1.0,
        }
    ]
    for f in exported:
        path, timing = onnx_dir / f["files"][role], timings[f["variant"]]
        rows.append(
            {
                **base,
                "variant": f["variant"],
                "runtime": "onnxruntime",
                "format": f["format"],
                "status": f["status"],
                "file": path.name,
                "size_bytes": path.stat().st_size,
                **asdict(timing),
                "vs_torch": torch_p50 / timing.p50_ms,
            }
        )
    return rows


# ---------------------------------------------------------------- targets


def evaluate_targets(models: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets (see the module's docstring), each with the measured value, its limit and a
    verdict (None: not measured)."""

    def row(kind, variant, batch=1, role="decoder"):
        return next(
            (r for r in rows if (r["kind"], r["variant"], r["batch"], r["role"]) == (kind, variant, batch, role)), None
        )

    targets = []
    for kind, limit in LATENCY_TARGETS:
        name = f"{kind} decoder, batch 1: onnxruntime fp32 p50 <= {limit:g} x PyTorch eager p50"
        ours, theirs = row(kind, FP32), row(kind, TORCH)
        if ours is None or theirs is None:
            targets.append(_target(name, kind, FP32, None, limit, f"not measured (no {kind} export, or no batch 1)"))
            continue
        ratio = ours["p50_ms"] / theirs["p50_ms"]
        detail = f"{ours['p50_ms'] * 1e3:.1f} us vs {theirs['p50_ms'] * 1e3:.1f} us: {ratio:.2f} x"
        targets.append(_target(name, kind, FP32, ratio, limit, detail))
    for model in models:
        kind, budget = model["model"]["kind"], model["model"]["quality_budget"]
        fp32 = next((r for r in rows if (r["kind"], r["variant"], r["role"]) == (kind, FP32, "decoder")), None)
        for variant in INT8:
            if variant not in model["quality"]:
                continue
            r = next((r for r in rows if (r["kind"], r["variant"], r["role"]) == (kind, variant, "decoder")), None)
            if r is not None and fp32 is not None:
                share = r["size_bytes"] / fp32["size_bytes"]
                targets.append(
                    _target(
                        f"{kind} {variant} decoder file <= {INT8_SIZE_TARGET:.0%} of fp32's",
                        kind,
                        variant,
                        share,
                        INT8_SIZE_TARGET,
                        f"{r['size_bytes']:,} of {fp32['size_bytes']:,} bytes: {share:.1%}",
                    )
                )
            q = model["quality"][variant]
            change = q.get("neg_elbo_change")
            name = f"{kind} {variant} quality: |test -ELBO change| <= budget"
            if change is None or budget is None:
                targets.append(_target(name, kind, variant, None, budget, f"not measured (status {q.get('status')})"))
            else:
                targets.append(
                    _target(name, kind, variant, abs(change), budget, f"{change:+.4f} nats, budget {budget:g}")
                )
    return targets


def _target(
    name: str, kind: str, variant: str, measured: float | None, limit: float | None, detail: str
) -> dict[str, Any]:
    passed = None if measured is None or limit is None else bool(measured <= limit)
    return {
        "name": name,
        "kind": kind,
        "variant": variant,
        "measured": measured,
        "limit": limit,
        "passed": passed,
        "detail": detail,
    }


# ---------------------------------------------------------------- output


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        f"{'model':<7} {'part':<8} {'variant':<17} {'status':<9} {'size':>9} {'batch':>5} "
        f"{'p50 ms':>9} {'p90 ms':>9} {'images/s':>10} {'vs torch':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.2f} MB" + ("*" if r["runtime"] == "torch" else " ")
        lines.append(
            f"{r['kind']:<7} {r['role']:<8} {r['variant']:<17} {r['status'] or '':<9} {size:>9} {r['batch']:>5} "
            f"{r['p50_ms']:>9.4f} {r['p90_ms']:>9.4f} {r['images_per_s']:>10,.0f} {r['vs_torch']:>7.2f}x"
        )
    lines.append("* torch-eager: bytes of the parameters the part uses (float32), not a file")
    return lines


def quality_lines(models: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'model':<7} {'variant':<17} {'status':<9} {'-ELBO change':>13} {'recon MSE change':>17}"]
    for model in models:
        for variant, q in model["quality"].items():
            elbo = f"{q['neg_elbo_change']:+.4f}" if "neg_elbo_change" in q else "-"
            mse = f"{q['recon_mse_change']:+.2e}" if "recon_mse_change" in q else "-"
            lines.append(f"{model['model']['kind']:<7} {variant:<17} {q.get('status') or '':<9} {elbo:>13} {mse:>17}")
    return lines


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or sizes[0] < 1:
        raise click.BadParameter("batch sizes must be at least 1")
    return sizes


@click.command()
@click.argument("runs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=paths.runs_dir,
    show_default="$VAE_DIST_RUNS or runs",
    help="Folder of runs: without RUN, the newest verified export of each model kind in it is benchmarked.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads for both onnxruntime (intra-op) and torch.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Timed loop per measurement (after the warm-up).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Warm-up per measurement, in seconds (at least 3 calls).",
)
@click.option("--batch-sizes", default="1,64", show_default=True, callback=_batch_sizes)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench/infer.json"),
    show_default=True,
)
@click.option(
    "--io-binding",
    is_flag=True,
    help="Call onnxruntime through IOBinding (input bound once, outputs preallocated) instead of session.run.",
)
@click.option("--check", is_flag=True, help="Exit with status 1 when a target is missed.")
def main(runs, output_dir, threads, seconds, warmup, batch_sizes, json_path, io_binding, check):
    """Benchmark exported VAEs and their edge variants on onnxruntime CPU against PyTorch eager."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    try:
        files.check_json_output(json_path, FORMAT)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    latest = {} if runs else find_latest_exports(output_dir)
    targets = list(runs) or list(latest.values())
    if latest:
        click.echo(newest_note("verified export", latest, output_dir), err=True)
    if not targets:
        click.echo(
            f"error: no verified export under {output_dir}/; run `vae-dist export --output-dir {output_dir}` first",
            err=True,
        )
        sys.exit(2)
    torch.set_num_threads(threads)
    models = []
    for run in targets:
        try:
            models.append(bench_run(run, threads, batch_sizes, seconds, warmup, io_binding))
        except UserError as e:
            click.echo(f"error: {run}: {e}", err=True)
            sys.exit(2)
    rows = [r for m in models for r in m["rows"]]
    verdicts = evaluate_targets(models, rows)
    result = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m export.bench_infer", *sys.argv[1:]]),
        "machine": machine(),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "settings": {
            "threads": threads,
            "inter_op_threads": 1,
            "seconds": seconds,
            "warmup_seconds": warmup,
            "batch_sizes": batch_sizes,
            "graph_optimization_level": OPTIMIZATION_LEVEL.name,
            "onnxruntime_call": "run_with_iobinding" if io_binding else "run",
            "torch_threads": torch.get_num_threads(),
        },
        "models": [m["model"] for m in models],
        "results": rows,
        "quality": {m["model"]["kind"]: m["quality"] for m in models},
        "targets": verdicts,
    }
    print_result(result, models, rows, verdicts)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    click.echo(f"written to {json_path}")
    if check and any(t["passed"] is False for t in verdicts):
        sys.exit(1)


def print_result(result: dict[str, Any], models: list[dict[str, Any]], rows, verdicts) -> None:
    """The benchmark's report: the machine, the table, the quality costs, the targets."""
    m, settings = result["machine"], result["settings"]
    click.echo(
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs; onnxruntime {ort.__version__}, torch {torch.__version__}; "
        f"{settings['threads']} thread(s), {settings['seconds']:g} s per measurement, onnxruntime via "
        f"{settings['onnxruntime_call']}"
    )
    for line in table_lines(rows):
        click.echo(line)
    click.echo("\nquality cost against fp32 torch, whole test split (from the manifests):")
    for line in quality_lines(models):
        click.echo(line)
    click.echo("\ntargets:")
    for t in verdicts:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["passed"]]
        click.echo(f"  {verdict} {t['name']}: {t['detail']}")


if __name__ == "__main__":
    main()
