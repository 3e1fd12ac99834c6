"""The Python API, for notebooks and scripts (docs/api.md):

    import vae_dist
    run = vae_dist.train("linear", {"train.epochs": 3})   # the run `vae-dist train` would make
    model = vae_dist.load(run)                            # a run folder, a run name or a model file
    images = model.sample(16, seed=0)                     # float32 numpy [16, C, H, W] in [0, 1]

Problems raise vae_dist.errors.UserError (or a subclass) with the same one-line message the
commands print; nothing here exits or prints.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_dist import artifacts, runs, training
from vae_dist.config import Config, from_dict, load_config
from vae_dist.data.images import Fit, fit_image
from vae_dist.epoch_end import binarized, evaluation_noise
from vae_dist.errors import UserError
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.losses import negative_elbo
from vae_dist.models import VAE, FlatVAE
from vae_dist.record import ModelRecord
from vae_dist.rng import Stream, generator

CHUNK = 1024  # images per forward pass: memory stays bounded for any n


class InputError(UserError, ValueError):
    """Images or latents that do not fit the model; the message says what was given and expected."""


class Model:
    """A trained VAE with its record; every method takes and returns numpy arrays."""

    def __init__(self, network: VAE, record: ModelRecord, path: Path, device: torch.device):
        self.network, self.record, self.path, self.device = network, record, path, device
        self.likelihood = PixelLikelihood.of_record(record)

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def latent_dim(self) -> int:
        """Standard normals per image: the flat noise vector (a hierarchical model's groups, in order)."""
        return self.network.latent_dim

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.record.image_shape

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"<vae_dist.Model {self.kind} {c}x{h}x{w}, {self.latent_dim} latents, from {self.path}>"

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
        """`n` images decoded from the prior, every scale of it times `temperature` (for a flat VAE
        N(0, temperature^2 I); for a hierarchical one each group's prior given the groups above):
        float32 [n, C, H, W] in [0, 1], the likelihood's mean. The same seed gives the same array,
        on any device."""
        if not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a count of images (an int >= 0), got {n!r}")
        if not (isinstance(temperature, (int, float, np.floating)) and 0 < temperature < float("inf")):
            raise InputError(f"temperature must be a number > 0 (1.0 samples the prior itself), got {temperature!r}")
        seed = secrets.randbits(63) if seed is None else int(seed)  # torch.seed() would reseed torch's own
        eps = torch.randn(n, self.latent_dim, generator=generator(seed, Stream.API_SAMPLES))
        return self._in_chunks(eps.to(self.device), lambda batch: self._shown(self.network.sample(batch, temperature)))

    @torch.no_grad()
    def encode(self, x) -> np.ndarray:
        """The posterior mean of each image's latents: float32 [n, latent_dim] (flat VAEs)."""
        return self._in_chunks(self.images(x), lambda batch: self._flat("encode").encode(batch)[0])

    @torch.no_grad()
    def decode(self, z) -> np.ndarray:
        """The decoder's mean for latents `z` [n, latent_dim]: float32 [n, C, H, W] in [0, 1]."""
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not isinstance(z, torch.Tensor) else z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise InputError(f"latents must be [n, {self.latent_dim}], got {list(z.shape)}")
        return self._in_chunks(z.float().to(self.device), lambda batch: self._shown(self._flat("decode").decode(batch)))

    @torch.no_grad()
    def reconstruct(self, x) -> np.ndarray:
        """Each image decoded at its posterior mean, as the training grids show it."""
        return self._in_chunks(self.images(x), lambda batch: self._shown(self.network.reconstruct(batch)))

    @torch.no_grad()
    def neg_elbo(self, x, seed: int | None = None) -> np.ndarray:
        """The one-sample -ELBO of each image in nats, float64 [n]. Image i draws row i of the
        evaluation noise of `seed` (default: the run's train.eval_seed), so the images of a test
        split, in order, give the figures training's evaluation gave."""
        images = self.images(x)
        seed = self.record.eval_seed if seed is None else seed
        out = []
        for lo in range(0, len(images), CHUNK):
            batch = images[lo : lo + CHUNK]
            rows = torch.arange(lo, lo + len(batch))
            if self.record.binarize == "dynamic":  # as training's evaluation: binarised copies, drawn once
                batch = binarized(batch, rows, seed)
            eps = evaluation_noise(len(images), self.latent_dim, seed, rows)
            decoded, kl = self.network(batch, eps.to(self.device))
            out.append(negative_elbo(decoded, batch, kl, 1.0, self.likelihood).neg_elbo().double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def images(self, x) -> torch.Tensor:
        """`x` as the model takes it, float32 [n, C, H, W] in [0, 1] on its device: uint8 or float
        arrays or tensors [n, C, H, W] (or one [C, H, W]), or PIL images fitted as `vae-dist
        prepare` fitted the training images."""
        if hasattr(x, "convert") or (isinstance(x, (list, tuple)) and x and hasattr(x[0], "convert")):
            return self._from_pil([x] if hasattr(x, "convert") else list(x))
        if isinstance(x, torch.Tensor):
            array = x
        else:
            x = np.asarray(x)
            array = torch.from_numpy(x if x.flags.writeable else x.copy())  # torch takes no read-only array
        if array.ndim == 3:
            array = array[None]
        if tuple(array.shape[1:]) != self.image_shape or array.ndim != 4:
            raise InputError(f"images must be [n, {', '.join(map(str, self.image_shape))}], got {list(array.shape)}")
        if array.dtype == torch.uint8:
            return array.to(self.device, torch.float32).div_(255.0)
        if not array.is_floating_point():
            raise InputError(f"images must be uint8 (0-255) or float (0-1), got {array.dtype}")
        array = array.to(self.device, torch.float32)
        if array.numel() and (array.min() < 0 or array.max() > 1):
            raise InputError("float images must lie in [0, 1]; divide 8-bit values by 255 or pass them as uint8")
        return array

    def _from_pil(self, pictures: list) -> torch.Tensor:
        c, h, w = self.image_shape
        fit = Fit.from_dict(self.record.fit) if self.record.fit else Fit(h, w, c, "crop")
        rows = np.stack([fit_image(p, fit) for p in pictures])
        return torch.from_numpy(rows).to(self.device, torch.float32).div_(255.0)

    def _shown(self, out: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(out)

    def _flat(self, method: str) -> FlatVAE:
        if not isinstance(self.network, FlatVAE):
            raise InputError(
                f"{method} takes one latent vector per image; a {self.kind} model has groups of latents: "
                "use sample and reconstruct"
            )
        return self.network

    @staticmethod
    def _in_chunks(x: torch.Tensor, fn) -> np.ndarray:
        parts = [fn(x[lo : lo + CHUNK]).float().cpu() for lo in range(0, len(x), CHUNK)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, *fn(x[:1]).shape[1:]), np.float32)


def load(
    run_or_path: str | Path, device: str | torch.device | None = None, output_dir: str | Path | None = None
) -> Model:
    """The trained model of a run folder, a run name under the runs folder (`output_dir`, default
    $VAE_DIST_RUNS or ./runs), or a model.safetensors file; on `device` (default: the GPU when
    there is one)."""
    path = runs.locate(run_or_path, output_dir)
    if path.is_dir():
        if not (path / runs.MODEL_FILE).is_file():
            raise UserError(f"{path} holds no {runs.MODEL_FILE}; train the run to its end first")
        path = path / runs.MODEL_FILE
    network, record = artifacts.load_model(path)
    try:
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        return Model(network.to(device), record, path, device)
    except (RuntimeError, AssertionError) as e:  # an unknown device, or one this machine lacks
        raise InputError(f"device {str(device)!r} cannot be used here ({str(e).splitlines()[0]})") from None


def train(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    /,
    *,
    resume: str | None = None,
    cpu: bool | None = None,
    **more_overrides: Any,
) -> Path:
    """Train as `vae-dist train` would, in this process; returns the run folder. `config`: a YAML
    file, a shipped config's name ("linear", "conv", "conv64"), a mapping of sections, or None for
    the defaults; overrides as {"train.epochs": 3} (or `**{"train.epochs": 3}`); `resume` as
    --resume ("auto" with run.name set, or a run or checkpoint folder)."""
    values = {**(overrides or {}), **more_overrides}
    if isinstance(config, Mapping):
        cfg: Config = from_dict(dict(config), values)
    else:
        cfg = load_config(config, values)
    return training.train(cfg, resume=resume, cpu=cpu).run_dir
