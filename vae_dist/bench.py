"""Training throughput on CPU, against the machine's own matmul throughput.

    python -m vae_dist.bench [--batch-size 128] [--seconds 10] [--json bench/train.json]

For each VAE: images/s of the real training step (in-memory batches, `micro_step`), the FLOPs of
one step counted by FlopCounterMode, and the achieved fraction of a large float32 `torch.mm`
measured in the same run. For contrast, the classic loop (DataLoader over the torchvision
dataset with ToTensor) is timed on the same model and step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from vae_dist import data
from vae_dist.config import load_config
from vae_dist.models import build_model
from vae_dist.train import make_optimizer, micro_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def matmul_flops_per_s(m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def step_flops(model, optimizer, accelerator, x, eps) -> int:
    with FlopCounterMode(display=False) as counter:
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")
    return counter.get_total_flops()


def time_steps(step, seconds: float) -> tuple[int, float]:
    for _ in range(5):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n, time.perf_counter() - t0


def bench_model(kind: str, accelerator, train: data.Split, root: Path, batch: int, seconds: float) -> dict:
    cfg = load_config(CONFIGS / f"{kind}.yaml")  # the shipped models, as `make train` builds them
    torch.manual_seed(0)
    model = build_model(cfg.model, train.image_shape)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    images = train.images
    order = data.epoch_order(len(train), 0, 0)
    eps = torch.randn(batch, cfg.model.latent_dim)
    pos = [0]

    def ours():
        lo = pos[0] % (len(train) - batch)
        pos[0] += batch
        x = data.to_float(images[order[lo : lo + batch]])
        micro_step(accelerator, model, optimizer, x, eps, 1.0, "bernoulli")

    flops = step_flops(model, optimizer, accelerator, data.to_float(images[:batch]), eps)
    steps, elapsed = time_steps(ours, seconds)

    # The classic loop: per-image PIL -> ToTensor, collated by a DataLoader.
    import torchvision
    from torch.utils.data import DataLoader

    ds = data.DATASETS[cfg.data.name].cls(str(root), train=True, transform=torchvision.transforms.ToTensor())
    loader = iter(DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True))

    def classic():
        x, _ = next(loader)
        micro_step(accelerator, model, optimizer, x, torch.randn(batch, cfg.model.latent_dim), 1.0, "bernoulli")

    c_steps, c_elapsed = time_steps(classic, seconds)
    return {
        "model": kind,
        "batch_size": batch,
        "step_flops": flops,
        "images_per_s": steps * batch / elapsed,
        "achieved_flops_per_s": flops * steps / elapsed,
        "classic_images_per_s": c_steps * batch / c_elapsed,
        "classic_achieved_flops_per_s": flops * c_steps / c_elapsed,
    }


@click.command()
@click.option("--batch-size", default=128, show_default=True)
@click.option("--seconds", default=8.0, show_default=True, help="Timing window per measurement.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench/train.json", show_default=True)
def main(batch_size: int, seconds: float, json_path: str):
    """Benchmark the training step of both VAEs on CPU."""
    accelerator = Accelerator(cpu=True)
    root = data.resolve("fashion-mnist", download=False)
    train = data.load_split("fashion-mnist", True, root)
    peak = matmul_flops_per_s()
    # The ceiling for the linear VAE: its largest layer's matmul at the batch size, alone.
    layer = matmul_flops_per_s(batch_size, 784, 400, seconds=2.0)
    rows = [bench_model(kind, accelerator, train, root, batch_size, seconds) for kind in ("linear", "conv")]
    for r in rows:
        r["matmul_flops_per_s"] = peak
        r["layer_matmul_flops_per_s"] = layer
        r["fraction_of_matmul"] = r["achieved_flops_per_s"] / peak
        r["classic_fraction_of_matmul"] = r["classic_achieved_flops_per_s"] / peak
    click.echo(f"torch.mm 2048x2048 float32, {torch.get_num_threads()} threads: {peak / 1e9:.1f} GFLOP/s")
    click.echo(f"torch.mm {batch_size}x784x400 (the linear VAE's largest layer) alone: {layer / 1e9:.1f} GFLOP/s = {layer / peak:.0%}")
    click.echo(f"{'model':<7} {'batch':>5} {'MFLOP/step':>10} {'images/s':>9} {'of mm':>6} | {'classic images/s':>16} {'of mm':>6}")
    for r in rows:
        click.echo(
            f"{r['model']:<7} {r['batch_size']:>5} {r['step_flops'] / 1e6:>10.1f} {r['images_per_s']:>9.0f} "
            f"{r['fraction_of_matmul']:>6.0%} | {r['classic_images_per_s']:>16.0f} {r['classic_fraction_of_matmul']:>6.0%}"
        )
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(rows, indent=1))
    click.echo(f"written to {json_path}")


if __name__ == "__main__":
    main()
