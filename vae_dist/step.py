"""The optimizer step, and what each process takes of a global batch: the determinism contract.

`train.batch_size` is the *global* batch. Every optimizer step takes the next `batch_size` images
of an epoch order drawn from the seed (vae_dist.data.splits.epoch_order), and draws the
reparameterisation (and binarisation) noise for the whole global batch from a generator seeded by
(seed, step); each process then takes its own slice of both (`process_slices`). The loss is a
per-image mean, so DDP's gradient averaging yields the global-batch mean. 1 process and N
processes therefore follow the same trajectory up to float rounding (docs/guarantees.md).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from vae_dist.config import Config
from vae_dist.losses import negative_elbo
from vae_dist.models import VAE
from vae_dist.rng import Stream, generator

FIRST_STEP_MESSAGE = "first optimizer step done"  # make bench times the start-up up to this line


def process_slices(batch_size: int, accum: int, world: int, rank: int) -> list[slice]:
    """Where process `rank` of `world` finds its rows in a global batch of `batch_size`, one slice
    per micro-batch: the batch is cut into `accum` micro-batches in order, each micro-batch into
    `world` equal shares in rank order. The rows of the batch and its noise are cut the same way."""
    micro = batch_size // accum  # images per micro-step, all processes together
    local = micro // world
    return [slice(m * micro + rank * local, m * micro + (rank + 1) * local) for m in range(accum)]


def process_rows(order: torch.Tensor, step: int, batch_size: int, slices: list[slice]) -> torch.Tensor:
    """This process's images of step `step` of an epoch in `order`, micro-batch after micro-batch."""
    batch = order[step * batch_size : (step + 1) * batch_size]
    return torch.cat([batch[part] for part in slices])


def step_noise(
    seed: int, global_step: int, batch_size: int, latent_dim: int, image_shape, binarize: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole global batch's reparameterisation noise [B, latent] and, for dynamic
    binarisation, its uniforms [B, C, H, W], drawn in that order from the step's own generator."""
    gen = generator(seed, Stream.STEP_NOISE, global_step)
    eps = torch.randn(batch_size, latent_dim, generator=gen)
    uniform = torch.rand(batch_size, *image_shape, generator=gen) if binarize else None
    return eps, uniform


def make_optimizer(model: VAE, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: several times faster than the
    # per-tensor loop for these small models (see `make bench`).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=fused)


def micro_step(accelerator: Accelerator, model, optimizer, x, eps, beta: float, likelihood: str):
    """Forward and backward on one micro-batch; the optimizer steps when the accumulation is
    complete (Accelerate skips `step` and the gradient all-reduce before that)."""
    if _wrappers_do_nothing(accelerator):
        # One process, no accumulation, no loss scaling: Accelerate's accumulate/backward/step
        # wrappers reduce to the plain calls (bitwise the same result), minus ~10% of the step.
        logits, mu, logvar = model(x, eps)
        terms = negative_elbo(logits, x, mu, logvar, beta, likelihood)
        terms.loss.mean().backward()  # per-image mean: see the module docstring
        optimizer.optimizer.step()
        optimizer.optimizer.zero_grad(set_to_none=True)
        return terms
    with accelerator.accumulate(model):
        logits, mu, logvar = model(x, eps)
        terms = negative_elbo(logits, x, mu, logvar, beta, likelihood)
        accelerator.backward(terms.loss.mean())
        optimizer.step()
        optimizer.zero_grad()
    return terms


def _wrappers_do_nothing(accelerator: Accelerator) -> bool:
    return (
        accelerator.num_processes == 1
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.scaler is None
        and accelerator.distributed_type == DistributedType.NO
    )
