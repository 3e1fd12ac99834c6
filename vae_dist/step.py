"""The optimizer step, and what each process takes of a global batch: the determinism contract.

`train.batch_size` is the *global* batch. Every optimizer step takes the next `batch_size` images
of an epoch order drawn from the seed (vae_dist.data.splits.epoch_order), and draws the
reparameterisation (and binarisation) noise for the whole global batch from a generator seeded by
(seed, step); each process then takes its own slice of both (`process_slices`). The loss is a
per-image mean, so DDP's gradient averaging yields the global-batch mean. 1 process and N
processes therefore follow the same trajectory up to float rounding (docs/guarantees.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from vae_dist.config import Config
from vae_dist.likelihoods import PixelLikelihood
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
    """Adam, or AdamW with `train.weight_decay` (decoupled, Loshchilov & Hutter 2019)."""
    # The fused kernel updates all parameters in one pass: several times faster than the
    # per-tensor loop for these small models (see `make bench`).
    fused = device.type in ("cpu", "cuda")
    if cfg.train.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=fused)


def learning_rate(cfg: Config, global_step: int) -> float:
    """The learning rate of optimizer step `global_step` (0 first): train.lr after a linear warm-up
    over train.warmup_steps steps. A function of the step alone, so a resumed run continues it."""
    if cfg.train.warmup_steps <= 0:
        return cfg.train.lr
    return cfg.train.lr * min(1.0, (global_step + 1) / cfg.train.warmup_steps)


@dataclass
class UpdateGuard:
    """What keeps deep VAEs stable (as in VDVAE): before each update the gradient's global norm is
    taken; an update whose loss (on any process) or norm is not finite, or whose norm is above
    `skip_threshold` (when > 0), is skipped; otherwise the gradient is clipped to `clip` (when > 0).
    The norm is taken after the gradients are averaged over the processes, and the losses'
    finiteness is summed over them, so every process decides the same."""

    clip: float
    skip_threshold: float
    last_norm: float = 0.0  # the last update's gradient norm, before clipping
    last_skipped: bool = False
    loss_finite: bool = True  # every loss of this process since the last update was finite

    @classmethod
    def from_config(cls, cfg: Config) -> UpdateGuard | None:
        """None when neither clipping nor skipping is asked for: the step takes no norm at all."""
        if cfg.train.grad_clip <= 0 and cfg.train.skip_threshold <= 0:
            return None
        return cls(clip=cfg.train.grad_clip, skip_threshold=cfg.train.skip_threshold)

    def note(self, loss: torch.Tensor) -> None:
        """A micro-batch's per-image losses, before its backward."""
        self.loss_finite = self.loss_finite and bool(torch.isfinite(loss).all())

    def allows(self, accelerator: Accelerator, parameters: list[torch.nn.Parameter]) -> bool:
        """Whether to call the optimizer's step (the gradients clipped if asked)."""
        # Accelerate's clip unscales fp16's gradients first and returns the norm before clipping (a
        # skipped update's gradients are dropped, clipped or not; max_norm inf leaves them as they are)
        norm = accelerator.clip_grad_norm_(parameters, self.clip if self.clip > 0 else math.inf)
        bad_loss = torch.tensor([0.0 if self.loss_finite else 1.0], device=norm.device)
        if accelerator.num_processes > 1:  # a loss that is not finite on any process
            bad_loss = accelerator.reduce(bad_loss, "sum")
        self.loss_finite, norm = True, norm.item()
        self.last_norm = norm
        self.last_skipped = bool(bad_loss.item()) or not math.isfinite(norm) or (0 < self.skip_threshold < norm)
        if self.last_skipped:
            scaler = accelerator.scaler
            if scaler is not None and not math.isfinite(norm):
                return True  # fp16's loss scaler skips it itself, and must see it to lower its scale
            if scaler is not None:
                scaler.update(scaler.get_scale())  # the gradients were unscaled: begin a new step
            return False
        return True


def micro_step(
    accelerator: Accelerator,
    model,
    optimizer,
    x,
    eps,
    beta: float,
    likelihood: str | PixelLikelihood,
    guard: UpdateGuard | None = None,
):
    """Forward and backward on one micro-batch; the optimizer steps when the accumulation is
    complete (Accelerate skips `step` and the gradient all-reduce before that), unless `guard`
    skips the update."""
    if _wrappers_do_nothing(accelerator):
        # One process, no accumulation, no loss scaling: Accelerate's accumulate/backward/step
        # wrappers reduce to the plain calls (bitwise the same result), minus ~10% of the step.
        out, kl = model(x, eps)
        terms = negative_elbo(out, x, kl, beta, likelihood)
        if guard is not None:
            guard.note(terms.loss.detach())
        terms.loss.mean().backward()  # per-image mean: see the module docstring
        if guard is None or guard.allows(accelerator, list(model.parameters())):
            optimizer.optimizer.step()
        optimizer.optimizer.zero_grad(set_to_none=True)
        return terms
    with accelerator.accumulate(model):
        out, kl = model(x, eps)
        terms = negative_elbo(out, x, kl, beta, likelihood)
        if guard is not None:
            guard.note(terms.loss.detach())
        accelerator.backward(terms.loss.mean())
        if guard is None or not accelerator.sync_gradients or guard.allows(accelerator, list(model.parameters())):
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
