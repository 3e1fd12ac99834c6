"""An exponential moving average of a model's weights (`train.ema`), the weights deep VAEs are
evaluated and shipped with (VDVAE averages with 0.9999): updated after every update the optimizer
makes, with a decay that warms up over the first updates, used for the test -ELBO, the grids and
model.safetensors, and saved in every checkpoint (through Accelerate's `register_for_checkpointing`)
so that a resumed run continues it bitwise."""

from __future__ import annotations

import copy

import torch

from vae_dist.models import VAE

UNCOUNTED = 10**9  # the updates of an average saved before they were counted: its decay is the configured one


class WeightAverage:
    """`model` holds the average: ema <- d * ema + (1 - d) * weights, from the weights at the start
    (each process keeps its own copy; after the same updates they are the same). At the n-th
    update d = min(decay, (1 + n) / (10 + n)), as TensorFlow's ExponentialMovingAverage with its
    update count: the average follows the weights closely at first and averages over about
    1 / (1 - decay) updates once there have been that many, so that a short run's average is not
    held back by its random initial weights (0.999 would still weigh them by 37% after 1,000
    updates)."""

    def __init__(self, model: VAE, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (from 1)."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: VAE) -> None:
        """Average the parameters; buffers (statistics, not weights) are taken as they are."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), weight)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", UNCOUNTED))
        self.model.load_state_dict(state["weights"])
