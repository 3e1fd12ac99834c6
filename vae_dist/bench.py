"""Training benchmark on the CPU: the loop users run, the step's share of the machine's matmul
throughput, reading data, and evaluation.

    python -m vae_dist.bench [--batch-size 128] [--seconds 8] [--rounds 5] [--runs 2] [--run-epochs 3]
                             [--profile] [--data/--no-data] [--evaluate/--no-evaluate] [--deep-batch N]
                             [--json bench/train.json]

1. The loop users run (`--runs` rounds; 0 leaves it out): new `vae-dist train` and `accelerate
   launch` runs of the shipped linear config, taking turns, each timed to its first optimizer step,
   its epochs' images/s and in all; then the same training in this process, each epoch's time
   split into its phases (vae_dist.bench_runs).
2. The step: for each shipped model, images/s of the real training step (in-memory batches,
   `train.micro_step`), the FLOPs of one step counted by FlopCounterMode, and the achieved fraction
   of a large float32 `torch.mm`, taken in turn over several rounds (medians reported). For
   contrast, the classic loop (a DataLoader over the IDX images with ToTensor, as in
   pytorch/examples) feeds the same step. The bfloat16 mm is measured beside the float32 one.
   `--profile` prints where the linear VAE's step spends its time (torch.profiler).
3. Data (`--data`, the default): `vae-dist prepare` on the emoji set's 64x64 PNGs (images/s, with
   one worker and with one per core), and the training step fed from a split read from disk
   (`data.in_memory=never`) against the same split held in memory, in turn over the rounds: the
   linear VAE on Fashion-MNIST and the 64x64 CNN (conv64.yaml) on the emoji set.
4. Evaluation (`--evaluate`, the default): `vae-dist evaluate`'s estimate at K=5000 on a few
   Fashion-MNIST test images, for both shipped models: images/s, the FLOPs counted by
   FlopCounterMode, their fraction of the mm throughput, and the implied time for the 10,000.
5. The hierarchical VAEs (hierarchical.yaml on 28x28, hierarchical64.yaml on 64x64 with `dlm`):
   the training step's images/s in float32 and under bfloat16 autocast, in turn over the rounds,
   and the share of the float32 step's time spent in convolutions (torch.profiler).
See docs/benchmarks.md for figures and their analysis.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from vae_dist import bench_runs, files, paths, threads
from vae_dist.config import load_config, shipped_config
from vae_dist.data import builtin, prepare, prepared, splits
from vae_dist.errors import UserError
from vae_dist.kinds import MODEL_KINDS
from vae_dist.models import build_model
from vae_dist.step import make_optimizer, micro_step

FORMAT = "vae-dist-bench-train/2"  # the result file's "format"
# The shipped config of each flat model kind, timed against the classic loop; the hierarchical
# models have their own rows (HIERARCHICAL: shipped config, image shape, likelihood).
MODELS = tuple(kind.config for kind in MODEL_KINDS.values() if kind.name != "hierarchical")
HIERARCHICAL = (("hierarchical", (1, 28, 28), "bernoulli"), ("hierarchical64", (3, 64, 64), "dlm"))
EMOJI = "emoji-twitter-64"  # under the data folder: `make emoji` puts the set's PNGs there
READING = (("linear", "fashion-mnist"), ("conv64", EMOJI))  # (shipped config, data set) for the data rows


def matmul_flops_per_s(
    m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 3.0, dtype: torch.dtype = torch.float32
) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


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


def prepared_model(kind: str, accelerator, image_shape):
    cfg = load_config(shipped_config(kind))  # the shipped models, as `make train` builds them (kind: a config name)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_shape)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return cfg, model, optimizer


def bench_model(
    kind: str, accelerator, train: splits.Split, root: Path, batch: int, seconds: float, rounds: int
) -> dict:
    """The step's images/s and its fraction of the matmul throughput, as the median of `rounds`
    rounds, each timing a large mm, our step and the classic loop's step one after the other: this
    machine's speed drifts, and only figures taken side by side compare."""
    cfg, model, optimizer = prepared_model(kind, accelerator, train.image_shape)
    images = train.images
    order = splits.epoch_order(len(train), 0, 0)
    eps = torch.randn(batch, cfg.model.latent_dim)
    pos = [0]

    def ours():
        lo = pos[0] % (len(train) - batch)
        pos[0] += batch
        x = splits.to_float(images[order[lo : lo + batch]])
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")

    # The classic loop: per-image PIL -> ToTensor, collated by a DataLoader.
    import torchvision
    from torch.utils.data import DataLoader

    folder = builtin.DATASETS[cfg.data.name].folder
    ds = getattr(torchvision.datasets, folder)(str(root), train=True, transform=torchvision.transforms.ToTensor())
    loader = endless(lambda: DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True))

    def classic():
        x, _ = next(loader)
        micro_step(accelerator, model, optimizer, x, torch.randn(batch, cfg.model.latent_dim), 1.0, "bernoulli")

    flops = step_flops(model, optimizer, accelerator, splits.to_float(images[:batch]), eps)
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


