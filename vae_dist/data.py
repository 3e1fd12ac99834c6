"""The data a run reads: the built-in IDX data sets (found, copied or downloaded), prepared datasets
(vae_dist.prepare) and the two ways a split is read: held whole in memory as a uint8 tensor
[N, C, H, W] (a batch is made by indexing it), or left on disk and read row by row, one batch
ahead (`MappedSplit`, `prefetched`). No per-image work happens while training.

Where the IDX files come from: an explicit root (read where it is, or refused), else the data folder
(vae_dist.paths), the folder Debian's `dataset-fashion-mnist` package installs (copied into the
data folder), then torchvision's download into the data folder.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_dist import paths
from vae_dist.errors import UserError
from vae_dist.rng import Stream, generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # torchvision's class name, and its folder: <data>/<folder>/raw/
    pretty: str
    system_dirs: tuple[Path, ...]  # where an OS package puts the IDX files
    hint: str

    def download(self, data_dir: Path) -> None:
        import torchvision  # only for the download: slow to import, and not needed otherwise

        cls = getattr(torchvision.datasets, self.folder)
        for train in (True, False):
            cls(str(data_dir), train=train, download=True)


DATASETS = {
    "fashion-mnist": DatasetInfo(
        "FashionMNIST",
        "Fashion-MNIST",
        (Path("/usr/share/datasets/fashion-mnist"),),
        "run `make data` (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)",
    ),
    "mnist": DatasetInfo(
        "MNIST",
        "MNIST",
        (),
        "run `make data DATASET=mnist` on a machine with internet, or copy the four IDX files into data/",
    ),
}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = FILES["train"] + FILES["test"]
PREPARED_DIR = "prepared"  # <data folder>/prepared/<name>: a built-in set in the prepared format


class DataError(UserError):
    """The data set cannot be found or read; the message says where we looked and what to do."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _header(path: Path, head: bytes) -> tuple[tuple[int, ...], int]:
    """(shape, header length) of a uint8 IDX file from its first bytes."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number); delete it and run `make data`")
    ndim = head[3]
    size = 4 + 4 * ndim
    if len(head) < size:
        raise DataError(f"{path} is truncated inside its header; delete it and run `make data`")
    return struct.unpack(f">{ndim}I", head[4:size]), size


def _check_length(path: Path, shape: tuple[int, ...], header: int, length: int) -> None:
    expected = header + math.prod(shape)
    if length != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header promises {expected} bytes for shape {shape}, "
            f"file holds {length}; delete it and run `make data`"
        )


def check_idx(path: Path) -> tuple[int, ...]:
    """Shape of a uint8 IDX file, after checking its magic number and length (without reading
    a plain file's body)."""
    try:
        if path.suffix == ".gz":
            with _open(path) as f:
                blob = f.read()
            shape, header = _header(path, blob[:1028])
            _check_length(path, shape, header, len(blob))
            return shape
        with open(path, "rb") as f:
            head = f.read(1028)
        shape, header = _header(path, head)
        _check_length(path, shape, header, path.stat().st_size)
        return shape
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and run `make data`") from e


def read_idx(path: Path) -> np.ndarray:
    """The array in a uint8 IDX file, checked."""
    try:
        with _open(path) as f:
            blob = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and run `make data`") from e
    shape, header = _header(path, blob[:1028])
    _check_length(path, shape, header, len(blob))
    return np.frombuffer(blob, np.uint8, offset=header).reshape(shape)


def _locate(directory: Path, info: DatasetInfo) -> dict[str, Path] | None:
    """The four IDX files under `directory`, in torchvision's layout or flat, plain or gzipped."""
    found = {}
    for name in ALL_FILES:
        for folder in (directory / info.folder / "raw", directory):
            hit = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
            if hit:
                found[name] = hit
                break
        else:
            return None
    return found


def _in_raw_layout(files: dict[str, Path], directory: Path, info: DatasetInfo) -> bool:
    raw = directory / info.folder / "raw"
    return all(p.parent == raw and p.suffix != ".gz" for p in files.values())


def _materialise(files: dict[str, Path], info: DatasetInfo, data_dir: Path) -> None:
    """Copy (and gunzip) the files into `data_dir/<Folder>/raw/`, where they are read from."""
    raw = data_dir / info.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = raw / name
        if not dst.is_file():
            # Per-process name: several processes of one machine may copy at once.
            tmp = dst.with_name(f"{dst.name}.partial-{socket.gethostname()}-{os.getpid()}")
            with _open(src) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.replace(dst)  # a half-written file is never left under the real name
        check_idx(dst)
    log.info("copied %s into %s", files[ALL_FILES[0]].parent, raw)


def resolve(
    name: str,
    root: str | Path | None = None,
    data_dir: Path | None = None,
    system_dirs: tuple[Path, ...] | None = None,
    download: bool = True,
    given_as: str = "data.root",
) -> Path:
    """A folder holding `name`'s four IDX files (`images_file` finds them inside).

    An explicit root is read where it is, in any layout, or refused: it is never ignored and
    never copied into the shared data folder. Without one: the data folder, then the system
    folders (copied into the data folder), then a download into the data folder. `given_as`: the
    config key or option the root came from, as a refusal names it."""
    info = DATASETS[name]
    data_dir = Path(data_dir or paths.data_dir())
    if root:
        root = Path(root)
        files = _locate(root, info)
        if files is None:
            raise DataError(
                f"{given_as} {root} does not hold the {info.pretty} IDX files ({', '.join(ALL_FILES)}, plain or "
                f".gz, flat or under {info.folder}/raw/); point {given_as} at them, or leave it unset to use {data_dir}"
            )
        for path in files.values():
            check_idx(path)
        return root
    system_dirs = info.system_dirs if system_dirs is None else system_dirs
    tried = []
    for directory in [data_dir, *system_dirs]:
        files = _locate(directory, info)
        if files is None:
            tried.append(f"{directory} (no {info.pretty} IDX files)")
            continue
        for path in files.values():
            check_idx(path)
        if directory == data_dir or _in_raw_layout(files, directory, info):
            return directory
        try:
            _materialise(files, info, data_dir)
        except OSError as e:
            raise DataError(
                f"cannot copy {info.pretty} into {data_dir} ({e}); make it writable or set data.root"
            ) from e
        return data_dir
    if download:
        try:
            info.download(data_dir)
            return data_dir
        except Exception as e:  # torchvision raises several kinds when offline
            tried.append(f"download into {data_dir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    else:
        tried.append("download (disabled by data.download=false)")
    raise DataError(f"{info.pretty} not found; tried: " + "; ".join(tried) + f". To get it, {info.hint}")


def images_file(name: str, train: bool, root: Path) -> Path:
    """The IDX image file of one split in a folder returned by `resolve`."""
    info = DATASETS[name]
    files = _locate(Path(root), info)
    wanted = FILES["train" if train else "test"][0]
    return files[wanted] if files else Path(root) / info.folder / "raw" / wanted


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
    array = read_idx(images_file(name, train, root))
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{images_file(name, train, root)} holds an array of shape {array.shape}, not images")
    if subset:
        array = array[:subset]
    return Split(torch.from_numpy(array.copy()))


def prepared_folder(name: str) -> Path:
    """Where the built-in data set `name` is kept in the prepared format."""
    return paths.data_dir() / PREPARED_DIR / name


def prepared_built_in(name: str, download: bool = True) -> Path:
    """The built-in data set `name` in the prepared format, made once under the data folder."""
    from vae_dist import prepare

    folder = prepared_folder(name)
    if not (folder / prepare.INFO_FILE).is_file():
        resolve(name, download=download)  # says where it looked when the IDX files are missing
        prepare.prepare(name, folder, download=download)
        log.info("prepared %s once, into %s", DATASETS[name].pretty, folder)
    return folder


def load_prepared(folder: Path, train: bool, subset: int = 0, in_memory: str = "always", limit_mb: float = 0):
    """One split of a prepared dataset (checked by `prepare.read_info`): read into memory (a
    `Split`), or left on disk (a `MappedSplit`) when `in_memory` is "never", or "auto" and the
    split is larger than `limit_mb`."""
    from vae_dist import prepare

    path = Path(folder) / prepare.array_file("train" if train else "test")
    array = np.load(path, mmap_mode="r")
    count = min(subset, len(array)) if subset else len(array)
    size_mb = count * math.prod(array.shape[1:]) / 2**20
    if in_memory == "never" or (in_memory == "auto" and size_mb > limit_mb):
        return MappedSplit(path, count, array.shape[1:])
    return Split(torch.from_numpy(np.array(array[:count])))


def load_splits(cfg) -> tuple[Split, Split]:
    """Train and test splits for a `DataConfig`: a prepared dataset (data.path, or the built-in
    set prepared once), or a user's IDX folder read in place (data.root)."""
    from vae_dist import prepare

    if cfg.root:
        root = resolve(cfg.name, cfg.root, download=cfg.download)
        train = load_split(cfg.name, True, root, cfg.train_subset)
        test = load_split(cfg.name, False, root, cfg.test_subset)
    else:
        folder = Path(cfg.path) if cfg.path else prepared_built_in(cfg.name, cfg.download)
        prepare.read_info(folder)
        train = load_prepared(folder, True, cfg.train_subset, cfg.in_memory, cfg.memory_limit_mb)
        test = load_prepared(folder, False, cfg.test_subset, cfg.in_memory, cfg.memory_limit_mb)
    if train.image_shape != test.image_shape:
        where = cfg.root or cfg.path or prepared_built_in(cfg.name, cfg.download)
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
    from vae_dist import prepare

    if cfg.root:
        root = resolve(cfg.name, cfg.root, download=False)
        files = [images_file(cfg.name, t, root) for t in (True, False)]
        text = repr([(p.name, p.stat().st_size) for p in files])
    else:
        folder = Path(cfg.path) if cfg.path else prepared_built_in(cfg.name, cfg.download)
        info = prepare.read_info(folder)  # the arrays themselves are named by their sha256 in it
        text = repr([info["shape"], info["counts"], sorted((k, v["sha256"]) for k, v in info["files"].items())])
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_fit(cfg) -> dict[str, Any] | None:
    """How the dataset's images were fitted (size, channels, policy, background), for a model file
    to record: what a new image must go through to be fed to the model. None for a data set
    stored as published."""
    from vae_dist import prepare

    if not cfg.path:
        return None
    return prepare.read_info(Path(cfg.path)).get("fit")


def dataset_name(cfg) -> str:
    """What a model file records as its data set: the built-in name, or the prepared folder."""
    return str(cfg.path) if cfg.path else cfg.name


def split_for_model(
    model_meta: dict, image_shape: tuple[int, int, int], train: bool, where: str | Path | None = None
) -> torch.Tensor:
    """A split of the data set a model file's metadata names (or of `where`), checked to hold
    images of the model's shape; uint8 [N, C, H, W]."""
    name, split = model_meta.get("dataset"), "training" if train else "test"
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
    from vae_dist import prepare

    if dataset in DATASETS:
        root = resolve(dataset, where, download=False, given_as="--data")
        return load_split(dataset, train, root).images
    folder = Path(where or dataset)
    if not (folder / prepare.INFO_FILE).is_file():
        raise DataError(
            f"the model was trained on the prepared dataset {dataset}, and {folder} is not one (no "
            f"{prepare.INFO_FILE}); give the dataset's folder with --data DIR"
        )
    prepare.read_info(folder)
    return load_prepared(folder, train).images
