"""The splits training and evaluation read, held whole in memory as a uint8 tensor [N, C, H, W] (a
batch is made by indexing it), or left on disk and read row by row, one batch ahead (`MappedSplit`,
`prefetched`). No per-image work happens while training. Where they come from: a prepared dataset
(vae_dist.data.prepared), the built-in set prepared once, or a user's IDX folder read in place
(vae_dist.data.builtin).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_dist.data import builtin, prepare, prepared
from vae_dist.data.builtin import DataError
from vae_dist.rng import Stream, generator

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split held in memory as uint8 [N, C, H, W] (on the training device once moved)."""

    images: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device))

    def rows(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images `indices`, in that order, uint8 on `device`."""
        return self.images[indices.to(self.images.device)].to(device)


class MappedSplit:
    """One split of a prepared dataset left on disk: each read takes only the rows asked for, with
    positioned reads (the file is never mapped, so none of it counts as this process's memory but
    the rows in flight). Reads go in file order and land in pinned memory when the device is a GPU."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int]):
        self.path, self.count, self.shape = Path(path), count, tuple(shape)
        try:
            array = np.load(self.path, mmap_mode="r")  # only to learn where the rows start
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path} cannot be read ({str(e).splitlines()[0]}); prepare it again") from None
        self.offset = array.offset
        self.row_bytes = math.prod(self.shape)
        del array
        self.fd = os.open(self.path, os.O_RDONLY)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def __len__(self) -> int:
        return self.count

    def to(self, device: torch.device) -> MappedSplit:
        return self

    def rows(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty((len(indices), *self.shape), dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.read_into(indices.cpu().numpy(), out)
        return out.to(device, non_blocking=True)

    def read_into(self, wanted: np.ndarray, out: torch.Tensor) -> None:
        """Rows `wanted` into the uint8 CPU tensor `out` [len(wanted), C, H, W]; allocates nothing."""
        buffer = out.numpy().reshape(len(wanted), self.row_bytes)
        for pos in np.argsort(wanted, kind="stable"):  # in file order
            got = os.preadv(self.fd, [buffer[pos]], self.offset + int(wanted[pos]) * self.row_bytes)
            if got != self.row_bytes:
                raise DataError(f"{self.path} is shorter than its header says (row {wanted[pos]}); prepare it again")

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


AnySplit = Split | MappedSplit  # what training, evaluation and the grids read rows from


def prefetched(split: AnySplit, index_lists, device: torch.device):
    """The rows of each index list in turn. For a split on disk, the next list's rows are read in a
    background thread (positioned reads release the GIL) while the current ones are used, into two
    buffers allocated once and used in turn: the process's memory does not grow with the steps. On
    a GPU the buffers are pinned and copied without blocking; a buffer is refilled only once its
    last copy is done. So each batch is valid until the next one is asked for."""
    if isinstance(split, Split):
        for indices in index_lists:
            yield split.rows(indices, device)
        return
    from concurrent.futures import ThreadPoolExecutor

    cuda = device.type == "cuda"
    buffers: list[torch.Tensor | None] = [None, None]
    copied: list[Any] = [None, None]  # the CUDA event after each buffer's last copy

    def finish(slot: int, reading, rows: torch.Tensor) -> torch.Tensor:
        reading.result()
        out = rows.to(device, non_blocking=True)
        if cuda:
            copied[slot] = torch.cuda.Event()
            copied[slot].record()
        return out

    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending, slot = None, 0
        for indices in index_lists:
            wanted = indices.cpu().numpy()
            if buffers[slot] is None or buffers[slot].shape[0] < len(wanted):
                buffers[slot] = torch.empty((len(wanted), *split.shape), dtype=torch.uint8, pin_memory=cuda)
            if copied[slot] is not None:
                copied[slot].synchronize()
            rows = buffers[slot][: len(wanted)]
            ahead = (slot, pool.submit(split.read_into, wanted, rows), rows)
            if pending is not None:
                yield finish(*pending)
            pending, slot = ahead, 1 - slot
        if pending is not None:
            yield finish(*pending)


def load_split(name: str, train: bool, root: Path, subset: int = 0) -> Split:
    """One split of a built-in set's IDX folder (`builtin.resolve`), read into memory."""
    return Split(torch.from_numpy(builtin.read_images(name, train, root, subset).copy()))


def load_prepared(folder: Path, train: bool, subset: int = 0, in_memory: str = "always", limit_mb: float = 0):
    """One split of a prepared dataset (checked by `prepared.read_info`): read into memory (a
    `Split`), or left on disk (a `MappedSplit`) when `in_memory` is "never", or "auto" and the
    split is larger than `limit_mb`."""
    path = Path(folder) / prepared.array_file("train" if train else "test")
    array = np.load(path, mmap_mode="r")
    count = min(subset, len(array)) if subset else len(array)
    size_mb = count * math.prod(array.shape[1:]) / 2**20
    if in_memory == "never" or (in_memory == "auto" and size_mb > limit_mb):
        return MappedSplit(path, count, array.shape[1:])
    return Split(torch.from_numpy(np.array(array[:count])))


def load_splits(cfg) -> tuple[Split, Split]:
    """Train and test splits for a `DataConfig`: a prepared dataset (data.path, or the built-in
    set prepared once), or a user's IDX folder read in place (data.root)."""
    if cfg.root:
        root = builtin.resolve(cfg.name, cfg.root, download=cfg.download)
        train = load_split(cfg.name, True, root, cfg.train_subset)
        test = load_split(cfg.name, False, root, cfg.test_subset)
    else:
        folder = Path(cfg.path) if cfg.path else prepare.built_in(cfg.name, cfg.download)
        prepared.read_info(folder)
        train = load_prepared(folder, True, cfg.train_subset, cfg.in_memory, cfg.memory_limit_mb)
        test = load_prepared(folder, False, cfg.test_subset, cfg.in_memory, cfg.memory_limit_mb)
    if train.image_shape != test.image_shape:
        where = cfg.root or cfg.path or builtin.prepared_folder(cfg.name)
        raise DataError(
            f"the training images are {train.image_shape} but the test images are {test.image_shape} "
            f"(in {where}); both splits must hold images of one size: replace the mismatched file"
        )
    return train, test


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of the training images in `epoch`, identical on every process."""
    return torch.randperm(n, generator=generator(seed, Stream.EPOCH_ORDER, epoch))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def dataset_digest(cfg) -> str:
    """What identifies the data a run reads, cheaply: its shape, counts and arrays' sha256 as
    dataset.json records them, or the IDX files' names and sizes for data.root."""
    if cfg.root:
        root = builtin.resolve(cfg.name, cfg.root, download=False)
        found = [builtin.images_file(cfg.name, t, root) for t in (True, False)]
        text = repr([(p.name, p.stat().st_size) for p in found])
    else:
        folder = Path(cfg.path) if cfg.path else prepare.built_in(cfg.name, cfg.download)
        info = prepared.read_info(folder)  # the arrays themselves are named by their sha256 in it
        text = repr([info["shape"], info["counts"], sorted((k, v["sha256"]) for k, v in info["files"].items())])
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_fit(cfg) -> dict[str, Any] | None:
    """How the dataset's images were fitted (size, channels, policy, background), for a model file
    to record: what a new image must go through to be fed to the model. None for a data set
    stored as published."""
    if not cfg.path:
        return None
    return prepared.read_info(Path(cfg.path)).get("fit")


def dataset_name(cfg) -> str:
    """What a model file records as its data set: the built-in name, or the prepared folder."""
    return str(cfg.path) if cfg.path else cfg.name


def split_for_model(
    dataset: str | None, image_shape: tuple[int, int, int], train: bool, where: str | Path | None = None
) -> torch.Tensor:
    """A split of the data set a model file's metadata names (or of `where`), checked to hold
    images of the model's shape; uint8 [N, C, H, W]."""
    name, split = dataset, "training" if train else "test"
    if not isinstance(name, str) or not name:
        raise DataError(f"the model file names no data set ({name!r}); give it a {split} split with --data DIR")
    images = model_split(name, train, where)
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"{where or name} {split} images are {tuple(images.shape[1:])}, the model expects {tuple(image_shape)}"
        )
    return images


def model_split(dataset: str, train: bool, where: str | Path | None = None) -> torch.Tensor:
    """A split of the data set a model file names (`dataset_name`), uint8 [N, C, H, W]; never
    downloads. `where` points elsewhere: the IDX folder of a built-in set, or a prepared dataset."""
    if dataset in builtin.NAMES:
        root = builtin.resolve(dataset, where, download=False, given_as="--data")
        return load_split(dataset, train, root).images
    folder = Path(where or dataset)
    if not (folder / prepared.INFO_FILE).is_file():
        raise DataError(
            f"the model was trained on the prepared dataset {dataset}, and {folder} is not one (no "
            f"{prepared.INFO_FILE}); give the dataset's folder with --data DIR"
        )
    prepared.read_info(folder)
    return load_prepared(folder, train).images
