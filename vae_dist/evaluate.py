"""`vae-dist evaluate RUN`: the importance-weighted estimate of log p(x) (Burda, Grosse &
Salakhutdinov 2015) of a trained model, on every image of a split, over any number of processes.

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,  z_k ~ q(z|x)

NLL_K = -that is an upper bound on -log p(x) that tightens as K grows; with K = 1 it is the
one-sample -ELBO. Reported per image, in nats and in bits per dimension, beside the -ELBO (the
reconstruction term at the first of the K latents, plus the closed-form KL).

- Each image's noise comes from its own generators, seeded by (--seed, image index, block of
  BLOCK latents): the figure does not depend on the number of processes, the batch size or the
  chunking. Under `accelerate launch` each process takes a contiguous share of the split; after
  the gather every image is counted exactly once (asserted).
- Memory is bounded for any K: images go `--batch-size` at a time, and their K latents in chunks
  of whole blocks, sized so that one decoder call holds about MEMORY_BUDGET bytes of pixels.
- A model trained with `data.binarize=dynamic` is evaluated on a binarised copy of each image,
  drawn once from (--seed, image index): the protocol of the binarised-MNIST literature.
- The result is appended as one line to RUN/eval.jsonl (written with one call, then fsynced), never
  replacing an earlier one.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from vae_dist import artifacts, files, runs, threads
from vae_dist.data import splits
from vae_dist.epoch_end import binarized
from vae_dist.errors import UserError
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.models import VAE, FlatVAE
from vae_dist.record import ModelRecord
from vae_dist.rng import Stream, generator
from vae_dist.version import __version__

log = logging.getLogger(__name__)

BLOCK = 128  # latents drawn per generator: chunks of K are whole blocks, so chunking never changes a draw
# Bytes of decoder output per call (a few tensors that size are alive at once). Calls that fit the
# last-level cache run faster: 16 MiB made the linear estimate 1.2-1.3x as fast as 64 MiB (bench).
MEMORY_BUDGET = 16 * 2**20
DEFAULT_K = 5000  # the literature's K for MNIST-like data
DEFAULT_BATCH = 100  # images per pass (fewer when the images are large)


class EvaluateError(UserError):
    pass


@dataclass
class Estimate:
    """Per-image figures, float64 [n]."""

    nll: torch.Tensor  # -(logsumexp_k log w_k - log K)
    recon: torch.Tensor  # -log p(x|z_1) at the first latent
    kl: torch.Tensor  # the posterior's KL to the prior in closed form (a hierarchical model's along the first latent)


def image_noise(seed: int, index: int, block: int, latent_dim: int) -> torch.Tensor:
    """The eps of latents block*BLOCK ... block*BLOCK + BLOCK - 1 of image `index`, [BLOCK, latent]."""
    return torch.randn(BLOCK, latent_dim, generator=generator(seed, Stream.IMPORTANCE_NOISE, index, block))


def chunk_blocks(images: int, floats: int, k: int) -> int:
    """Blocks of latents per decoder call, so that `images` x latents x `floats` floats fit the budget."""
    rows = max(1, MEMORY_BUDGET // (4 * floats))
    return max(1, min(math.ceil(k / BLOCK), rows // (images * BLOCK)))


def images_per_pass(batch_size: int, floats: int) -> int:
    """`batch_size`, or fewer when even one block of latents per image would pass the budget."""
    return max(1, min(batch_size, MEMORY_BUDGET // (4 * floats * BLOCK)))


@torch.no_grad()
def estimate(
    model: VAE,
    x: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    seed: int,
    likelihood: str | PixelLikelihood,
    progress=None,
) -> Estimate:
    """NLL_K, the reconstruction term and the KL of images `x` (float [B, C, H, W] on the model's
    device) whose split indices are `indices`."""
    device = x.device
    b, latent = x.shape[0], model.latent_dim
    likelihood = PixelLikelihood.of(likelihood, x.shape[1])
    kl = None
    best = torch.full((b,), -math.inf, dtype=torch.float64, device=device)
    total = torch.zeros(b, dtype=torch.float64, device=device)
    recon = None
    per_call = chunk_blocks(b, model.floats_per_latent, k)
    blocks = math.ceil(k / BLOCK)
    for first in range(0, blocks, per_call):
        wanted = range(first, min(blocks, first + per_call))
        noise = [torch.cat([image_noise(seed, int(i), j, latent) for j in wanted]) for i in indices]
        eps = torch.stack(noise).to(device)  # [B, S, latent]
        eps = eps[:, : k - first * BLOCK]  # the last block may be used in part
        out, log_ratio, first_kl = model.importance(x, eps)
        log_px = likelihood.log_prob_samples(out, x).double()  # [B, S]
        if recon is None:
            recon, kl = -log_px[:, 0], first_kl
        log_w = log_px + log_ratio
        top = torch.maximum(best, log_w.max(1).values)
        total = total * torch.exp(best - top) + torch.exp(log_w - top[:, None]).sum(1)
        best = top
        if progress is not None:
            progress.done(b * eps.shape[1] / k)
    nll = -(best + torch.log(total) - math.log(k))
    return Estimate(nll=nll, recon=recon, kl=kl)


def for_estimation(model: VAE) -> VAE:
    """A flat model with its convolution weights in channels-last order: the CNN's transposed
    convolutions then take oneDNN's fast path on the CPU (the decoder 1.7 times as fast here, with
    the same outputs up to float rounding). Linear layers are unchanged; a hierarchical model is
    left as it is (its convolutions ran slower in that order)."""
    if not isinstance(model, FlatVAE):
        return model
    return model.to(memory_format=torch.channels_last)


class Progress:
    """How far the estimate is and how long it will take: a bar on a terminal, else a log line
    every LOG_EVERY seconds (from the main process; each process takes an equal share)."""

    LOG_EVERY = 10.0

    def __init__(self, total: int, shown: bool):
        from tqdm.auto import tqdm

        self.total, self.count, self.shown = total, 0, shown
        self.started = self.logged = time.perf_counter()
        self.bar = tqdm(total=total, desc="images", unit="img", disable=not (shown and sys.stderr.isatty()))

    def done(self, images: float) -> None:
        """`images` more done (a fraction of an image: some of its K latents)."""
        self.count = min(self.total, self.count + images)
        self.bar.update(images)
        now = time.perf_counter()
        if self.shown and self.bar.disable and now - self.logged >= self.LOG_EVERY:
            rate = self.count / (now - self.started)
            left = (self.total - self.count) / rate if rate > 0 else float("inf")
            log.info("%.0f of %d images (%.3g images/s), about %s left", self.count, self.total, rate, _duration(left))
            self.logged = now

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def evaluate_split(
    accelerator, model: VAE, images: torch.Tensor, k: int, seed: int, likelihood: str | PixelLikelihood,
    binarize: bool, batch_size: int,
) -> dict[str, Any]:
    """Mean figures over every image of `images` (uint8 [N, C, H, W]), this process taking its
    contiguous share; the same on every process afterwards."""
    n, world, rank = images.shape[0], accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    share = torch.arange(rank * per, (rank + 1) * per)
    valid = share < n
    share = share.clamp(max=n - 1)
    device = accelerator.device
    step = images_per_pass(batch_size, model.floats_per_latent)
    rows = []
    model.eval()
    progress = Progress(per, accelerator.process_index == 0)
    for lo in range(0, per, step):
        idx = share[lo : lo + step]
        x = splits.to_float(images[idx].to(device))
        if binarize:
            x = binarized(x, idx, seed)
        e = estimate(model, x, idx, k, seed, likelihood, progress)
        index = torch.where(valid[lo : lo + len(idx)], idx, -1).to(device, torch.float64)
        rows.append(torch.stack([index, e.nll, e.recon, e.kl], dim=1))
    progress.close()
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64, device=device)
    table = accelerator.gather(local).cpu()
    table = table[table[:, 0] >= 0]
    table = table[table[:, 0].argsort()]
    assert table.shape[0] == n and torch.equal(table[:, 0].long(), torch.arange(n)), (
        f"evaluation covered {table.shape[0]} rows for {n} images"
    )
    nll, recon, kl = (table[:, c].mean().item() for c in (1, 2, 3))
    bits = images[0].numel() * math.log(2)
    return {
        "nll": nll,
        "nll_bits_per_dim": nll / bits,
        "neg_elbo": recon + kl,
        "neg_elbo_bits_per_dim": (recon + kl) / bits,
        "recon": recon,
        "kl": kl,
        "images": n,
    }


def run_binarize(run_dir: Path, record: ModelRecord) -> str:
    """How the model's training data was binarised: its model file, else its config.yaml."""
    if record.binarize is not None:
        return record.binarize
    saved = runs.read_saved_config(run_dir) if (run_dir / runs.CONFIG_FILE).is_file() else {}
    return (saved.get("data") or {}).get("binarize", "none")


