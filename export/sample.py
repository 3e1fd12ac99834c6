"""Sample from, reconstruct with and interpolate through an exported vae-dist VAE.

Needs only numpy, onnxruntime and Pillow: no torch, and nothing else from this project, so the
file can be copied to a device together with an export folder (encoder.onnx, decoder.onnx,
manifest.json):

    pip install onnxruntime numpy pillow
    python sample.py sample --model-dir onnx -n 64 --seed 1 --out samples.png
    python sample.py reconstruct --model-dir onnx --idx t10k-images-idx3-ubyte.gz -n 8
    python sample.py reconstruct --model-dir onnx shirt.png boot.png
    python sample.py interpolate --model-dir onnx a.png b.png --steps 10

In the project, `python -m export.sample ...`; without --model-dir it uses the newest verified
export under --runs (default $VAE_DIST_RUNS, else runs/). Latent size and image shape come from
the models' own metadata. Files are used only if the folder's manifest says they passed
verification and their sha256 still matches.

Edge variants (smaller, faster, slightly less exact; listed with their measured quality cost in
the manifest) are picked with --variant and --format:

    python sample.py sample --model-dir onnx --variant int8 --format ort

--variant fp32 (default), fp16, int8-dynamic, int8-static, or int8: int8-static where it exists
and was accepted, else int8-dynamic. --format onnx (default) or ort (the ORT-format copy, for
mobile and minimal onnxruntime builds). A variant the export rejected (its quality cost is over
the budget, or it failed a check) is refused unless --allow-rejected is given.

Exit status: 0 the PNG was written; 1 the export is there but its manifest does not vouch for the
files (not verified, changed since, a rejected variant); 2 a mistake in what was given (an option,
a file, a missing export), nothing written; 130 interrupted. Problems are one line on stderr.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import secrets
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The export contract (mirrors export/spec.py; tests keep the two in step).
ONNX_FORMAT = "vae-dist-onnx/1"
MANIFEST_FILE = "manifest.json"
ONNX_DIR = "onnx"
SIGNATURES = {"encoder": (["x"], ["mu", "logvar"]), "decoder": (["z"], ["x_mean"])}
# Where runs live (mirrors vae_dist/paths.py) and how grids are drawn (mirrors vae_dist/artifacts.py).
RUNS_ENV, DEFAULT_RUNS = "VAE_DIST_RUNS", "runs"
MIN_CELL_PIXELS = 84
# Edge variants (mirrors export/variants.py): file name = role + infix + format extension, and
# the manifest's variant name is NAME, or NAME-ort for the ORT format (fp32 ONNX is the export itself).
VARIANT_INFIXES = {"fp32": "", "fp16": ".fp16", "int8-dynamic": ".int8-dynamic", "int8-static": ".int8-static"}
FORMAT_EXTENSIONS = {"onnx": ".onnx", "ort": ".ort"}
INT8_PREFERENCE = ("int8-static", "int8-dynamic")  # --variant int8: the first accepted one
PAD = 2  # pixels between grid cells, as in the training grids (before upscaling)
CHUNK = 256  # images per onnxruntime call


# Exit status, as `vae-dist` has it: 1 where vae-dist says "verification failed", 2 for a mistake
# in what was given (nothing is written), 130 when interrupted.
EXIT_UNVERIFIED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class SampleError(Exception):
    """A problem with the user's input; reported as one line, without a traceback."""

    status = EXIT_USAGE


class UnverifiedError(SampleError):
    """An export that is there but that its manifest does not vouch for: not verified, changed
    since, a rejected or failed variant, or a damaged manifest."""

    status = EXIT_UNVERIFIED


# ---------------------------------------------------------------- models


