"""`vae-dist prepare`: a folder of images (or a built-in data set) written in the prepared format
(vae_dist.data.prepared), the one writer of it. Every image goes through `fit_image`
(vae_dist.data.images), the one documented conversion (docs/data.md). No torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from vae_dist import files
from vae_dist.data import builtin
from vae_dist.data.images import FITS, GREY_MODES, Fit, fit_image, unsupported
from vae_dist.data.prepared import FORMAT, INFO_FILE, SPLITS, PrepareError, array_file, check
from vae_dist.errors import UserError
from vae_dist.rng import Stream, numpy_generator
from vae_dist.version import __version__

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
BUILT_IN_WAIT_S = 600  # how long `built_in` waits for another process preparing the same set


# ---------------------------------------------------------------- one image


def _decode(path: str, fit: Fit) -> tuple[np.ndarray | None, str | None]:
    """One file: its row, or why it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
        reason = unsupported(path)
        if reason:
            return None, reason
        with Image.open(path) as image:
            image.seek(0)
            image.load()  # decodes the whole image: a truncated file fails here
            return fit_image(image, fit), None
    except UnidentifiedImageError:
        return None, "not an image Pillow can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, (str(e).splitlines() or [type(e).__name__])[0]


def _decode_chunk(args: tuple[list[str], Fit]) -> list[tuple[np.ndarray | None, str | None]]:
    paths, fit = args
    return [_decode(p, fit) for p in paths]


# ---------------------------------------------------------------- a folder


