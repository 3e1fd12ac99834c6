"""Prepared datasets: a folder of images (or a built-in data set) as two memory-mappable arrays.

    DIR/train.npy      uint8 [N, C, H, W] in numpy's .npy format
    DIR/test.npy       the same for the test split
    DIR/dataset.json   what they hold and how they were made (FORMAT; the keys are in docs/data.md)

Every image goes through `fit_image`, the one documented conversion (docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from vae_dist import __version__
from vae_dist.errors import UserError
from vae_dist.rng import Stream, numpy_generator

log = logging.getLogger(__name__)

FORMAT = "vae-dist-dataset/1"
INFO_FILE = "dataset.json"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
FITS = ("crop", "pad", "stretch")
BACKGROUND = 255  # transparent pixels are composited over white, and `pad` pads with white
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # survey: no colour in these
BUILT_IN = ("fashion-mnist", "mnist")


class PrepareError(UserError):
    """The source, the options or the output folder do not allow a dataset to be prepared."""


def array_file(split: str) -> str:
    return f"{split}.npy"


# ---------------------------------------------------------------- one image


@dataclass(frozen=True)
class Fit:
    """How every image is made into one array row."""

    height: int
    width: int
    channels: int  # 1 (grey) or 3 (RGB)
    policy: str  # crop | pad | stretch

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": [self.height, self.width],
            "channels": self.channels,
            "fit": self.policy,
            "background": BACKGROUND,
        }


GREY_16_BIT = ("I", "I;16", "I;16B", "I;16L")


def _eight_bit(image):
    """16- and 32-bit grey images scaled to 8 bits (65535 -> 255, rounded); float images clipped."""
    from PIL import Image

    if image.mode in GREY_16_BIT:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.asarray(image, dtype=np.float32).clip(0, 255).round().astype(np.uint8), "L")
    return image


def fit_image(image, fit: Fit) -> np.ndarray:
    """A PIL image (first frame, any mode) as uint8 [C, H, W]: EXIF orientation applied, 16-bit
    scaled to 8, transparency composited over the background, converted to grey or RGB, then fitted
    to the size by the policy and resized with Lanczos (antialiased)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    image = _eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("L" if fit.channels == 1 else "RGB")
    size = (fit.width, fit.height)
    w, h = image.size
    if fit.policy == "crop":  # the centred box of the target's aspect ratio, then resized
        if w * fit.height > h * fit.width:
            cw = max(1, round(h * fit.width / fit.height))
            box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
        else:
            ch = max(1, round(w * fit.height / fit.width))
            box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
        image = image.resize(size, Image.Resampling.LANCZOS, box=box)
    elif fit.policy == "pad":  # resized to fit inside, centred on the background
        scale = min(fit.width / w, fit.height / h)
        inner = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new(image.mode, size, BACKGROUND if image.mode == "L" else (BACKGROUND,) * 3)
        canvas.paste(
            image.resize(inner, Image.Resampling.LANCZOS), ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2)
        )
        image = canvas
    else:
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode(path: str, fit: Fit) -> tuple[np.ndarray | None, str | None]:
    """One file: its row, or why it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
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
    files = sorted(
        (p for p in source.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                   p.relative_to(source).parts)),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [
        {"path": p.relative_to(source).as_posix(), "reason": "not a PNG, JPEG, WebP, BMP or GIF file name"}
        for p in files
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


def decode_all(images: list[Path], fit: Fit, workers: int, rows: np.ndarray) -> list[str | None]:
    """Decode `images` into `rows` (in order) on `workers` processes; the reason for each file
    that could not be used (None where it was)."""
    from tqdm.auto import tqdm

    chunk = 64
    jobs = [([str(p) for p in images[i : i + chunk]], fit) for i in range(0, len(images), chunk)]
    reasons: list[str | None] = []
    bar = tqdm(total=len(images), desc="decoding", unit="img", disable=not sys.stderr.isatty())
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.map(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
        for part in results:
            for row, reason in part:
                if row is not None:
                    rows[len(reasons)] = row
                reasons.append(reason)
            bar.update(len(part))
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Prepare `source` into `out`, written whole into a temporary folder and then renamed."""
    out = Path(out)
    if not out.resolve().name:
        raise PrepareError(f"--out {out} is not a folder that can be written whole; name a new folder")
    if out.exists() and not force:
        raise PrepareError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not (out / INFO_FILE).is_file():
        raise PrepareError(f"{out} is not a prepared dataset (no {INFO_FILE}); --force replaces only those")
    for given in (source, test_source):
        if given and Path(given).exists() and _inside(Path(given), out):
            raise PrepareError(f"--out {out} holds the images given ({given}); write the dataset elsewhere")
    if not 0 < test_fraction < 1 and test_source is None:
        raise PrepareError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if channels not in (None, 1, 3):
        raise PrepareError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if policy not in FITS:
        raise PrepareError(f"--fit must be one of {', '.join(FITS)}, got {policy!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if source in BUILT_IN:
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
        _publish(staging, out, info, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Prepared(out, info)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _publish(staging: Path, out: Path, info: dict[str, Any], force: bool) -> None:
    """Record each array's size and sha256 in dataset.json, then put the folder in place."""
    for split in SPLITS:
        path = staging / array_file(split)
        info["files"][array_file(split)] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (staging / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if out.exists() and force:  # the old one goes only once the new one is complete
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    elif out.exists() and (out / INFO_FILE).is_file():
        # Another process (e.g. on another machine sharing the folder) finished the same
        # preparation first: keep its copy.
        shutil.rmtree(staging)
    else:
        os.replace(staging, out)


def from_arrays(out: Path, train: np.ndarray, test: np.ndarray, source: str = "arrays") -> Prepared:
    """A prepared dataset made from two uint8 [N, C, H, W] arrays (e.g. memory-mapped ones), for
    images that already are rows: written whole into a temporary folder and renamed."""
    out = Path(out)
    if out.exists():
        raise PrepareError(f"{out} already exists; choose another folder")
    if train.dtype != np.uint8 or test.dtype != np.uint8 or train.ndim != 4 or train.shape[1:] != test.shape[1:]:
        raise PrepareError("from_arrays needs two uint8 arrays [N, C, H, W] of one image shape")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        info = _new_info(source, train.shape[1:], None)
        info["split"] = {"how": "given"}
        for split, array in (("train", train), ("test", test)):
            _write_split(staging / array_file(split), array, np.arange(len(array)))
            info["counts"][split] = len(array)
        _publish(staging, out, info, force=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Prepared(out, info)


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
    from vae_dist import data

    if size is not None or channels not in (None, 1) or test_source is not None:
        raise PrepareError(
            f"{name} is prepared as it is published (1x28x28, its own test split): "
            "leave out --size, --channels and --test"
        )
    root = data.resolve(name, download=download)
    arrays = {split: data.load_split(name, split == "train", root).images.numpy() for split in SPLITS}
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
            f"{what} {source!r} is not a folder (nor a built-in data set: {', '.join(BUILT_IN)}); "
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
    every = [p for _, files in sources for p in files]
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

    # Exact duplicates (the same pixels after fitting) are kept once: no test image is also a
    # training image. With --test, the test folder's copy is the one kept.
    seen: dict[bytes, int] = {}
    order = [i for i in good if i >= len(images)] + [i for i in good if i < len(images)]
    for i in order:
        seen.setdefault(hashlib.sha256(rows[i].tobytes()).digest(), i)
    unique = sorted(seen.values())
    info = _new_info(str(source), shape, fit)
    info["duplicates"] = len(good) - len(unique)
    if test_source is None:
        n_test = round(len(unique) * test_fraction)
        if n_test < 1 or n_test >= len(unique):
            raise PrepareError(
                f"{len(unique)} distinct images cannot be split with --test-fraction {test_fraction}: "
                "each split needs at least one image"
            )
        picked = numpy_generator(seed, Stream.DATASET_SPLIT).permutation(len(unique))
        split_rows = {
            "test": np.sort(np.asarray(unique)[picked[:n_test]]),
            "train": np.sort(np.asarray(unique)[picked[n_test:]]),
        }
        info["split"] = {"how": "random", "test_fraction": test_fraction, "seed": seed}
    else:
        split_rows = {
            "train": np.asarray([i for i in unique if i < len(images)], dtype=np.int64),
            "test": np.asarray([i for i in unique if i >= len(images)], dtype=np.int64),
        }
        info["split"] = {"how": "given", "test_source": str(test_source)}
        if not len(split_rows["train"]) or not len(split_rows["test"]):
            raise PrepareError("after duplicates are removed, a split has no image left; check SOURCE and --test")
    for split in SPLITS:
        _write_split(staging / array_file(split), rows, split_rows[split])
        info["counts"][split] = len(split_rows[split])
    del rows
    (staging / "decoded.npy").unlink()
    info["skipped"] = skipped
    return info


# ---------------------------------------------------------------- reading one back


def read_info(folder: Path) -> dict[str, Any]:
    """A prepared dataset's dataset.json, checked against its arrays' headers and sizes (cheap: no
    array is read)."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        raise PrepareError(f"{folder} is not a prepared dataset (no {INFO_FILE}); make one with `vae-dist prepare`")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PrepareError(f"{path} cannot be read ({str(e).splitlines()[0]}); prepare the dataset again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not _well_formed(info):
        raise PrepareError(f"{path} is not a {FORMAT} description; prepare the dataset again")
    for split in SPLITS:
        _check_array(folder, info, split)
    return info


def _well_formed(info: dict[str, Any]) -> bool:
    shape, counts, files = info.get("shape"), info.get("counts"), info.get("files")
    return (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and v > 0 for v in shape)
        and isinstance(counts, dict)
        and all(isinstance(counts.get(s), int) for s in SPLITS)
        and isinstance(files, dict)
        and all(
            isinstance(files.get(array_file(s)), dict) and {"bytes", "sha256"} <= set(files[array_file(s)])
            for s in SPLITS
        )
    )


def _check_array(folder: Path, info: dict[str, Any], split: str) -> None:
    path = folder / array_file(split)
    expected = (info["counts"][split], *info["shape"])
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
        if _sha256(path) != info["files"][array_file(split)]["sha256"]:
            raise PrepareError(
                f"{path} does not match its sha256 in {INFO_FILE}: it changed; prepare the dataset again"
            )
    return info


# ---------------------------------------------------------------- command line


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
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    for entry in result.info["skipped"][:5]:
        click.echo(f"skipped {entry['path']}: {entry['reason']}", err=True)
    if len(result.info["skipped"]) > 5:
        click.echo(f"... and {len(result.info['skipped']) - 5} more skipped (see {result.out / INFO_FILE})", err=True)
    click.echo(result.summary())