@dataclass
class Model:
    path: Path
    role: str
    session: Any  # onnxruntime.InferenceSession
    latent_dim: int
    image_shape: tuple[int, int, int]
    source: str | None  # sha256 of the model file the export came from, per its manifest
    variant: str = "fp32"  # as the manifest names it
    status: str = "verified"
    reasons: tuple[str, ...] = ()
    fit: dict[str, Any] | None = None  # how images become rows (vae-dist prepare); None: as published

    def run(self, inputs: np.ndarray) -> list[np.ndarray]:
        """All outputs, computed in chunks so that large inputs do not need large buffers."""
        (name,), outputs = SIGNATURES[self.role]
        parts = [self.session.run(outputs, {name: inputs[i : i + CHUNK]}) for i in range(0, len(inputs), CHUNK)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SampleError(f"no {MANIFEST_FILE} in {folder}; copy the whole export folder, or export the run again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError as e:
        raise SampleError(f"{manifest_path} cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise UnverifiedError(f"{manifest_path} is not valid JSON; verify or export the run again") from None
    if not isinstance(manifest, dict):
        raise UnverifiedError(f"{manifest_path} is not a manifest (a JSON object); verify or export the run again")
    return manifest


def check_verified(path: Path, allow_rejected: bool = False) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Refuse a file that its folder's manifest does not vouch for, byte for byte.

    Returns the manifest, the variant the file belongs to ("fp32" for the export itself) and that
    variant's manifest entry. A rejected variant passes only with `allow_rejected`.
    """
    manifest_path = path.parent / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SampleError(f"no {MANIFEST_FILE} beside {path}; copy the whole export folder, or export the run again")
    manifest = read_manifest(path.parent)
    if manifest.get("verified") is not True:
        raise UnverifiedError(
            f"{path.parent} did not pass verification (manifest: verified={manifest.get('verified')}); "
            "refusing to use it; see the manifest's verification failures"
        )
    name, variant = "fp32", {"status": "verified"}
    entry = (manifest.get("files") or {}).get(path.name)
    if not entry:
        for candidate, record in (manifest.get("variants") or {}).items():
            if path.name in (record.get("files") or {}):
                name, variant, entry = candidate, record, record["files"][path.name]
                break
    if not entry or "sha256" not in entry:
        raise UnverifiedError(f"{path.name} is not listed in {manifest_path}, so it was never verified")
    status = variant.get("status")
    reasons = "; ".join(variant.get("reasons") or []) or "no reason recorded"
    if status == "rejected" and not allow_rejected:
        raise UnverifiedError(
            f"{path.name} belongs to the variant {name}, which the export rejected ({reasons}); "
            "refusing to use it; pass --allow-rejected to use it anyway"
        )
    if status not in ("verified", "rejected"):
        raise UnverifiedError(f"{path.name} belongs to the variant {name}, which has status {status!r} ({reasons})")
    try:
        digest = file_sha256(path)
    except OSError as e:
        raise SampleError(f"{path} cannot be read ({e.strerror})") from None
    if digest != entry["sha256"]:
        raise UnverifiedError(
            f"{path} is not the file that was verified (sha256 differs from {manifest_path}); verify it again"
        )
    return manifest, name, variant


def variant_files(folder: Path, variant: str, fmt: str, allow_rejected: bool, hint: bool = True) -> tuple[str, str]:
    """(manifest variant name, file suffix) for --variant and --format in export folder `folder`;
    `hint`: a refusal names --allow-rejected where it would help."""
    extension = FORMAT_EXTENSIONS[fmt]
    if variant == "fp32" and fmt == "onnx":
        return "fp32", extension  # the export itself: no variant entry needed
    listed = read_manifest(folder).get("variants") or {}
    # manifest name -> base variant, in order of preference
    candidates = {
        (base if fmt == "onnx" else f"{base}-ort"): base
        for base in (INT8_PREFERENCE if variant == "int8" else (variant,))
    }
    status = {name: (listed.get(name) or {}).get("status") for name in candidates}
    for acceptable in ("verified", "rejected") if allow_rejected else ("verified",):
        for name, base in candidates.items():
            if status[name] == acceptable:
                return name, VARIANT_INFIXES[base] + extension
    wanted = " or ".join(candidates)
    present = [name for name in candidates if status[name]]
    if not present:
        have = ", ".join(f"{name} ({entry.get('status')})" for name, entry in listed.items()) or "none"
        raise SampleError(f"{folder} has no {wanted} variant (it has: {have}); export the run again to make it")
    why = "; ".join(
        f"{name} {status[name]}: {(listed[name].get('reasons') or ['no reason recorded'])[0]}" for name in present
    )
    advice = "; pass --allow-rejected to use a rejected one anyway" if hint and "rejected" in status.values() else ""
    raise UnverifiedError(f"no accepted {wanted} variant in {folder} ({why}){advice}")


def session_options(threads: int | None = None) -> Any:
    """onnxruntime.SessionOptions for every model run here, and for the export's checks.

    onnxruntime's int8 kernels for x86 CPUs with AVX2 but no VNNI add pairs of u8 x s8 products in
    16 bits, which can saturate; session.x64quantprecision sums in 32 bits, the exact int8
    arithmetic of other CPUs and onnxruntime-web. Float models are unaffected. A fixed thread
    count keeps results independent of the machine's core count.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def load_model(path: Path, role: str, threads: int, allow_rejected: bool = False) -> Model:
    import onnxruntime as ort

    if not path.is_file():
        raise SampleError(f"{path}: no such file")
    # Bytes that differ from the verified ones are reported as such, before anything reads them;
    # without a manifest, what the file is comes first (check_verified then says what is missing).
    vouched = check_verified(path, allow_rejected) if (path.parent / MANIFEST_FILE).is_file() else None
    options = session_options(threads)  # these models are small enough that one thread is fast
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(f"{path} is not an ONNX model onnxruntime can load ({reason[:160]})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != ONNX_FORMAT:
        raise SampleError(
            f"{path} is not a vae-dist export (metadata format {meta.get('format')!r}, expected {ONNX_FORMAT!r})"
        )
    found = meta.get("role")
    if found != role:
        hint = "; are --encoder and --decoder swapped?" if found in SIGNATURES else ""
        raise SampleError(f"{path} is the {found} of a VAE, but is used as the {role}{hint}")
    inputs, outputs = SIGNATURES[role]
    got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if got != (inputs, outputs):
        raise SampleError(
            f"{path} has inputs {got[0]} and outputs {got[1]}; a vae-dist {role} has {inputs} and {outputs}"
        )
    try:
        latent_dim = int(meta["latent_dim"])
        image_shape = tuple(int(d) for d in json.loads(meta["image_shape"]))
    except (KeyError, ValueError, TypeError):
        raise SampleError(f"{path} lacks valid latent_dim/image_shape metadata") from None
    if len(image_shape) != 3:
        raise SampleError(f"{path}: image_shape metadata {list(image_shape)} is not [C, H, W]")
    try:
        fit = json.loads(meta.get("fit") or "null")
    except ValueError:
        raise SampleError(f"{path} has damaged fit metadata") from None
    manifest, variant, entry = vouched or check_verified(path, allow_rejected)
    source = (manifest.get("source") or {}).get("sha256")
    return Model(
        path,
        role,
        session,
        latent_dim,
        image_shape,
        source,  # type: ignore[arg-type]
        variant,
        entry.get("status", "verified"),
        tuple(entry.get("reasons") or ()),
        fit if isinstance(fit, dict) else None,
    )


def default_runs() -> Path:
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS)


def find_default_model_dir(runs: Path) -> Path:
    """The newest verified export under `runs` (by its manifest's modification time)."""
    manifests = sorted(runs.glob(f"*/{ONNX_DIR}/{MANIFEST_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in manifests:
        try:
            if json.loads(manifest.read_text()).get("verified") is True:
                return manifest.parent
        except ValueError:
            continue
    aside = sorted(runs.glob(f"*/.{ONNX_DIR}.old-*"))
    if aside:  # vae_dist/files.py: a replacement killed between its two renames
        raise SampleError(
            f"no --model-dir given and no verified export under {runs}/ but one left aside as {aside[0]} by a "
            f"replacement that did not finish; `vae-dist verify {aside[0].parent}` puts it back"
        )
    raise SampleError(f"no --model-dir given and no verified export under {runs}/; pass --model-dir RUN/onnx")


def aside_copies(onnx_dir: Path) -> list[Path]:
    """The copies of an export folder that vae-dist's replacement of it (vae_dist/files.py: publish)
    leaves as .onnx.old-PID when it is killed between its two renames."""
    return sorted(p for p in onnx_dir.parent.glob(f".{onnx_dir.name}.old-*") if p.is_dir())


def load_models(args: argparse.Namespace, roles: tuple[str, ...]) -> dict[str, Model]:
    """The models for `roles`: --encoder/--decoder if given, else from the model folder."""
    explicit = {"encoder": args.encoder, "decoder": args.decoder}
    folder, suffix = None, ".onnx"
    if any(explicit[r] is None for r in roles):
        folder = args.model_dir
        if folder is None:
            folder = find_default_model_dir(args.runs)
            newest = f"the newest verified export under {args.runs}/"
            print(f"no --model-dir given: using {folder}, {newest}", file=sys.stderr)
        if not (folder / "encoder.onnx").exists() and (folder / ONNX_DIR).is_dir():
            folder = folder / ONNX_DIR  # a run directory was given
        set_aside = aside_copies(folder if folder.name == ONNX_DIR or not folder.is_dir() else folder / ONNX_DIR)
        if set_aside and not (folder / MANIFEST_FILE).is_file():
            raise SampleError(
                f"the export in {set_aside[0].parent} was left aside as {set_aside[0].name} by a replacement that did "
                f"not finish; `vae-dist verify {set_aside[0].parent}` puts it back (or rename it to {ONNX_DIR})"
            )
        if not folder.is_dir():
            raise SampleError(f"{folder}: no such folder")
        if not (folder / MANIFEST_FILE).is_file():
            raise SampleError(
                f"{folder} holds no verified export (no {MANIFEST_FILE}); export the run first "
                "(vae-dist export RUN), or copy the whole export folder"
            )
        variant, suffix = variant_files(folder, args.variant, args.format, args.allow_rejected)
        if variant != "fp32":
            print(f"using variant {variant} ({', '.join(r + suffix for r in roles)})", file=sys.stderr)
    models = {
        r: load_model(explicit[r] or folder / f"{r}{suffix}", r, args.threads, args.allow_rejected) for r in roles
    }
    for name in sorted({m.variant for m in models.values() if m.status == "rejected"}):
        reasons = next(m.reasons for m in models.values() if m.variant == name)
        print(f"warning: using {name}, which the export rejected ({'; '.join(reasons)})", file=sys.stderr)
    if len(models) == 2:
        enc, dec = models["encoder"], models["decoder"]
        if (enc.latent_dim, enc.image_shape) != (dec.latent_dim, dec.image_shape):
            raise SampleError(
                f"{enc.path} ({enc.latent_dim} latents, images {list(enc.image_shape)}) and {dec.path} "
                f"({dec.latent_dim} latents, images {list(dec.image_shape)}) are not one VAE"
            )
        if enc.source != dec.source:  # same sizes, but trained separately: the latents differ
            raise SampleError(f"{enc.path} and {dec.path} were exported from different models")
    return models


# ---------------------------------------------------------------- images in


# The conversion of vae_dist.data.images.fit_image, repeated here because this file imports nothing of
# the project (tests/test_sample.py checks that both give the same pixels); docs/data.md.
GREY_16_BIT = ("I", "I;16", "I;16B", "I;16L")


def fit_pixels(img, fit: dict[str, Any]) -> np.ndarray:
    """A PIL image as uint8 [C, H, W], converted and fitted as `vae-dist prepare` did (`fit`)."""
    from PIL import Image, ImageOps

    (h, w), c, policy, bg = fit["size"], fit["channels"], fit["fit"], fit["background"]
    img = ImageOps.exif_transpose(img)
    if img.mode in GREY_16_BIT:
        values = np.asarray(img, dtype=np.int64).clip(0, 65535)
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img, dtype=np.float32).clip(0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (bg, bg, bg, 255)), img)
    img = img.convert("L" if c == 1 else "RGB")
    iw, ih = img.size
    if policy == "crop":
        if iw * h > ih * w:
            cw = max(1, round(ih * w / h))
            box = ((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih)
        else:
            ch = max(1, round(iw * h / w))
            box = (0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch)
        img = img.resize((w, h), Image.Resampling.LANCZOS, box=box)
    elif policy == "pad":
        scale = min(w / iw, h / ih)
        inner = (max(1, round(iw * scale)), max(1, round(ih * scale)))
        canvas = Image.new(img.mode, (w, h), bg if img.mode == "L" else (bg, bg, bg))
        canvas.paste(img.resize(inner, Image.Resampling.LANCZOS), ((w - inner[0]) // 2, (h - inner[1]) // 2))
        img = canvas
    else:
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def read_png(path: Path, shape: tuple[int, int, int], fit: dict[str, Any] | None = None) -> np.ndarray:
    """One image file (PNG, JPEG, ...) as float32 [C, H, W] in [0, 1]. A model trained on a
    prepared dataset takes any size, fitted as its dataset was; otherwise the file must already
    have the model's size."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    if c not in (1, 3):
        raise SampleError(f"the model takes {c}-channel images; image files can give 1 or 3 channels")
    try:
        with open(path, "rb") as f:  # vae_dist.data.images.unsupported, repeated
            head = f.read(26)
        if len(head) == 26 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24:26] == b"\x10\x04":
            raise SampleError(f"{path} is a 16-bit grey PNG with transparency, which Pillow cannot read faithfully; "
                              "save it with 8 bits")
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            if fit is not None:
                return fit_pixels(img, fit).astype(np.float32) / 255.0
            if img.size != (w, h):
                raise SampleError(f"{path} is {img.size[0]}x{img.size[1]} pixels; the model takes {w}x{h}")
            img = img.convert("L" if c == 1 else "RGB")
    except FileNotFoundError:
        raise SampleError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise SampleError(f"{path} is not a readable image ({e})") from None
    pixels = np.asarray(img, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)
    return pixels.astype(np.float32) / 255.0


def read_idx(path: Path, shape: tuple[int, int, int], indices: list[int]) -> np.ndarray:
    """Images `indices` of a uint8 IDX file (MNIST layout, plain or gzipped) as float32 [N, C, H, W]."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(f"{path}: no such file") from None
    except OSError as e:
        raise SampleError(f"{path} cannot be read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise SampleError(f"{path} is a damaged gzip file") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] not in (3, 4):
        raise SampleError(f"{path} is not an IDX file of uint8 images")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SampleError(f"{path} is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise SampleError(f"{path} is truncated or corrupt ({len(raw)} bytes for images {list(dims)})")
    images = np.frombuffer(raw, np.uint8, offset=header).reshape(dims[0], -1, *dims[-2:])
    if tuple(images.shape[1:]) != tuple(shape):
        raise SampleError(f"{path} holds images of shape {list(images.shape[1:])}; the model takes {list(shape)}")
    bad = [i for i in indices if not 0 <= i < len(images)]
    if bad:
        raise SampleError(f"{path} holds {len(images)} images; index {bad[0]} is out of range")
    return images[indices].astype(np.float32) / 255.0


def input_images(
    args: argparse.Namespace, shape: tuple[int, int, int], indices: list[int], fit: dict[str, Any] | None = None
) -> np.ndarray:
    if args.images and args.idx:
        raise SampleError("give image files or --idx, not both")
    if args.images:
        return np.stack([read_png(Path(p), shape, fit) for p in args.images])
    if args.idx:
        return read_idx(Path(args.idx), shape, indices)
    raise SampleError("no input images: give image files or --idx FILE (e.g. t10k-images-idx3-ubyte.gz)")


# ---------------------------------------------------------------- images out


def grid_scale(width: int) -> int:
    """The nearest-neighbour upscale that makes an image `width` pixels wide at least MIN_CELL_PIXELS."""
    return max(1, math.ceil(MIN_CELL_PIXELS / width))


def tile(rows: list[list[np.ndarray]], scale: int | None = None) -> np.ndarray:
    """Images [C, H, W] in [0, 1] laid out row by row on black, PAD pixels apart, then upscaled
    (nearest neighbour; `scale` None: by `grid_scale`) -> uint8 [C, H', W']."""
    c, h, w = rows[0][0].shape
    cols = max(len(r) for r in rows)
    canvas = np.zeros((c, PAD + len(rows) * (h + PAD), PAD + cols * (w + PAD)), np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = PAD + i * (h + PAD), PAD + j * (w + PAD)
            canvas[:, y : y + h, x : x + w] = img
    # Round half up, as the training grids do.
    pixels = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)
    s = grid_scale(w) if scale is None else scale
    return pixels.repeat(s, axis=1).repeat(s, axis=2)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_out(out: Path) -> None:
    """`--out` may name a new file or a PNG, what the sampler writes; anything else (a model file,
    an export's manifest, a folder) is refused before any work, so no result of another step is
    ever replaced."""
    if out.is_dir():
        raise SampleError(f"--out {out} is a folder; name the PNG file to write")
    if out.exists():
        try:
            with open(out, "rb") as f:
                head = f.read(len(PNG_SIGNATURE))
        except OSError as e:
            raise SampleError(f"--out {out} cannot be read ({e.strerror or e}); choose another --out") from None
        if head != PNG_SIGNATURE:
            raise SampleError(
                f"--out {out} exists and is not a PNG; the sampler replaces only PNG files: choose another --out"
            )
    if not out.parent.is_dir():
        raise SampleError(f"cannot write {out}: folder {out.parent} does not exist")


def save_png(pixels: np.ndarray, out: Path) -> None:
    from PIL import Image

    c = pixels.shape[0]
    # uint8 [H, W] becomes an "L" image, [H, W, 3] an "RGB" one.
    image = Image.fromarray(pixels[0] if c == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    if not out.parent.is_dir():
        raise SampleError(f"cannot write {out}: folder {out.parent} does not exist")
    # Written beside and renamed: a full disk or an interrupt leaves no half PNG, and an
    # earlier file of that name stays as it was.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")  # Pillow writes no timestamp: same pixels, same bytes
        os.replace(tmp, out)
    except OSError as e:
        raise SampleError(f"cannot write {out} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def chunks(items: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------- modes


def cmd_sample(args: argparse.Namespace) -> str:
    dec = load_models(args, ("decoder",))["decoder"]
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((args.num, dec.latent_dim), dtype=np.float32)
    (x_mean,) = dec.run(z)
    per_row = args.per_row or max(1, round(math.sqrt(args.num)))
    save_png(tile(chunks(list(x_mean), per_row), args.scale), args.out)
    return f"wrote {args.out} ({args.num} samples from the prior, seed {seed})"


def cmd_reconstruct(args: argparse.Namespace) -> str:
    models = load_models(args, ("encoder", "decoder"))
    enc, dec = models["encoder"], models["decoder"]
    x = input_images(args, enc.image_shape, list(range(args.start, args.start + args.num)), enc.fit)
    mu, _ = enc.run(x)
    (recon,) = dec.run(mu)  # the decoder's mean at the posterior mean, as in the training grids
    rows = []
    for originals, reconstructions in zip(chunks(list(x), args.per_row), chunks(list(recon), args.per_row)):
        rows += [originals, reconstructions]
    save_png(tile(rows, args.scale), args.out)
    return f"wrote {args.out} ({len(x)} originals above their reconstructions)"


def cmd_interpolate(args: argparse.Namespace) -> str:
    models = load_models(args, ("encoder", "decoder"))
    enc, dec = models["encoder"], models["decoder"]
    if args.images and len(args.images) != 2:
        raise SampleError(f"interpolate takes exactly two images, got {len(args.images)}")
    x = input_images(args, enc.image_shape, list(args.pair), enc.fit)
    mu, _ = enc.run(x)
    t = np.linspace(0.0, 1.0, args.steps, dtype=np.float32)[:, None]
    (path,) = dec.run(((1 - t) * mu[0] + t * mu[1]).astype(np.float32))
    save_png(tile([[x[0], *path, x[1]]], args.scale), args.out)
    return f"wrote {args.out} ({args.steps} steps between the posterior means, originals at the ends)"


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low: int, high: int | None = None):
    """An integer option from `low` to `high`: a value past either is refused with the limit."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


# Bounds that keep a command within a device's means: a grid of at most MAX_IMAGES images (a
# 64x64 colour grid of 4096 is about 50 MB), cells at most MAX_SCALE times their size, and no more
# threads than a machine could run.
MAX_IMAGES = 4096
MAX_SCALE = 16
MAX_THREADS = 256
MAX_SEED = 2**63 - 1


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument(
        "--model-dir", type=Path, help="export folder RUN/onnx (or the run folder) [default: newest under --runs]"
    )
    common.add_argument(
        "--runs",
        type=Path,
        default=default_runs(),
        help=f"folder of runs searched without --model-dir [default: ${RUNS_ENV}, else {DEFAULT_RUNS}]",
    )
    common.add_argument(
        "--scale",
        type=at_least(1, MAX_SCALE),
        help=f"pixels per image pixel in the PNG [default: enough for images {MIN_CELL_PIXELS} pixels wide]",
    )
    common.add_argument("--encoder", type=Path, help="encoder file, instead of the one in --model-dir")
    common.add_argument("--decoder", type=Path, help="decoder file, instead of the one in --model-dir")
    common.add_argument("--threads", type=at_least(1, MAX_THREADS), default=1, help="onnxruntime threads [default: 1]")
    common.add_argument(
        "--variant",
        choices=[*VARIANT_INFIXES, "int8"],
        default="fp32",
        help="edge variant from the manifest; int8: int8-static if accepted, else int8-dynamic [default: fp32]",
    )
    common.add_argument(
        "--format",
        choices=list(FORMAT_EXTENSIONS),
        default="onnx",
        help="onnx, or ort: the variant's ORT-format copy (mobile and minimal builds) [default: onnx]",
    )
    common.add_argument(
        "--allow-rejected",
        action="store_true",
        help="use a variant even though the export rejected it (over its quality budget, or a failed check)",
    )

    parser = Parser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{sample,reconstruct,interpolate}")

    p = sub.add_parser("sample", parents=[common], help="draw N images from the prior into a grid")
    p.add_argument("-n", "--num", type=at_least(1, MAX_IMAGES), default=64, help="number of samples [default: 64]")
    p.add_argument("--seed", type=at_least(0, MAX_SEED), help="seed of the latent draws; same seed, same PNG bytes")
    p.add_argument("--per-row", type=at_least(1), help="images per grid row [default: about sqrt(N)]")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write [default: samples.png]")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", parents=[common], help="originals above their reconstructions")
    p.add_argument(
        "images", nargs="*", help="image files (PNG, JPEG, ...): any size for a prepared dataset's model, else its size"
    )
    p.add_argument("--idx", help="IDX image file (optionally .gz), e.g. the test split")
    p.add_argument(
        "-n", "--num", type=at_least(1, MAX_IMAGES), default=8, help="images taken from --idx [default: 8]"
    )
    p.add_argument("--start", type=at_least(0), default=0, help="first image taken from --idx [default: 0]")
    p.add_argument("--per-row", type=at_least(1), default=8, help="pairs per grid row [default: 8]")
    p.add_argument(
        "--out", type=Path, default=Path("reconstructions.png"), help="PNG to write [default: reconstructions.png]"
    )
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("interpolate", parents=[common], help="decode a straight line between two images' latents")
    p.add_argument("images", nargs="*", help="two image files (as for reconstruct)")
    p.add_argument("--idx", help="IDX image file (optionally .gz); see --pair")
    p.add_argument(
        "--pair",
        type=at_least(0),
        nargs=2,
        default=[0, 1],
        metavar=("I", "J"),
        help="image indices in --idx [default: 0 1]",
    )
    p.add_argument(
        "--steps", type=at_least(2, MAX_IMAGES), default=10, help="decoded points, ends included [default: 10]"
    )
    p.add_argument(
        "--out", type=Path, default=Path("interpolation.png"), help="PNG to write [default: interpolation.png]"
    )
    p.set_defaults(func=cmd_interpolate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for module in ("onnxruntime", "PIL"):
            try:
                __import__(module)
            except ImportError:
                raise SampleError(f"{module} is not installed (pip install onnxruntime numpy pillow)") from None
        check_out(args.out)
        print(args.func(args))
    except SampleError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
