"""The benchmark of the loop users run (part of `make bench`, see vae_dist.bench): whole training
runs of the linear VAE on Fashion-MNIST started as a user starts them, through `vae-dist train` and
through `accelerate launch`, and where an epoch's time goes.

1. `entry_point_runs`: each entry point trains a new run for a few epochs in a new process, the two
   taking turns over the rounds. From each: the seconds from the start of the command to its first
   optimizer step (imports, data, model, the launcher), the images/s of its epochs' step loops
   (metrics.jsonl: data, noise and the trackers' step figures included), and the whole command.
   Both on the CPU, as the rest of the benchmark.
2. `epoch_phases`: the same training in this process, with the work of an epoch timed phase by
   phase (the steps, evaluation of the test split, the grids, the grids sent to the trackers,
   curves.png, the tracker flush, the checkpoint; "other" is the rest); what an epoch spends
   besides its steps is the share the goal bounds (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from vae_dist import files, runs, tracking, training
from vae_dist.config import load_config, shipped_config
from vae_dist.step import FIRST_STEP_MESSAGE

CONFIG = "linear"  # the shipped config the runs train (on its data set, Fashion-MNIST)
ENTRY_POINTS = ("vae-dist train", "accelerate launch")
TRAIN_SCRIPT = Path(training.__file__).with_name("train.py")  # what `accelerate launch` starts
# Where an epoch's time goes: (module, function, phase), each timed wherever the loop calls it.
PHASES = (
    (training, "run_steps", "steps"),
    (training, "test_elbo", "evaluation"),
    (training, "write_grids", "grids"),
    (tracking, "write_curves", "curves.png"),
    (tracking, "log_images", "tracker images"),
    (tracking, "flush", "tracker flush"),
    (runs, "save_checkpoint", "checkpoint"),
)


def entry_command(entry: str, out: Path, name: str, epochs: int) -> list[str]:
    """The command a user types for `entry`, with the run's folder, name and epochs."""
    args = ["--config", CONFIG, "--output-dir", str(out), "--name", name, "--set", f"train.epochs={epochs}", "--cpu"]
    if entry == "vae-dist train":
        return [sys.executable, "-m", "vae_dist.cli", "train", *args]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    return [*launcher, str(TRAIN_SCRIPT), *args]


