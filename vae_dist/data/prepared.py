"""The prepared format: a folder of images (or a built-in data set) as two memory-mappable arrays.

    DIR/train.npy      uint8 [N, C, H, W] in numpy's .npy format
    DIR/test.npy       the same for the test split
    DIR/dataset.json   what they hold and how they were made (FORMAT; the keys are in docs/data.md)

This module reads and checks one (no torch); vae_dist.data.prepare is the writer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vae_dist import files
from vae_dist.data.builtin import DataError
from vae_dist.data.images import Fit

log = logging.getLogger(__name__)

FORMAT = "vae-dist-dataset/1"
INFO_FILE = "dataset.json"
SPLITS = ("train", "test")
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts


class PrepareError(DataError):
    """A prepared dataset that cannot be read, or a source, options or output folder that do not
    allow one to be prepared."""


def array_file(split: str) -> str:
    return f"{split}.npy"


def read_info(folder: Path) -> dict[str, Any]:
    """A prepared dataset's dataset.json, checked against its arrays' headers and sizes (cheap: no
    array is read)."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        files.restore_moved_aside(folder)  # a `prepare --force` killed between its two renames
    if not path.is_file():
        raise PrepareError(f"{folder} is not a prepared dataset (no {INFO_FILE}); make one with `vae-dist prepare`")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PrepareError(f"{path} cannot be read ({str(e).splitlines()[0]}); prepare the dataset again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not _well_formed(info):
        raise PrepareError(f"{path} is not a {FORMAT} description; prepare the dataset again")
    if info.get("fit") is not None:
        try:
            Fit.from_dict(info["fit"])
        except (TypeError, ValueError, KeyError) as e:
            raise PrepareError(f"{path} has a damaged fit ({e}); prepare the dataset again") from None
    for split in SPLITS:
        _check_array(folder, info, split)
    return info


def _well_formed(info: dict[str, Any]) -> bool:
    shape, counts, listed = info.get("shape"), info.get("counts"), info.get("files")
    return (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and v > 0 for v in shape)
        and isinstance(counts, dict)
        and all(isinstance(counts.get(s), int) for s in SPLITS)
        and isinstance(listed, dict)
        and all(
            isinstance(listed.get(array_file(s)), dict) and {"bytes", "sha256"} <= set(listed[array_file(s)])
            for s in SPLITS
        )
    )


def _check_array(folder: Path, info: dict[str, Any], split: str) -> None:
    path = folder / array_file(split)
    expected = (info["counts"][split], *info["shape"])
    try:
        with open(path, "rb") as f:
            regular, magic = path.is_file(), f.read(len(NPY_MAGIC)) if path.is_file() else b""
    except OSError as e:
        raise PrepareError(f"{path} cannot be read ({e.strerror or e}); prepare the dataset again") from None
    if not regular or magic != NPY_MAGIC:
        what = "a regular file" if not regular else "a numpy .npy array"
        raise PrepareError(f"{path} is not {what}; prepare the dataset again")
    if path.resolve().parent != folder.resolve():  # a dataset is read from its own folder only
        raise PrepareError(f"{path} leads outside {folder} (to {path.resolve()}); prepare the dataset again")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise PrepareError(f"{path} cannot be read ({str(e).splitlines()[0]}); prepare the dataset again") from None
    if array.dtype != np.uint8 or array.shape != expected:
        raise PrepareError(
            f"{path} holds {array.dtype} {array.shape} but {INFO_FILE} says uint8 {expected}; prepare the dataset again"
        )
    recorded = info["files"][array_file(split)]["bytes"]
    if path.stat().st_size != recorded:
        raise PrepareError(f"{path} is {path.stat().st_size} bytes, {INFO_FILE} says {recorded}; prepare it again")


def check(folder: Path) -> dict[str, Any]:
    """Everything `read_info` checks, and each array's sha256 (reads the whole dataset)."""
    info = read_info(folder)
    for split in SPLITS:
        path = Path(folder) / array_file(split)
        if files.sha256_file(path) != info["files"][array_file(split)]["sha256"]:
            raise PrepareError(
                f"{path} does not match its sha256 in {INFO_FILE}: it changed; prepare the dataset again"
            )
    return info
