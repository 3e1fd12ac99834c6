"""Datasets held whole in memory, and batches made by indexing.

A split is one uint8 tensor [N, C, H, W] read once with torchvision's dataset classes; a batch is
`images[indices]` turned to float on the device. No per-image PIL work, no DataLoader workers.

Where the files come from, in order: an explicit root, the project's `data/` folder, the folder
Debian's `dataset-fashion-mnist` package installs, then torchvision's download.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

log = logging.getLogger(__name__)

PROJECT_DATA_DIR = Path(os.environ.get("VAE_DIST_DATA", Path(__file__).resolve().parents[1] / "data"))


@dataclass(frozen=True)
class DatasetInfo:
    cls: type
    pretty: str
    system_dirs: tuple[Path, ...]  # where an OS package puts the IDX files
    hint: str


DATASETS = {
    "fashion-mnist": DatasetInfo(
        torchvision.datasets.FashionMNIST,
        "Fashion-MNIST",
        (Path("/usr/share/datasets/fashion-mnist"),),
        "run `make data` (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)",
    ),
    "mnist": DatasetInfo(
        torchvision.datasets.MNIST,
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


class DataError(RuntimeError):
    """The data set cannot be found or read; the message says where we looked and what to do."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_idx(path: Path) -> tuple[int, ...]:
    """Shape of a uint8 IDX file, after checking its magic number and length."""
    try:
        with _open(path) as f:
            blob = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it and run `make data`") from e
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number); delete it and run `make data`")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path} is truncated inside its header; delete it and run `make data`")
    shape = struct.unpack(f">{ndim}I", blob[4:header])
    expected = header + int(torch.tensor(shape).prod()) if shape else header
    if len(blob) != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header promises {expected} bytes for shape {shape}, "
            f"file holds {len(blob)}; delete it and run `make data`"
        )
    return shape


def _locate(directory: Path, cls: type) -> dict[str, Path] | None:
    """The four IDX files under `directory`, in torchvision's layout or flat, plain or gzipped."""
    found = {}
    for name in ALL_FILES:
        for folder in (directory / cls.__name__ / "raw", directory):
            hit = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
            if hit:
                found[name] = hit
                break
        else:
            return None
    return found


def _in_torchvision_layout(files: dict[str, Path], directory: Path, cls: type) -> bool:
    raw = directory / cls.__name__ / "raw"
    return all(p.parent == raw and p.suffix != ".gz" for p in files.values())


def _materialise(files: dict[str, Path], cls: type, data_dir: Path) -> None:
    """Copy (and gunzip) the files into `data_dir/<Class>/raw/`, where torchvision reads them."""
    raw = data_dir / cls.__name__ / "raw"
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
) -> Path:
    """A root that torchvision's class for `name` can read without downloading."""
    info = DATASETS[name]
    data_dir = Path(data_dir or PROJECT_DATA_DIR)
    system_dirs = info.system_dirs if system_dirs is None else system_dirs
    candidates = ([Path(root)] if root else []) + [data_dir, *system_dirs]
    tried = []
    for directory in candidates:
        files = _locate(directory, info.cls)
        if files is None:
            tried.append(f"{directory} (no {info.pretty} IDX files)")
            continue
        for path in files.values():
            check_idx(path)
        if _in_torchvision_layout(files, directory, info.cls):
            return directory
        try:
            _materialise(files, info.cls, data_dir)
        except OSError as e:
            raise DataError(f"cannot copy {info.pretty} into {data_dir} ({e}); make it writable or set data.root") from e
        return data_dir
    if download:
        try:
            info.cls(str(data_dir), train=True, download=True)
            info.cls(str(data_dir), train=False, download=True)
            return data_dir
        except Exception as e:  # torchvision raises several kinds when offline
            tried.append(f"download into {data_dir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    else:
        tried.append("download (disabled by data.download=false)")
    raise DataError(f"{info.pretty} not found; tried: " + "; ".join(tried) + f". To get it, {info.hint}")


@dataclass
class Split:
    """One split as uint8 [N, C, H, W]."""

    images: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]


def load_split(name: str, train: bool, root: Path, subset: int = 0) -> Split:
    ds = DATASETS[name].cls(str(root), train=train, download=False)
    images = ds.data
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if subset:
        images = images[:subset]
    return Split(images.contiguous())


def load_splits(cfg) -> tuple[Split, Split]:
    """Train and test splits for a `DataConfig`."""
    root = resolve(cfg.name, cfg.root, download=cfg.download)
    return (
        load_split(cfg.name, True, root, cfg.train_subset),
        load_split(cfg.name, False, root, cfg.test_subset),
    )


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and on every machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of the training images in `epoch`, identical on every process."""
    return torch.randperm(n, generator=generator(seed, 0, epoch))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.to(torch.float32).div_(255.0)
