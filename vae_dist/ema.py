"""An exponential moving average of a model's weights (`train.ema`), the weights deep VAEs are
evaluated and shipped with (VDVAE averages with 0.9999): updated after every update the optimizer
makes, used for the test -ELBO, the grids and model.safetensors, and saved in every checkpoint
(through Accelerate's `register_for_checkpointing`) so that a resumed run continues it bitwise."""

from __future__ import annotations

import copy

import torch

from vae_dist.models import VAE


class WeightAverage:
    """`model` holds the average: ema <- decay * ema + (1 - decay) * weights, from the weights at
    the start (each process keeps its own copy; after the same updates they are the same)."""

    def __init__(self, model: VAE, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: VAE) -> None:
        """Average the parameters; buffers (statistics, not weights) are taken as they are."""
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