def bench_prepare(source: Path, workers: int) -> dict:
    """`vae-dist prepare` of a folder of images into a temporary folder, timed."""
    with tempfile.TemporaryDirectory(prefix="vae-dist-bench-") as tmp:
        t0 = time.perf_counter()
        result = prepare.prepare(str(source), Path(tmp) / "out", workers=workers)
        seconds = time.perf_counter() - t0
    count = sum(result.info["counts"].values()) + result.info["duplicates"] + len(result.info["skipped"])
    return {"workers": workers, "files": count, "seconds": seconds, "images_per_s": count / seconds}


def bench_reading(config: str, folder: Path, accelerator, seconds: float, rounds: int) -> dict:
    """The training step fed from the split on disk (`MappedSplit` through `splits.prefetched`, as
    training reads it) against the same split in memory, at the config's batch size, in turn over
    `rounds` rounds (medians). Also the disk path's reading alone, without a step."""
    info = prepared.read_info(folder)
    cfg, model, optimizer = prepared_model(config, accelerator, tuple(info["shape"]))
    batch, device = cfg.train.batch_size, accelerator.device
    held = {where: splits.load_prepared(folder, True, in_memory=where) for where in ("always", "never")}
    eps = torch.randn(batch, cfg.model.latent_dim)

    def batches(split):
        def one_pass():
            order = splits.epoch_order(len(split), 0, 0)
            lists = (order[lo : lo + batch] for lo in range(0, len(split) - batch + 1, batch))
            return splits.prefetched(split, lists, device)

        return endless(one_pass)

    feeds = {where: batches(split) for where, split in held.items()}

    def step(where: str) -> Callable[[], None]:
        def run():
            micro_step(accelerator, model, optimizer, splits.to_float(next(feeds[where])), eps, 1.0, "bernoulli")

        return run

    reader = batches(held["never"])
    for _ in range(3):  # warm-up: the threads start, the page cache holds the file
        step("always")()
        step("never")()
        next(reader)
    per_round = []
    for _ in range(rounds):
        memory = steps_per_s(step("always"), seconds / rounds / 2)
        disk = steps_per_s(step("never"), seconds / rounds / 2)
        read = steps_per_s(lambda: next(reader), min(0.5, seconds / rounds / 2))
        per_round.append((memory, disk, read))
    return {
        "config": config,
        "dataset": str(folder),
        "image_shape": info["shape"],
        "train_images": len(held["never"]),
        "batch_size": batch,
        "memory_images_per_s": statistics.median(r[0] for r in per_round) * batch,
        "disk_images_per_s": statistics.median(r[1] for r in per_round) * batch,
        "disk_of_memory": statistics.median(r[1] / r[0] for r in per_round),
        "read_only_images_per_s": statistics.median(r[2] for r in per_round) * batch,
        "rounds": [{"memory_steps_per_s": m, "disk_steps_per_s": d, "read_steps_per_s": r} for m, d, r in per_round],
    }


def bench_data(accelerator, seconds: float, rounds: int) -> dict:
    """Preparing the emoji set's PNGs, then reading from disk against memory for both data sets."""
    emoji = paths.data_dir() / EMOJI
    if not (emoji / ".complete").is_file():
        raise click.ClickException(f"{emoji} is missing: run `make emoji` (or pass --no-data)")
    cores = len(os.sched_getaffinity(0))
    preparing = [bench_prepare(emoji, w) for w in sorted({1, cores})]
    with tempfile.TemporaryDirectory(prefix="vae-dist-bench-") as tmp:
        folders = {"fashion-mnist": prepare.built_in("fashion-mnist", download=False)}
        folders[EMOJI] = prepare.prepare(str(emoji), Path(tmp) / "emoji").out
        reading = [bench_reading(config, folders[name], accelerator, seconds, rounds) for config, name in READING]
    return {"prepare": preparing, "reading": reading}


EVAL_K = 5000
EVAL_IMAGES = {"linear": 20, "conv": 2}  # test images per timed estimate (about a second each), by config