def find_images(source: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Candidate image files under `source` (recursive, sorted by path), and the other files.
    Hidden files and folders (names starting with '.') are left out."""
    found = sorted(
        (p for p in source.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                   p.relative_to(source).parts)),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [
        {"path": p.relative_to(source).as_posix(), "reason": "not a PNG, JPEG, WebP, BMP or GIF file name"}
        for p in found
        if p.suffix.lower() not in IMAGE_SUFFIXES
    ]
    return images, others


def survey(images: list[Path]) -> tuple[set[tuple[int, int]], bool]:
    """The sizes (H, W) of the files whose headers read, and whether any is in colour."""
    from PIL import Image

    sizes, colour = set(), False
    for path in images:
        try:
            with Image.open(path) as image:
                sizes.add((image.height, image.width))
                colour = colour or image.mode not in GREY_MODES and not _grey_palette(image)
        except Exception:  # noqa: BLE001  an unreadable file is reported when it is decoded
            continue
    return sizes, colour


def _grey_palette(image) -> bool:
    if image.mode not in ("P", "PA"):
        return False
    palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def _end_with_parent() -> None:
    """In a decode worker: be ended by the kernel when the preparing process dies, even by SIGKILL
    (Linux; elsewhere the workers end when the pipe to them closes)."""
    import ctypes

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: a worker just ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was gone before the call
        os.kill(os.getpid(), signal.SIGTERM)


def decode_all(images: list[Path], fit: Fit, workers: int, rows: np.ndarray) -> list[str | None]:
    """Decode `images` into `rows` (in order) on `workers` processes; the reason for each file
    that could not be used (None where it was)."""
    from tqdm.auto import tqdm

    chunk = 64
    jobs = [([str(p) for p in images[i : i + chunk]], fit) for i in range(0, len(images), chunk)]
    reasons: list[str | None] = []
    bar = tqdm(total=len(images), desc="decoding", unit="img", disable=not sys.stderr.isatty())
    pool = multiprocessing.Pool(workers, initializer=_end_with_parent) if workers > 1 and len(jobs) > 1 else None
    try:
        for part in pool.imap(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs):
            for row, reason in part:
                if row is not None:
                    rows[len(reasons)] = row
                reasons.append(reason)
            bar.update(len(part))
        if pool:
            pool.close()
    except BaseException:  # an interrupt or SIGTERM: the workers stop at once, mid-image
        if pool:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool:
            pool.join()
    return reasons


# ---------------------------------------------------------------- the dataset


@dataclass
class Prepared:
    out: Path
    info: dict[str, Any]

    def summary(self) -> str:
        i = self.info
        c, h, w = i["shape"]
        skipped = len(i["skipped"])
        return (
            f"prepared {self.out}: {i['counts']['train']} train + {i['counts']['test']} test images of {c}x{h}x{w}"
            + (f" ({i['fit']['fit']})" if i.get("fit") else "")
            + f"; {i['duplicates']} duplicate(s) kept once; {skipped} file(s) skipped"
            + (f" (listed in {INFO_FILE})" if skipped else "")
        )


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`64` or `48x64` (height x width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise PrepareError(f"--size {text!r}: give a positive size such as 64 or HxW such as 48x64")
    return (values[0], values[-1])


def _write_split(path: Path, source: np.ndarray, indices: np.ndarray) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(indices), *source.shape[1:]))
    for start in range(0, len(indices), 4096):
        out[start : start + 4096] = source[indices[start : start + 4096]]
    out.flush()
    del out


def prepare(
    source: str,
    out: Path,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    policy: str = "crop",
    test_fraction: float = 0.1,
    test_source: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    download: bool = True,
) -> Prepared:
    """Prepare `source` into `out`, written whole into a temporary folder and then renamed; `out`
    has one writer at a time (the checks of what is there are made again once it is ours)."""
    out = Path(out)
    if not out.resolve().name:
        raise PrepareError(f"--out {out} is not a folder that can be written whole; name a new folder")
    _check_out(out, force)
    for given in (source, test_source):
        if given and Path(given).exists() and _inside(Path(given), out):
            raise PrepareError(f"--out {out} holds the images given ({given}); write the dataset elsewhere")
    if not 0 < test_fraction < 1 and test_source is None:
        raise PrepareError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if channels not in (None, 1, 3):
        raise PrepareError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if policy not in FITS:
        raise PrepareError(f"--fit must be one of {', '.join(FITS)}, got {policy!r}")
    with files.one_writer(out, f"dataset {out}", "wait for it to end"):
        files.restore_moved_aside(out)  # a replacement killed half-way: the old dataset is what is there
        _check_out(out, force)  # another process may have written it while this one checked the rest
        return _prepare_into(out, source, size, channels, policy, test_fraction, test_source, seed, workers, download)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise PrepareError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not (out / INFO_FILE).is_file():
        raise PrepareError(f"{out} is not a prepared dataset (no {INFO_FILE}); --force replaces only those")


def _prepare_into(out, source, size, channels, policy, test_fraction, test_source, seed, workers, download):
    with files.staged(out) as staging:
        if source in builtin.NAMES:
            info = _prepare_built_in(source, staging, size, channels, test_source, download)
        else:
            info = _prepare_folder(
                source,
                staging,
                size,
                channels,
                policy,
                test_fraction,
                test_source,
                seed,
                workers or os.cpu_count() or 1,
            )
        _publish(staging, out, info)
    return Prepared(out, info)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _publish(staging: Path, out: Path, info: dict[str, Any]) -> None:
    """Record each array's size and sha256 in dataset.json, then put the folder in place (the
    caller holds `out`'s lock and has checked what may be replaced)."""
    for split in SPLITS:
        path = staging / array_file(split)
        info["files"][array_file(split)] = {"bytes": path.stat().st_size, "sha256": files.sha256_file(path)}
    files.atomic_write_text(staging / INFO_FILE, json.dumps(info, indent=1) + "\n")
    files.publish(staging, out)


def from_arrays(out: Path, train: np.ndarray, test: np.ndarray, source: str = "arrays") -> Prepared:
    """A prepared dataset made from two uint8 [N, C, H, W] arrays (e.g. memory-mapped ones), for
    images that already are rows: written whole into a temporary folder and renamed."""
    out = Path(out)
    if train.dtype != np.uint8 or test.dtype != np.uint8 or train.ndim != 4 or train.shape[1:] != test.shape[1:]:
        raise PrepareError("from_arrays needs two uint8 arrays [N, C, H, W] of one image shape")
    with files.one_writer(out, f"dataset {out}", "wait for it to end"), files.staged(out) as staging:
        if out.exists():
            raise PrepareError(f"{out} already exists; choose another folder")
        info = _new_info(source, train.shape[1:], None)
        info["split"] = {"how": "given"}
        for split, array in (("train", train), ("test", test)):
            _write_split(staging / array_file(split), array, np.arange(len(array)))
            info["counts"][split] = len(array)
        _publish(staging, out, info)
    return Prepared(out, info)


def built_in(name: str, download: bool = True) -> Path:
    """The built-in data set `name` in the prepared format, made once under the data folder."""
    folder = builtin.prepared_folder(name)
    waited = 0.0
    while not (folder / INFO_FILE).is_file():  # another process (another machine) may be making it
        builtin.resolve(name, download=download)  # says where it looked when the IDX files are missing
        try:
            prepare(name, folder, download=download)
            log.info("prepared %s once, into %s", builtin.DATASETS[name].pretty, folder)
        except files.Busy:
            if waited > BUILT_IN_WAIT_S:
                raise
            time.sleep(0.5)
            waited += 0.5
        except PrepareError:
            if not (folder / INFO_FILE).is_file():
                raise
    return folder


def _new_info(source: str, shape: tuple[int, ...], fit: Fit | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "source": source,
        "shape": list(shape),
        "counts": {},
        "fit": fit.to_dict() if fit else None,
        "split": {},
        "duplicates": 0,
        "skipped": [],
        "files": {},
        "version": __version__,
    }


def _prepare_built_in(name, staging, size, channels, test_source, download) -> dict[str, Any]:
    if size is not None or channels not in (None, 1) or test_source is not None:
        raise PrepareError(
            f"{name} is prepared as it is published (1x28x28, its own test split): "
            "leave out --size, --channels and --test"
        )
    root = builtin.resolve(name, download=download)
    arrays = {split: builtin.read_images(name, split == "train", root) for split in SPLITS}
    info = _new_info(name, arrays["train"].shape[1:], None)
    for split, array in arrays.items():
        np.save(staging / array_file(split), np.ascontiguousarray(array))
        info["counts"][split] = len(array)
    info["split"] = {"how": "the data set's own"}
    return info


def _folder_images(source: str, what: str) -> tuple[Path, list[Path], list[dict[str, str]]]:
    folder = Path(source)
    if not folder.is_dir():
        raise PrepareError(
            f"{what} {source!r} is not a folder (nor a built-in data set: {', '.join(builtin.NAMES)}); "
            "give a folder of images"
        )
    images, others = find_images(folder)
    if not images:
        raise PrepareError(f"{what} {source} holds no PNG, JPEG, WebP, BMP or GIF file")
    return folder, images, others


def _prepare_folder(source, staging, size, channels, policy, test_fraction, test_source, seed, workers):
    folder, images, skipped = _folder_images(source, "SOURCE")
    sources = [(folder, images)]
    if test_source is not None:
        test_folder, test_images, test_skipped = _folder_images(test_source, "--test")
        sources.append((test_folder, test_images))
        skipped += [{**s, "path": f"--test {s['path']}"} for s in test_skipped]
    every = [p for _, found in sources for p in found]
    names = [p.relative_to(folder).as_posix() for p in images]
    names += [f"--test {p.relative_to(sources[-1][0]).as_posix()}" for p in every[len(images) :]]
    sizes, colour = survey(every)
    if size is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
            raise PrepareError(
                f"the images have {len(sizes)} different sizes ({shown}, ...); give --size, e.g. --size 64"
            )
        size = next(iter(sizes), (1, 1))
    fit = Fit(size[0], size[1], channels or (3 if colour else 1), policy)
    shape = (fit.channels, fit.height, fit.width)
    rows = np.lib.format.open_memmap(staging / "decoded.npy", mode="w+", dtype=np.uint8, shape=(len(every), *shape))
    reasons = decode_all(every, fit, workers, rows)
    skipped += [{"path": n, "reason": r} for n, r in zip(names, reasons) if r is not None]
    good = [i for i, r in enumerate(reasons) if r is None]
    if not good:
        raise PrepareError(
            f"no image in {source} could be read ({len(every)} tried); the reasons are: "
            + "; ".join(sorted({r for r in reasons if r})[:3])
        )

    info = _new_info(str(source), shape, fit)
    split_rows = _split(rows, good, len(images), test_fraction, test_source, seed, info)
    for split in SPLITS:
        _write_split(staging / array_file(split), rows, split_rows[split])
        info["counts"][split] = len(split_rows[split])
    del rows
    (staging / "decoded.npy").unlink()
    info["skipped"] = skipped
    return info



def _split(rows: np.ndarray, good: list[int], n_source: int, test_fraction, test_source, seed, info) -> dict:
    """The rows of each split, recording the split and the duplicates in `info`. Exact duplicates
    (the same pixels after fitting) are kept once: no test image is also a training image. With
    --test (the rows from `n_source` on), the test folder's copy is the one kept."""
    seen: dict[bytes, int] = {}
    order = [i for i in good if i >= n_source] + [i for i in good if i < n_source]
    for i in order:
        seen.setdefault(hashlib.sha256(rows[i].tobytes()).digest(), i)
    unique = sorted(seen.values())
    info["duplicates"] = len(good) - len(unique)
    if test_source is not None:
        info["split"] = {"how": "given", "test_source": str(test_source)}
        split_rows = {
            "train": np.asarray([i for i in unique if i < n_source], dtype=np.int64),
            "test": np.asarray([i for i in unique if i >= n_source], dtype=np.int64),
        }
        if not len(split_rows["train"]) or not len(split_rows["test"]):
            raise PrepareError("after duplicates are removed, a split has no image left; check SOURCE and --test")
        return split_rows
    n_test = round(len(unique) * test_fraction)
    if n_test < 1 or n_test >= len(unique):
        raise PrepareError(
            f"{len(unique)} distinct images cannot be split with --test-fraction {test_fraction}: "
            "each split needs at least one image"
        )
    picked = numpy_generator(seed, Stream.DATASET_SPLIT).permutation(len(unique))
    info["split"] = {"how": "random", "test_fraction": test_fraction, "seed": seed}
    return {
        "test": np.sort(np.asarray(unique)[picked[:n_test]]),
        "train": np.sort(np.asarray(unique)[picked[n_test:]]),
    }


# ---------------------------------------------------------------- command line


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the staging folder and the workers go."""


def _terminated(signum, frame) -> None:
    raise Terminated


@click.command("prepare")
@click.argument("source", required=False)
@click.option("--out", help="Folder to write (refused if it exists, unless --force).")
@click.option("--size", help="Image size: S (square) or HxW; default: the images' own size when they all share one.")
@click.option("--channels", type=int, help="1 (grey) or 3 (RGB); default: 3 if any image is in colour.")
@click.option(
    "--fit",
    type=click.Choice(FITS),
    default="crop",
    show_default=True,
    help="crop: centred crop to the size's shape; pad: fit inside, padded white; stretch.",
)
@click.option("--test-fraction", type=float, default=0.1, show_default=True, help="Share of images held out for test.")
@click.option("--test", "test", help="A second folder that is the test split (instead of --test-fraction).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/test split.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding processes [default: the cores].")
@click.option("--force", is_flag=True, help="Replace --out if it exists (once the new one is complete).")
@click.option("--check", "check_dir", metavar="DIR", help="Check a prepared dataset's files against dataset.json.")
def prepare_command(source, out, size, channels, fit, test_fraction, test, seed, workers, force, check_dir):
    """Make a dataset to train on from a folder of images (PNG, JPEG, WebP, BMP, GIF) or a built-in
    data set (fashion-mnist, mnist)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if check_dir:
            info = check(Path(check_dir))
            c, h, w = info["shape"]
            click.echo(
                f"{check_dir}: {info['counts']['train']} train + {info['counts']['test']} test images of "
                f"{c}x{h}x{w}; sizes and sha256 match {INFO_FILE}"
            )
            return
        if source is None or out is None:
            raise PrepareError("give SOURCE and --out DIR (or --check DIR)")
        result = prepare(source, Path(out), parse_size(size), channels, fit, test_fraction, test, seed, workers, force)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`_terminated`): the staging folder is gone
        stopped = isinstance(e, Terminated)
        click.echo(f"{'stopped by SIGTERM' if stopped else 'interrupted'}; nothing was written", err=True)
        sys.exit(128 + signal.SIGTERM if stopped else 130)
    for entry in result.info["skipped"][:5]:
        click.echo(f"skipped {entry['path']!r}: {entry['reason']}", err=True)  # quoted: a name may hold a newline
    if len(result.info["skipped"]) > 5:
        click.echo(f"... and {len(result.info['skipped']) - 5} more skipped (see {result.out / INFO_FILE})", err=True)
    click.echo(result.summary())
