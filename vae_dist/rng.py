"""The named random streams: every draw of dataset preparation, training, evaluation and export
verification comes from one of them. (The model's initial weights come from `set_seed(train.seed)`; benchmarks and the
sampler draw their own inputs.)

A stream's generator is seeded by (seed, stream, *position), so a draw depends only on what it is
for and where it is (epoch, step), never on the number of processes or on what ran before it.
Changing a number here changes every trajectory and every recorded figure.
"""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class Stream(enum.IntEnum):
    EPOCH_ORDER = 0  # training: the global order of the images in an epoch, by (seed, epoch)
    STEP_NOISE = 1  # training: reparameterisation and binarisation noise, by (seed, step)
    EVAL_NOISE = 2  # one fixed eps row per test image, by train.eval_seed (and block); export verification reuses it
    GRID_NOISE = 3  # the latents of the prior-sample grid, the same every epoch
    CALIBRATION = 4  # export: the images and latents that calibrate static quantisation
    VERIFY_LATENTS = 5  # export: the N(0, I) latents the decoder is checked on
    DATASET_SPLIT = 6  # prepare: which distinct images form the test split, by (--seed)
    IMPORTANCE_NOISE = 7  # evaluate: the K latents' eps of each image, by (--seed, image index, block)
    EVAL_BINARIZE = 8  # a binarised test image, by (seed, image index): evaluate (--seed), training (eval_seed)
    API_SAMPLES = 9  # the Python API: the prior latents of Model.sample, by (seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, stream: Stream, *position: int) -> torch.Generator:
    """The generator of `stream` for `seed` at `position` (e.g. an epoch or a step)."""
    import torch  # not at the top: `vae-dist prepare` draws with numpy and runs without loading torch

    return torch.Generator().manual_seed(derive_seed(seed, stream, *position))


def numpy_generator(seed: int, stream: Stream, *position: int) -> np.random.Generator:
    """The same stream for numpy code."""
    return np.random.default_rng(derive_seed(seed, stream, *position))
