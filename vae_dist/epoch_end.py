"""What training measures and draws at the end of each epoch: the exact test -ELBO over all
processes, and the reconstruction and prior-sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from vae_dist import artifacts
from vae_dist.config import Config
from vae_dist.data import splits
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.losses import bits_per_dim, negative_elbo
from vae_dist.models import VAE
from vae_dist.rng import Stream, generator

ONE_TABLE_LATENTS = 4096  # up to this many latents per image, one generator draws a split's whole noise table
BLOCK_NUMBERS = 2**20  # above it, images are drawn in blocks of about this many numbers, a generator each


def evaluation_noise(n: int, latent_dim: int, seed: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed eps rows of images `rows` (default: all) of a test split of `n` images, float32
    [len(rows), latent_dim]. With at most ONE_TABLE_LATENTS latents per image (the flat VAEs), one
    generator draws the split's whole table and image i takes row i, as vae-dist always has (so
    older model files' recorded figures come back); a model with more (a hierarchical one) draws
    its images in blocks of about BLOCK_NUMBERS numbers, each from its own generator, so that memory
    stays bounded and a process draws only its share. Either way the figure does not depend on
    how the split is cut."""
    rows = torch.arange(n) if rows is None else rows.cpu().long()
    if latent_dim <= ONE_TABLE_LATENTS:
        return torch.randn(n, latent_dim, generator=generator(seed, Stream.EVAL_NOISE))[rows]
    per = max(1, BLOCK_NUMBERS // latent_dim)
    blocks = torch.unique(rows // per)
    if len(blocks) == 0:
        return torch.zeros(0, latent_dim)
    drawn = torch.cat(
        [torch.randn(per, latent_dim, generator=generator(seed, Stream.EVAL_NOISE, int(b))) for b in blocks]
    )
    return drawn[torch.searchsorted(blocks, rows // per) * per + rows % per]


def binarized(x: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Each test image (float in [0, 1]) as 0/1 pixels drawn once from its own generator, by (seed,
    image index): what a model trained with data.binarize=dynamic is evaluated on, by training's
    test -ELBO (seed train.eval_seed) and by vae-dist evaluate (its --seed)."""
    u = torch.stack([torch.rand(x.shape[1:], generator=generator(seed, Stream.EVAL_BINARIZE, int(i))) for i in indices])
    return (u.to(x.device) < x).to(x.dtype)


@torch.no_grad()
def test_elbo(
    accelerator: Accelerator, model: VAE, likelihood: PixelLikelihood | str, test: splits.AnySplit, cfg: Config
) -> dict[str, float]:
    """-ELBO on exactly the whole test split, whatever the number of processes (on binarised copies
    of the images, drawn once, for a run trained on binarised images).

    Each process takes a contiguous share, padded to equal length; every row carries its image
    index, padding rows carry -1, and after the gather each image counts exactly once.
    """
    n, world, rank = len(test), accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    share = torch.arange(rank * per, (rank + 1) * per)
    valid = share < n
    share = share.clamp(max=n - 1)
    rows = []
    model.eval()
    for lo in range(0, per, cfg.train.eval_batch_size):
        idx = share[lo : lo + cfg.train.eval_batch_size]
        x = splits.to_float(test.rows(idx, accelerator.device))
        if cfg.data.binarize == "dynamic":  # the data the model is a likelihood of
            x = binarized(x, idx, cfg.train.eval_seed)
        out, kl = model(x, evaluation_noise(n, model.latent_dim, cfg.train.eval_seed, idx).to(x.device))
        t = negative_elbo(out, x, kl, 1.0, PixelLikelihood.of(likelihood, x.shape[1]))
        index = torch.where(valid[lo : lo + len(idx)], idx, -1).to(x.device, torch.float64)
        rows.append(torch.stack([index, t.recon.double(), t.kl.double()], dim=1))
    model.train()
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=accelerator.device)
    table = accelerator.gather_for_metrics(local).cpu()
    table = table[table[:, 0] >= 0]
    table = table[table[:, 0].argsort()]
    count = table.shape[0]
    assert count == n and torch.equal(table[:, 0].long(), torch.arange(n)), (
        f"evaluation covered {count} rows for {n} test images"
    )
    recon, kl = table[:, 1].mean().item(), table[:, 2].mean().item()
    figures = {"test_neg_elbo": recon + kl, "test_recon": recon, "test_kl": kl, "test_images": count}
    if PixelLikelihood.of(likelihood, model.image_shape[0]).discrete(cfg.data.binarize):
        figures["test_bits_per_dim"] = bits_per_dim(recon + kl, math.prod(model.image_shape))
    return figures


def sample_grid_name(temperature: float) -> str:
    """The prior-sample grid at `temperature`: "samples" at 1, else e.g. "samples_t0.7"."""
    return "samples" if temperature == 1 else f"samples_t{temperature:g}"


@torch.no_grad()
def write_grids(
    model: VAE, likelihood: PixelLikelihood, test: splits.AnySplit, cfg: Config, images_dir: Path, epoch: int, device
) -> dict[str, np.ndarray]:
    """Test images above their reconstructions (the likelihood's mean along the posterior's
    means), and samples from the prior at each of train.grid_temperatures (the same latents every
    epoch), as PNGs; returns each grid's pixels (uint8 [C, H, W], not upscaled) by name, for the
    trackers."""
    model.eval()
    x = splits.to_float(test.rows(torch.arange(min(cfg.train.grid_images, len(test))), device))
    recon = likelihood.mean(model.reconstruct(x))
    grids = {
        "reconstruction": artifacts.save_reconstruction_grid(
            images_dir / f"reconstruction_epoch{epoch:03d}.png", x, recon
        )
    }
    z = torch.randn(cfg.train.grid_samples, model.latent_dim, generator=generator(cfg.train.seed, Stream.GRID_NOISE))
    for t in cfg.train.grid_temperatures:
        samples = likelihood.mean(model.sample(z.to(device), t))
        name = sample_grid_name(t)
        grids[name] = artifacts.save_sample_grid(images_dir / f"{name}_epoch{epoch:03d}.png", samples)
    model.train()
    return grids
