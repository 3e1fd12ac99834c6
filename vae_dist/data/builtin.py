"""The built-in data sets (Fashion-MNIST, MNIST): their names, where their IDX files are found, and
the reading of those files. No torch: `vae-dist prepare` and the configuration use this module.

Where the IDX files come from: an explicit root (read where it is, or refused), else the data folder
(vae_dist.paths), the folder Debian's `dataset-fashion-mnist` package installs (copied into the
data folder), then torchvision's download into the data folder.
"""

from __future__ import annotations

import gzip
import logging
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vae_dist import files, paths
from vae_dist.errors import UserError

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
NAMES = tuple(DATASETS)  # the one list of built-in names: the config, `vae-dist data` and prepare take these
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


def _in_raw_layout(found: dict[str, Path], directory: Path, info: DatasetInfo) -> bool:
    raw = directory / info.folder / "raw"
    return all(p.parent == raw and p.suffix != ".gz" for p in found.values())


def _copy(src: Path, dst: Path) -> None:
    with _open(src) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _materialise(found: dict[str, Path], info: DatasetInfo, data_dir: Path) -> None:
    """Copy (and gunzip) the files into `data_dir/<Folder>/raw/`, where they are read from."""
    raw = data_dir / info.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in found.items():
        dst = raw / name
        if not dst.is_file():  # several processes of one machine may copy at once: each writes its own copy
            files.atomic_write(dst, lambda tmp, src=src: _copy(src, tmp))
        check_idx(dst)
    log.info("copied %s into %s", found[ALL_FILES[0]].parent, raw)


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
        found = _locate(root, info)
        if found is None:
            raise DataError(
                f"{given_as} {root} does not hold the {info.pretty} IDX files ({', '.join(ALL_FILES)}, plain or "
                f".gz, flat or under {info.folder}/raw/); point {given_as} at them, or leave it unset to use {data_dir}"
            )
        for path in found.values():
            check_idx(path)
        return root
    system_dirs = info.system_dirs if system_dirs is None else system_dirs
    tried = []
    for directory in [data_dir, *system_dirs]:
        found = _locate(directory, info)
        if found is None:
            tried.append(f"{directory} (no {info.pretty} IDX files)")
            continue
        for path in found.values():
            check_idx(path)
        if directory == data_dir or _in_raw_layout(found, directory, info):
            return directory
        try:
            _materialise(found, info, data_dir)
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
    found = _locate(Path(root), info)
    wanted = FILES["train" if train else "test"][0]
    return found[wanted] if found else Path(root) / info.folder / "raw" / wanted


def read_images(name: str, train: bool, root: Path, subset: int = 0) -> np.ndarray:
    """One split of the built-in set `name` in a folder returned by `resolve`, uint8 [N, C, H, W]
    (the first `subset` images when it is set)."""
    path = images_file(name, train, root)
    array = read_idx(path)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{path} holds an array of shape {array.shape}, not images")
    return array[:subset] if subset else array


def prepared_folder(name: str) -> Path:
    """Where the built-in data set `name` is kept in the prepared format (vae_dist.data.prepare)."""
    return paths.data_dir() / PREPARED_DIR / name
