"""Training benchmark on the CPU: start-up time and the step's share of the machine's matmul throughput.

    python -m vae_dist.bench [--batch-size 128] [--seconds 8] [--rounds 5] [--starts 3] [--profile]
                             [--json bench/train.json]

1. Start-up: `vae-dist train` (the shipped linear config) is started as a new process and timed
   until it logs its first optimizer step, `--starts` times.
2. The step: for each shipped model, images/s of the real training step (in-memory batches,
   `train.micro_step`), the FLOPs of one step counted by FlopCounterMode, and the achieved fraction
   of a large float32 `torch.mm`, taken in turn over several rounds (medians reported). For
   contrast, the classic loop (a DataLoader over the IDX images with ToTensor, as in
   pytorch/examples) feeds the same step.
   `--profile` prints where the linear VAE's step spends its time (torch.profiler).
See docs/benchmarks.md for figures and their analysis.
"""
from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from vae_dist import data
from vae_dist.config import load_config, shipped_config
from vae_dist.models import build_model
from vae_dist.train import FIRST_STEP_MESSAGE, make_optimizer, micro_step

MODELS = ("linear", "conv")


def matmul_flops_per_s(m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def seconds_to_first_step(timeout: float = 120.0) -> float:
    """Wall time from starting `vae-dist train` to its first optimizer step, in a new process."""
    with tempfile.TemporaryDirectory(prefix="vae-dist-bench-") as out:
        cmd = [sys.executable, "-m", "vae_dist.cli", "train", "--config", "linear", "--output-dir", out]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def read():
            for line in proc.stderr:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        last = ""
        try:
            while (left := timeout - (time.perf_counter() - started)) > 0:
                try:
                    line = lines.get(timeout=left)
                except queue.Empty:
                    break
                if line is None:
                    break
                if FIRST_STEP_MESSAGE in line:
                    return time.perf_counter() - started
                last = line.strip() or last
            raise RuntimeError(f"`{' '.join(cmd)}` did not reach its first step in {timeout:g} s; last line: {last}")
        finally:
            proc.kill()
            proc.wait()


def endless(make: Callable[[], Iterable]) -> Iterator:
    """Batches from `make()`, started again whenever one pass ends (any timing window works)."""
    while True:
        yield from make()


def step_flops(model, optimizer, accelerator, x, eps) -> int:
    with FlopCounterMode(display=False) as counter:
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")
    return counter.get_total_flops()


def steps_per_s(step: Callable[[], None], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def prepared(kind: str, accelerator, image_shape):
    cfg = load_config(shipped_config(kind))  # the shipped models, as `make train` builds them
    torch.manual_seed(0)
    model = build_model(cfg.model, image_shape)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, model, optimizer


def bench_model(kind: str, accelerator, train: data.Split, root: Path, batch: int, seconds: float, rounds: int) -> dict:
    """The step's images/s and its fraction of the matmul throughput, as the median of `rounds`
    rounds, each timing a large mm, our step and the classic loop's step one after the other: this
    machine's speed drifts, and only figures taken side by side compare."""
    cfg, model, optimizer = prepared(kind, accelerator, train.image_shape)
    images = train.images
    order = data.epoch_order(len(train), 0, 0)
    eps = torch.randn(batch, cfg.model.latent_dim)
    pos = [0]

    def ours():
        lo = pos[0] % (len(train) - batch)
        pos[0] += batch
        x = data.to_float(images[order[lo : lo + batch]])
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")

    # The classic loop: per-image PIL -> ToTensor, collated by a DataLoader.
    import torchvision
    from torch.utils.data import DataLoader

    folder = data.DATASETS[cfg.data.name].folder
    ds = getattr(torchvision.datasets, folder)(str(root), train=True, transform=torchvision.transforms.ToTensor())
    loader = endless(lambda: DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True))

    def classic():
        x, _ = next(loader)
        micro_step(accelerator, model, optimizer, x, torch.randn(batch, cfg.model.latent_dim), 1.0, "bernoulli")

    flops = step_flops(model, optimizer, accelerator, data.to_float(images[:batch]), eps)
    for _ in range(5):  # warm-up
        ours()
        classic()
    per_round = []
    for _ in range(rounds):
        peak = matmul_flops_per_s(seconds=min(1.0, seconds / rounds))
        rate = steps_per_s(ours, seconds / rounds)
        c_rate = steps_per_s(classic, seconds / rounds)
        per_round.append((peak, rate, c_rate))
    peak = statistics.median(r[0] for r in per_round)
    rate = statistics.median(r[1] for r in per_round)
    c_rate = statistics.median(r[2] for r in per_round)
    return {
        "model": kind,
        "batch_size": batch,
        "step_flops": flops,
        "ms_per_step": 1e3 / rate,
        "images_per_s": rate * batch,
        "achieved_flops_per_s": flops * rate,
        "matmul_flops_per_s": peak,
        "fraction_of_matmul": statistics.median(flops * r[1] / r[0] for r in per_round),
        "classic_images_per_s": c_rate * batch,
        "classic_achieved_flops_per_s": flops * c_rate,
        "classic_fraction_of_matmul": statistics.median(flops * r[2] / r[0] for r in per_round),
        "rounds": [{"matmul_flops_per_s": p, "steps_per_s": r, "classic_steps_per_s": c} for p, r, c in per_round],
    }


def profile_lines(accelerator, train: data.Split, batch: int, rows: int = 12) -> list[str]:
    """Where the linear VAE's step spends its time, by operator (self CPU time over 50 steps)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, model, optimizer = prepared("linear", accelerator, train.image_shape)
    x = data.to_float(train.images[:batch])
    eps = torch.randn(batch, cfg.model.latent_dim)
    for _ in range(10):
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows).splitlines()


@click.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
              help="Timing window per loop and model, split over the rounds.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Rounds of mm / our step / the classic step, taken in turn; medians are reported.")
@click.option("--starts", type=click.IntRange(min=0), default=3, show_default=True,
              help="New `vae-dist train` processes timed to their first optimizer step (0: skip).")
@click.option("--profile", is_flag=True, help="Also print the linear VAE step's profile by operator.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench/train.json", show_default=True)
def main(batch_size: int, seconds: float, rounds: int, starts: int, profile: bool, json_path: str):
    """Benchmark start-up and the training step of both VAEs on the CPU."""
    root = data.resolve("fashion-mnist", download=False)
    firsts = [seconds_to_first_step() for _ in range(starts)]
    accelerator = Accelerator(cpu=True)
    train = data.load_split("fashion-mnist", True, root)
    peak = matmul_flops_per_s()
    # The ceiling for the linear VAE: its largest layer's matmul at the batch size, alone.
    layer = matmul_flops_per_s(batch_size, 784, 400, seconds=2.0)
    rows = [bench_model(kind, accelerator, train, root, batch_size, seconds, rounds) for kind in MODELS]
    if firsts:
        click.echo(
            f"start-up: `vae-dist train --config linear` reached its first optimizer step after "
            f"{statistics.median(firsts):.2f} s (median of {len(firsts)}: {', '.join(f'{t:.2f}' for t in firsts)} s)"
        )
    click.echo(f"torch.mm 2048x2048 float32, {torch.get_num_threads()} threads: {peak / 1e9:.1f} GFLOP/s")
    click.echo(
        f"torch.mm {batch_size}x784x400 (the linear VAE's largest layer) alone: "
        f"{layer / 1e9:.1f} GFLOP/s = {layer / peak:.0%}"
    )
    click.echo(
        f"{'model':<7} {'batch':>5} {'MFLOP/step':>10} {'ms/step':>8} {'images/s':>9} {'of mm':>6} | "
        f"{'classic images/s':>16} {'of mm':>6}"
    )
    for r in rows:
        click.echo(
            f"{r['model']:<7} {r['batch_size']:>5} {r['step_flops'] / 1e6:>10.1f} {r['ms_per_step']:>8.2f} "
            f"{r['images_per_s']:>9.0f} {r['fraction_of_matmul']:>6.0%} | "
            f"{r['classic_images_per_s']:>16.0f} {r['classic_fraction_of_matmul']:>6.0%}"
        )
    if profile:
        click.echo("\nlinear VAE step, 50 steps, by operator:")
        for line in profile_lines(accelerator, train, batch_size):
            click.echo(line)
    result = {"seconds_to_first_step": firsts, "models": rows}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))
    click.echo(f"written to {json_path}")


if __name__ == "__main__":
    main()
