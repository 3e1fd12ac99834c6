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
from vae_dist.losses import bits_per_dim, discrete, negative_elbo
from vae_dist.models import VAE
from vae_dist.rng import Stream, generator


def evaluation_noise(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """One fixed eps row per test image: the figure does not depend on how the split is cut."""
    return torch.randn(n, latent_dim, generator=generator(seed, Stream.EVAL_NOISE))


@torch.no_grad()
def test_elbo(accelerator: Accelerator, model: VAE, test: splits.AnySplit, cfg: Config) -> dict[str, float]:
    """-ELBO on exactly the whole test split, whatever the number of processes.

    Each process takes a contiguous share, padded to equal length; every row carries its image
    index, padding rows carry -1, and after the gather each image counts exactly once.
    """
    n, world, rank = len(test), accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    share = torch.arange(rank * per, (rank + 1) * per)
    valid = share < n
    share = share.clamp(max=n - 1)
    eps = evaluation_noise(n, model.latent_dim, cfg.train.eval_seed)
    rows = []
    model.eval()
    for lo in range(0, per, cfg.train.eval_batch_size):
        idx = share[lo : lo + cfg.train.eval_batch_size]
        x = splits.to_float(test.rows(idx, accelerator.device))
        logits, mu, logvar = model(x, eps[idx].to(x.device))
        t = negative_elbo(logits, x, mu, logvar, 1.0, cfg.loss.likelihood)
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
    if discrete(cfg.loss.likelihood, cfg.data.binarize):
        figures["test_bits_per_dim"] = bits_per_dim(recon + kl, math.prod(model.image_shape))
    return figures


@torch.no_grad()
def write_grids(
    model: VAE, test: splits.AnySplit, cfg: Config, images_dir: Path, epoch: int, device
) -> dict[str, np.ndarray]:
    """Test images above their reconstructions (the decoder's mean at the posterior mean), and
    samples from the prior (the same latents every epoch), as PNGs; returns each grid's pixels
    (uint8 [C, H, W], not upscaled) by name, for the trackers."""
    model.eval()
    x = splits.to_float(test.rows(torch.arange(min(cfg.train.grid_images, len(test))), device))
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))
    grids = {"reconstruction": artifacts.save_reconstruction_grid(images_dir / f"reconstruction_epoch{epoch:03d}.png",
                                                                  x, recon)}
    z = torch.randn(cfg.train.grid_samples, model.latent_dim, generator=generator(cfg.train.seed, Stream.GRID_NOISE))
    samples = torch.sigmoid(model.decode(z.to(device)))
    grids["samples"] = artifacts.save_sample_grid(images_dir / f"samples_epoch{epoch:03d}.png", samples)
    model.train()
    return grids
