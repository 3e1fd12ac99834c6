"""Fixtures shared by the test modules; plain helpers are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """Real Fashion-MNIST; `make test` installs it, so a missing data set fails rather than skips."""
    from vae_dist.data import builtin

    return builtin.resolve("fashion-mnist", download=False)


@pytest.fixture(scope="session")
def test_images(fashion_root) -> np.ndarray:
    """The first ten real Fashion-MNIST test images, uint8 [10, 1, 28, 28]."""
    from vae_dist.data import splits

    return splits.load_split("fashion-mnist", False, fashion_root, subset=10).images.numpy()


@pytest.fixture(scope="session")
def emoji_dir() -> Path:
    """Twemoji's 64x64 PNGs, which `make test` fetches into data/emoji-twitter-64 (Makefile: EMOJI)."""
    folder = Path(__file__).resolve().parents[1] / "data" / "emoji-twitter-64"
    assert (folder / ".complete").is_file(), f"{folder} is missing: run `make emoji`"
    return folder