def timed_run(entry: str, epochs: int, timeout: float = 900.0) -> dict[str, Any]:
    """One new run through `entry`: seconds to its first step and in all, and its epochs' figures."""
    with tempfile.TemporaryDirectory(prefix="vae-dist-bench-") as tmp:
        out = Path(tmp)
        cmd = entry_command(entry, out, "run", epochs)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stamped: queue.Queue[tuple[float, str]] = queue.Queue()

        def read():
            for line in proc.stderr:
                stamped.put((time.perf_counter(), line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        finally:
            proc.kill()
        seconds = time.perf_counter() - started
        reader.join(timeout=10)
        lines = list(stamped.queue)
        if code != 0:
            tail = "".join(line for _, line in lines[-5:])
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {code}:\n{tail}")
        first = next(t for t, line in lines if FIRST_STEP_MESSAGE in line)
        epochs_done = files.read_jsonl(out / "run" / runs.METRICS_FILE)
    steps_seconds = sum(e["seconds"] for e in epochs_done)
    images = sum(e["images_per_s"] * e["seconds"] for e in epochs_done)
    return {
        "entry": entry,
        "command": cmd,
        "epochs": len(epochs_done),
        "seconds_to_first_step": first - started,
        "seconds": seconds,
        "epoch_images_per_s": [e["images_per_s"] for e in epochs_done],
        "images_per_s": images / steps_seconds,  # of the epochs' step loops together
    }


def entry_point_runs(rounds: int, epochs: int) -> dict[str, Any]:
    """Both entry points, taking turns over `rounds`; medians per entry point and their ratio."""
    done = [timed_run(entry, epochs) for _ in range(rounds) for entry in ENTRY_POINTS]
    summary = {}
    for entry in ENTRY_POINTS:
        mine = [r for r in done if r["entry"] == entry]
        summary[entry] = {
            key: statistics.median(r[key] for r in mine) for key in ("seconds_to_first_step", "seconds", "images_per_s")
        }
    ratio = summary["accelerate launch"]["images_per_s"] / summary["vae-dist train"]["images_per_s"]
    return {"config": CONFIG, "epochs": epochs, "rounds": rounds, "runs": done, "median": summary,
            "launch_of_train": ratio}


@contextmanager
def phase_timer() -> Iterator[dict[str, list[tuple[float, float]]]]:
    """While open, every call of a PHASES function is timed: (start, end) per call, by phase."""
    spans: dict[str, list[tuple[float, float]]] = {label: [] for _, _, label in PHASES}

    def timed(function, label: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spans[label].append((start, time.perf_counter()))

        return wrapper

    with ExitStack() as undo:
        for module, name, label in PHASES:
            original = getattr(module, name)
            setattr(module, name, timed(original, label))
            undo.callback(setattr, module, name, original)
        yield spans


def epoch_phases(epochs: int) -> dict[str, Any]:
    """A run of `epochs` epochs in this process, as `vae-dist train` runs it (TensorBoard on), each
    epoch timed from its first step to the end of its checkpoint, and phase by phase."""
    with tempfile.TemporaryDirectory(prefix="vae-dist-bench-") as tmp:
        overrides = {"train.epochs": epochs, "train.checkpoint_every": 0, "run.output_dir": tmp, "run.name": "run"}
        cfg = load_config(shipped_config(CONFIG), overrides)  # checkpoints at epoch ends only
        started = time.perf_counter()
        with phase_timer() as spans:
            training.train(cfg, cpu=True)
        ended = time.perf_counter()
    steps, saves = spans["steps"], spans["checkpoint"]
    assert len(steps) == len(saves) == epochs, f"{len(steps)} step loops, {len(saves)} checkpoints, {epochs} epochs"
    per_epoch = []
    for (begin, _), (_, end) in zip(steps, saves):
        phases = {label: sum(b - a for a, b in calls if begin <= a < end) for label, calls in spans.items()}
        phases["other"] = (end - begin) - sum(phases.values())  # the metrics line, the log line, ...
        per_epoch.append({"seconds": end - begin, "phases": phases})
    mean = {label: statistics.mean(e["phases"][label] for e in per_epoch) for label in per_epoch[0]["phases"]}
    epoch = statistics.mean(e["seconds"] for e in per_epoch)
    return {
        "config": CONFIG,
        "epochs": epochs,
        "per_epoch": per_epoch,
        "mean_phases": mean,
        "mean_epoch_seconds": epoch,
        "non_step_share": (epoch - mean["steps"]) / epoch,
        "before_first_epoch": steps[0][0] - started,  # in this process: data, model, trackers
        "after_last_epoch": ended - saves[-1][1],  # curves.png at the end, the model file
    }


def print_runs(entry_points: dict, phases: dict, steps: list[dict]) -> None:
    """The loop users run: both entry points, side by side with the step and the classic loop, and
    where an epoch's time goes."""
    median = entry_points["median"]
    click.echo(
        f"\nthe loop users run: {entry_points['config']} on fashion-mnist, {entry_points['epochs']} epoch(s), "
        f"median of {entry_points['rounds']} new run(s) each, taken in turn"
    )
    click.echo(f"{'entry point':<18} {'to first step':>13} {'images/s':>9} {'whole run':>9}")
    for entry, m in median.items():
        click.echo(
            f"{entry:<18} {m['seconds_to_first_step']:>11.2f} s {m['images_per_s']:>9.0f} {m['seconds']:>7.2f} s"
        )
    click.echo(f"accelerate launch / vae-dist train, images/s: {entry_points['launch_of_train']:.1%} (goal >= 95%)")
    (step,) = [r for r in steps if r["model"] == entry_points["config"]]
    click.echo(
        f"images/s side by side: the step alone {step['images_per_s']:.0f} | the epochs of `vae-dist train` "
        f"{median['vae-dist train']['images_per_s']:.0f} | the classic loop {step['classic_images_per_s']:.0f}"
    )
    epoch = phases["mean_epoch_seconds"]
    click.echo(
        f"where an epoch's time goes ({phases['config']}, {phases['epochs']} epoch(s) in this process, "
        f"mean per epoch {epoch:.3f} s):"
    )
    click.echo("  " + " | ".join(
        f"{label} {seconds * 1e3:.1f} ms {seconds / epoch:.1%}" for label, seconds in phases["mean_phases"].items()
    ))
    click.echo(
        f"  besides the steps: {phases['non_step_share']:.1%} of an epoch (goal <= 10%); once per run, "
        f"before the first epoch {phases['before_first_epoch']:.2f} s, after the last "
        f"{phases['after_last_epoch']:.2f} s (curves.png, the model file)"
    )