def bench_evaluate(kind: str, test: splits.Split, rounds: int) -> dict:
    """`evaluate.estimate` at K=EVAL_K on a few test images: images/s and the fraction of the mm
    throughput its counted FLOPs reach (medians over `rounds`, each next to its own mm)."""
    from vae_dist import evaluate

    cfg = load_config(shipped_config(kind))
    torch.manual_seed(0)
    model = evaluate.for_estimation(build_model(cfg.model, test.image_shape).eval())  # as vae-dist evaluate runs it
    n = EVAL_IMAGES.get(kind, 2)  # a kind not listed: as few as the slowest
    x, idx = splits.to_float(test.images[:n]), torch.arange(n)

    def once():
        evaluate.estimate(model, x, idx, EVAL_K, 0, "bernoulli")

    with FlopCounterMode(display=False) as counter:
        once()
    flops = counter.get_total_flops()
    per_round = []
    for _ in range(rounds):
        peak = matmul_flops_per_s(seconds=1.0)
        t0 = time.perf_counter()
        once()
        per_round.append((peak, time.perf_counter() - t0))
    seconds = statistics.median(t for _, t in per_round)
    return {
        "model": kind,
        "k": EVAL_K,
        "images": n,
        "flops": flops,
        "images_per_s": n / seconds,
        "fraction_of_matmul": statistics.median(flops / t / p for p, t in per_round),
        "seconds_for_10000": 10000 * seconds / n,
        "rounds": [{"matmul_flops_per_s": p, "seconds": t} for p, t in per_round],
    }


POINTWISE_OPS = ("aten::bmm", "aten::baddbmm")  # the hierarchical model's 1x1 convolutions


def bench_hierarchical(
    config: str, shape: tuple[int, int, int], likelihood: str, accelerator, seconds: float, rounds: int,
    batch: int | None = None,
) -> dict:
    """The hierarchical model's training step on random 8-bit images of `shape`, at its config's
    batch size: images/s in float32 and under bfloat16 autocast (what train.mixed_precision=bf16
    does on the CPU), in turn (medians), and the share of the float32 step's CPU time in
    convolutions (the 1x1 ones are matrix products), forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    from vae_dist.likelihoods import PixelLikelihood

    cfg = load_config(shipped_config(config))
    batch = batch or cfg.train.batch_size
    pixel = PixelLikelihood(likelihood, shape[0], cfg.loss.mixtures, cfg.loss.compile)
    x = torch.randint(0, 256, (batch, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, pixel.out_channels)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    eps = torch.randn(batch, accelerator.unwrap_model(model).latent_dim)

    def step(precision: str) -> Callable[[], None]:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                micro_step(accelerator, model, optimizer, x, eps, 1.0, pixel)

        return run

    steps = {precision: step(precision) for precision in ("no", "bf16")}
    for precision in steps:  # warm-up
        for _ in range(2):
            steps[precision]()
    per_round = [(steps_per_s(steps["no"], seconds / rounds / 2), steps_per_s(steps["bf16"], seconds / rounds / 2))
                 for _ in range(rounds)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            steps["no"]()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    # the 1x1 convolutions run as batched matrix products (hierarchical.pointwise)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key or e.key in POINTWISE_OPS)
    return {
        "config": config,
        "image_shape": list(shape),
        "likelihood": likelihood,
        "batch_size": batch,
        "float32_images_per_s": statistics.median(r[0] for r in per_round) * batch,
        "bfloat16_images_per_s": statistics.median(r[1] for r in per_round) * batch,
        "bfloat16_speedup": statistics.median(r[1] / r[0] for r in per_round),
        "convolution_share": conv / total,
        "rounds": [{"float32_steps_per_s": a, "bfloat16_steps_per_s": b} for a, b in per_round],
    }


def profile_lines(accelerator, train: splits.Split, batch: int, rows: int = 12) -> list[str]:
    """Where the linear VAE's step spends its time, by operator (self CPU time over 50 steps)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, model, optimizer = prepared_model("linear", accelerator, train.image_shape)
    x = splits.to_float(train.images[:batch])
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
@click.option("--runs", "run_rounds", type=click.IntRange(min=0), default=2, show_default=True,
              help="Rounds of new `vae-dist train` and `accelerate launch` runs, taken in turn (0: skip them).")
@click.option("--run-epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs of each of those runs, and of the run whose epochs are timed phase by phase.")
@click.option("--profile", is_flag=True, help="Also print the linear VAE step's profile by operator.")
@click.option("--data/--no-data", "with_data", default=True, show_default=True,
              help="Also time `prepare` on the emoji PNGs and training from disk against in memory.")
@click.option("--evaluate/--no-evaluate", "with_evaluate", default=True, show_default=True,
              help="Also time `vae-dist evaluate`'s estimate at K=5000 for both models.")
@click.option("--deep-batch", type=click.IntRange(min=1), default=None,
              help="Batch of the hierarchical models' step (default: each one's config).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench/train.json", show_default=True)