def evaluate_run(
    run: str,
    k: int,
    split: str = "test",
    where: str | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    output_dir: str | None = None,
    cpu: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the run RUN (a folder, or a name under the runs folder) and append the result to
    its eval.jsonl; returns the record."""
    from accelerate import Accelerator

    run_dir = runs.locate(run, output_dir)
    model_file = run_dir / runs.MODEL_FILE
    if not model_file.is_file():
        raise EvaluateError(f"{run_dir} holds no {runs.MODEL_FILE}; train the run to its end first")
    files.check_writable(run_dir)  # the result goes to RUN/eval.jsonl: refused now, not after hours of work
    log.info(threads.apply())
    accelerator = Accelerator(cpu=cpu if cpu is not None else not torch.cuda.is_available())
    model, record = artifacts.load_model(model_file)
    binarize = run_binarize(run_dir, record) == "dynamic"
    images = splits.split_for_model(record.dataset, model.image_shape, split == "train", where)
    model = for_estimation(model).to(accelerator.device)
    started = time.perf_counter()
    likelihood = PixelLikelihood.of_record(record)
    figures = evaluate_split(accelerator, model, images, k, seed, likelihood, binarize, batch_size)
    result = {
        "k": k,
        "seed": seed,
        "split": split,
        "data": str(where) if where else record.dataset,
        "binarized": binarize,
        "likelihood": record.likelihood,
        **figures,
        "processes": accelerator.num_processes,
        "seconds": time.perf_counter() - started,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": __version__,
    }
    if accelerator.is_main_process:
        append_record(run_dir / runs.EVAL_FILE, result)
    accelerator.wait_for_everyone()
    return result


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One line appended to `path`; a failed write (a full disk) is cut back off, so the file never
    ends in a partial line."""
    try:
        files.append_jsonl(path, record)
    except OSError as e:
        raise EvaluateError(
            f"could not append to {path} ({e.strerror or e}); its earlier lines are kept. Free some space and "
            "evaluate again"
        ) from None


@click.command("evaluate")
@click.argument("run")
@click.option("--k", "k", type=click.IntRange(min=1), default=DEFAULT_K, show_default=True,
              help="Importance samples per image (1: the one-sample -ELBO).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--data", "where", type=click.Path(file_okay=False),
              help="Where the run's data set is, if not where its model file says.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the noise (and of the binarisation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Images per pass (fewer for large images, to bound memory).")
@click.option("--output-dir", help="Folder of runs, for a RUN given by name (default $VAE_DIST_RUNS or ./runs).")
@click.option("--cpu/--no-cpu", default=None, help="Force CPU, or leave the choice to Accelerate.")
def evaluate_command(run, k, split, where, seed, batch_size, output_dir, cpu):
    """Estimate log p(x) of a trained run by importance sampling; appends to RUN/eval.jsonl."""
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        r = evaluate_run(run, k, split, where, seed, batch_size, output_dir, cpu)
    except (UserError, OSError) as e:
        if main_rank:
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if main_rank:
            click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    if main_rank:
        what = f"{r['images']} {split} images" + (" (binarised)" if r["binarized"] else "")
        click.echo(
            f"NLL (K={k}) {r['nll']:.4f} nats = {r['nll_bits_per_dim']:.4f} bits/dim; -ELBO {r['neg_elbo']:.4f} "
            f"(recon {r['recon']:.4f} + KL {r['kl']:.4f}) nats; {what}, {r['processes']} process(es), "
            f"{r['seconds']:.1f} s"
        )


if __name__ == "__main__":
    evaluate_command()