def main(
    batch_size: int,
    seconds: float,
    rounds: int,
    run_rounds: int,
    run_epochs: int,
    profile: bool,
    with_data: bool,
    with_evaluate: bool,
    deep_batch: int | None,
    json_path: str,
):
    """Benchmark training on the CPU: the loop users run, the step of each VAE, data, evaluation."""
    try:
        files.check_json_output(Path(json_path), FORMAT, frozenset({"seconds_to_first_step", "models"}))
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    root = builtin.resolve("fashion-mnist", download=False)
    entry_points = bench_runs.entry_point_runs(run_rounds, run_epochs) if run_rounds else None
    threads.apply()  # as training sets up its processes
    phases = bench_runs.epoch_phases(run_epochs) if run_rounds else None
    accelerator = Accelerator(cpu=True)
    train = splits.load_split("fashion-mnist", True, root)
    peak = matmul_flops_per_s()
    peak_bf16 = matmul_flops_per_s(dtype=torch.bfloat16)
    # The ceiling for the linear VAE: its largest layer's matmul at the batch size, alone.
    layer = matmul_flops_per_s(batch_size, 784, 400, seconds=2.0)
    rows = [bench_model(kind, accelerator, train, root, batch_size, seconds, rounds) for kind in MODELS]
    reading = bench_data(accelerator, seconds, rounds) if with_data else None
    test = splits.load_split("fashion-mnist", False, root)
    evaluating = [bench_evaluate(kind, test, min(rounds, 3)) for kind in MODELS] if with_evaluate else None
    deep = [bench_hierarchical(config, shape, lik, accelerator, seconds, rounds, deep_batch)
            for config, shape, lik in HIERARCHICAL]
    print_peaks(peak, peak_bf16, layer, batch_size)
    print_steps(rows)
    if entry_points:
        bench_runs.print_runs(entry_points, phases, rows)
    if profile:
        click.echo("\nlinear VAE step, 50 steps, by operator:")
        for line in profile_lines(accelerator, train, batch_size):
            click.echo(line)
    if reading:
        print_reading(reading)
    for r in evaluating or []:
        click.echo(
            f"evaluate {r['model']:<6} K={r['k']}: {r['images_per_s']:.2f} images/s, "
            f"{r['flops'] / r['images'] / 1e9:.1f} GFLOP per image, {r['fraction_of_matmul']:.0%} of mm; "
            f"10,000 test images in {r['seconds_for_10000'] / 60:.0f} min"
        )
    print_hierarchical(deep)
    result = {"format": FORMAT, "matmul_flops_per_s": {"float32": peak, "bfloat16": peak_bf16},
              "runs": entry_points, "epoch": phases, "models": rows, "data": reading, "evaluate": evaluating,
              "hierarchical": deep}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(Path(json_path), json.dumps(result, indent=1))
    click.echo(f"written to {json_path}")


def print_steps(rows: list[dict]) -> None:
    """The step's table: our step and the classic loop's, against the mm throughput."""
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


def print_peaks(peak: float, peak_bf16: float, layer: float, batch_size: int) -> None:
    """The matmul throughput our figures are fractions of."""
    click.echo(
        f"torch.mm 2048x2048, {torch.get_num_threads()} threads: float32 {peak / 1e9:.1f} GFLOP/s, "
        f"bfloat16 {peak_bf16 / 1e9:.1f} GFLOP/s ({peak_bf16 / peak:.2f}x)"
    )
    click.echo(
        f"torch.mm {batch_size}x784x400 (the linear VAE's largest layer) alone: "
        f"{layer / 1e9:.1f} GFLOP/s = {layer / peak:.0%}"
    )


def print_hierarchical(rows: list[dict]) -> None:
    """The hierarchical models' step: float32 against bfloat16, and the convolutions' share."""
    for r in rows:
        click.echo(
            f"{r['config']} {'x'.join(map(str, r['image_shape']))} {r['likelihood']}, batch {r['batch_size']}: "
            f"float32 {r['float32_images_per_s']:.1f} images/s, bfloat16 {r['bfloat16_images_per_s']:.1f} "
            f"({r['bfloat16_speedup']:.2f}x); convolutions {r['convolution_share']:.0%} of the float32 step"
        )


def print_reading(reading: dict) -> None:
    """prepare's speed, and training from disk against training from memory."""
    for r in reading["prepare"]:
        click.echo(
            f"vae-dist prepare, {r['files']} PNG files of 64x64, {r['workers']} worker(s): "
            f"{r['images_per_s']:.0f} images/s ({r['seconds']:.2f} s)"
        )
    click.echo(
        f"{'config':<7} {'data set':<17} {'batch':>5} {'in memory':>9} {'from disk':>9} {'ratio':>6} | "
        f"{'reading alone':>13}  (images/s)"
    )
    for r in reading["reading"]:
        click.echo(
            f"{r['config']:<7} {Path(r['dataset']).name:<17} {r['batch_size']:>5} "
            f"{r['memory_images_per_s']:>9.0f} {r['disk_images_per_s']:>9.0f} {r['disk_of_memory']:>6.0%} | "
            f"{r['read_only_images_per_s']:>13.0f}"
        )


if __name__ == "__main__":
    main()
