"""`vae-dist web`: a static site that runs a verified export in the browser with onnxruntime-web.

    SITE/index.html, vae.js, style.css    the page (export/site/), copied as it is
    SITE/ort/                             onnxruntime-web's WebAssembly runtime: three files
    SITE/models/                          the encoder and decoder of the chosen variant
    SITE/site.json                        what the page shows and checks (SITE_FORMAT)
    SITE/test_images.u8                   TEST_IMAGES test images, uint8 [n, C, H, W], for the interpolation

onnxruntime-web is pinned by export/site/package.json and its lock file; `npm ci` installs it once
into a cache folder (RUNTIME_CACHE_ENV), from which only the files the page loads are copied. A site
is plain files: any static host serves it, as long as .mjs goes out as JavaScript and .wasm as
application/wasm (`serve` does that on this machine). Node and npm build a site; a browser opens it.
The page, its API and the tests: docs/web.md.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import numpy as np

from export import sample
from export.cli import EXIT_INTERRUPTED, EXIT_USAGE, setup_logging
from vae_dist import files, paths, runs
from vae_dist.data import builtin, splits
from vae_dist.errors import UserError
from vae_dist.record import read as read_record

log = logging.getLogger(__name__)

SITE_SOURCE = Path(__file__).with_name("site")
PAGE_FILES = ("index.html", "vae.js", "style.css")
RUNTIME_PACKAGE = "onnxruntime-web"
# What the page imports: the WebAssembly-only ES module build, its loader and its binary.
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
RUNTIME_CACHE_ENV = "VAE_DIST_CACHE"  # default: $XDG_CACHE_HOME/vae-dist, else ~/.cache/vae-dist
SITE_FORMAT = "vae-dist-web/1"
SITE_FILE = "site.json"
TEST_IMAGES_FILE = "test_images.u8"
TEST_IMAGES = 64
VARIANTS = ("fp32", "int8")  # int8: as the sampler picks it (int8-static where accepted, else int8-dynamic)
MIME_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".u8": "application/octet-stream",
}

CHROMIUM_ENV = "VAE_DIST_CHROMIUM"  # the browser the tests and make bench-web drive
DEFAULT_CHROMIUM = "/usr/bin/chromium"  # Debian's package

NPM_TIMEOUT_S = 600


class WebError(UserError):
    """A site that cannot be built from what was given; one line, exit status 2."""


def chromium_path() -> Path:
    path = Path(os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM)
    if not path.is_file():
        raise WebError(f"{path} is missing; apt-get install chromium (make browser), or set {CHROMIUM_ENV}")
    return path


def runtime_version() -> str:
    """The pinned onnxruntime-web version, as the lock file has it."""
    lock = json.loads((SITE_SOURCE / "package-lock.json").read_text())
    return lock["packages"][f"node_modules/{RUNTIME_PACKAGE}"]["version"]


def cache_root() -> Path:
    if os.environ.get(RUNTIME_CACHE_ENV):
        return Path(os.environ[RUNTIME_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae-dist"


def runtime_dist() -> Path:
    """onnxruntime-web's dist/ folder, installed with `npm ci` from the lock file on first use (the
    Makefile's `browser` target does it before the tests)."""
    lock = (SITE_SOURCE / "package-lock.json").read_bytes()
    root = cache_root()
    folder = root / f"{RUNTIME_PACKAGE}-{runtime_version()}-{hashlib.sha256(lock).hexdigest()[:12]}"
    dist = folder / "node_modules" / RUNTIME_PACKAGE / "dist"
    if (folder / ".complete").is_file() and all((dist / f).is_file() for f in RUNTIME_FILES):
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise WebError(
            f"npm is needed to install {RUNTIME_PACKAGE} when a site is built (not to open one); install "
            "Node.js and npm (apt-get install nodejs npm), or run make web"
        )
    try:
        staging = files.new_staging(folder)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(SITE_SOURCE / name, staging / name)
    except OSError as e:
        raise WebError(f"cannot write {RUNTIME_PACKAGE} into {root} ({e.strerror}); set {RUNTIME_CACHE_ENV}") from None
    log.info("installing %s %s with npm ci into %s", RUNTIME_PACKAGE, runtime_version(), folder)
    try:
        done = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        failure = None if done.returncode == 0 else _npm_error(done.stderr)
    except subprocess.TimeoutExpired:
        failure = f"no answer in {NPM_TIMEOUT_S} s; is the npm registry reachable?"
    installed = staging / "node_modules" / RUNTIME_PACKAGE / "dist"
    if failure is None and not all((installed / f).is_file() for f in RUNTIME_FILES):
        failure = f"the installed package lacks one of {', '.join(RUNTIME_FILES)}"
    if failure is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise WebError(f"npm ci could not install {RUNTIME_PACKAGE} {runtime_version()}: {failure}")
    (staging / ".complete").touch()
    # A complete install another build finished first is used as it is, never replaced; a damaged
    # one (files deleted by hand) is.
    files.publish(staging, folder, keep_existing=lambda found: (found / ".complete").is_file())
    return dist


def _npm_error(stderr: str) -> str:
    """npm's own reason: its first error line, not the pointer to its log file."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("npm error") and "complete log" not in line]
    return (reasons or lines or ["no message"])[0]


@dataclass
class Export:
    folder: Path  # RUN/onnx
    manifest: dict[str, Any]
    variant: str  # the manifest's name: fp32, int8-dynamic, int8-static
    files: dict[str, Path]  # role -> model file
    image_shape: tuple[int, int, int]
    latent_dim: int


def newest_export(output_dir: Path) -> Path:
    """The newest verified export under `output_dir` (by its manifest's modification time); an
    export a kill left aside is put back first."""
    for run_dir in output_dir.iterdir() if output_dir.is_dir() else ():
        files.restore_moved_aside(run_dir / runs.ONNX_DIR)
    try:
        return sample.find_default_model_dir(output_dir)
    except sample.SampleError:
        raise WebError(f"no verified export under {output_dir}/; export a run (vae-dist export), or name one") from None


def find_export(run: str | None, output_dir: Path, variant: str) -> Export:
    """The verified export of RUN (a run folder, its onnx folder, or a run name), else the newest
    verified one under `output_dir`; its files of `variant`, checked against the manifest."""
    if run is None:
        folder = newest_export(output_dir)
    else:
        folder = runs.locate(run, output_dir)
        files.restore_moved_aside(folder / runs.ONNX_DIR)  # an export a kill left aside mid-swap
        if (folder / runs.ONNX_DIR).is_dir() and not (folder / runs.MANIFEST_FILE).is_file():
            folder = folder / runs.ONNX_DIR
        if not folder.is_dir():
            raise WebError(f"{run}: no such run or export folder")
        if not (folder / runs.MANIFEST_FILE).is_file():
            raise WebError(f"{folder} holds no export (no {runs.MANIFEST_FILE}); export the run first: vae-dist export")
    manifest = sample.read_manifest(folder)
    name, suffix = sample.variant_files(folder, variant, "onnx", allow_rejected=False, hint=False)
    models = {role: sample.load_model(folder / f"{role}{suffix}", role, threads=1) for role in ("encoder", "decoder")}
    if models["encoder"].source != models["decoder"].source:
        raise WebError(f"{folder}: the encoder and decoder were exported from different models")
    if sample.read_manifest(folder) != manifest:  # the checks above read it too: they judged this one
        raise WebError(f"{folder} changed while the site was being built (an export or verify?); build it again")
    first = models["decoder"]
    return Export(
        folder,
        manifest,
        name,
        {r: m.path for r, m in models.items()},
        first.image_shape,
        first.latent_dim,
    )


def test_images(export: Export, where: str | Path | None) -> np.ndarray:
    """The first TEST_IMAGES images of the model's test split, uint8 [n, C, H, W], from the data set
    that the run's model file names: the file the export was verified from (its sha256 is in the
    manifest), not the manifest's own copy of the name, which no hash covers."""
    model_path = export.folder.parent / runs.MODEL_FILE
    source = (export.manifest.get("source") or {}).get("sha256")
    if not model_path.is_file() or sample.file_sha256(model_path) != source:
        raise WebError(
            f"{model_path} is missing or is not the model {export.folder} was verified from; the site takes its "
            "test images from the data set that model names: export the run again (vae-dist export RUN)"
        )
    dataset = read_record(model_path).dataset
    images = splits.split_for_model(dataset, export.image_shape, False, where)
    return images[:TEST_IMAGES].numpy()


def site_facts(export: Export, site: Path, images: np.ndarray) -> dict[str, Any]:
    """site.json for the files copied into `site`, which must be the verified ones byte for byte."""
    manifest = export.manifest
    listed = {**(manifest.get("files") or {})}
    for entry in (manifest.get("variants") or {}).values():
        listed.update(entry.get("files") or {})
    graphs = {}
    for role, path in export.files.items():
        copy = site / "models" / path.name
        digest = sample.file_sha256(copy)
        if digest != (listed.get(path.name) or {}).get("sha256"):
            raise WebError(f"{copy} differs from the verified {path}; was the export changed during the build?")
        inputs, outputs = sample.SIGNATURES[role]
        graphs[role] = {
            "path": f"models/{path.name}",
            "size": copy.stat().st_size,
            "sha256": digest,
            "input": inputs[0],
            "outputs": outputs,
        }
    model = dict(manifest.get("model") or {})
    dataset = model.get("dataset")
    if isinstance(dataset, str) and dataset not in builtin.DATASETS:
        model["dataset"] = Path(dataset).name  # a prepared folder: its name, not this machine's path
    entry = (manifest.get("variants") or {}).get(export.variant) or {}
    return {
        "format": SITE_FORMAT,
        "run": manifest.get("run"),
        "model": {**model, "latent_dim": export.latent_dim, "image_shape": list(export.image_shape)},
        "variant": export.variant,
        "status": "verified",  # find_export accepts nothing else
        "files": graphs,
        "variant_quality": entry.get("quality"),
        "test_images": {
            "path": TEST_IMAGES_FILE,
            "count": int(images.shape[0]),
            "shape": list(images.shape[1:]),
            "sha256": sample.file_sha256(site / TEST_IMAGES_FILE),
        },
        "runtime": {"package": RUNTIME_PACKAGE, "version": runtime_version()},
        "exported_at": manifest.get("exported_at"),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def site_format(folder: Path) -> str | None:
    """The format of the site in `folder`, or None if it holds none."""
    try:
        found = json.loads((folder / SITE_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found.startswith("vae-dist-web/") else None


def check_out(out: Path, export: Export) -> Path:
    """`out` made absolute, refused if it holds anything but an earlier site or lies in the export
    folder (which the next `vae-dist export` replaces whole)."""
    out = out.resolve()
    if out.parent == out:
        raise WebError(f"--out {out} is a file system root; choose a folder for the site")
    if out == export.folder.resolve() or export.folder.resolve() in out.parents:
        raise WebError(f"--out {out} is inside the export folder {export.folder}; choose a folder beside it")
    if out.exists() and not (out.is_dir() and (site_format(out) or not any(out.iterdir()))):
        raise WebError(f"{out} exists and is not a site built by vae-dist web; choose another --out")
    return out


def build_site(export: Export, out: Path, where: str | Path | None = None) -> dict[str, Any]:
    """Write the site of `export` into `out` whole: staged beside it, then swapped in (the old site
    stays as it was if anything fails). An `out` that holds anything but an earlier site is refused."""
    out = check_out(out, export)
    with files.one_writer(out, f"the site {out}", "wait for it to end"):
        images = test_images(export, where)
        dist = runtime_dist()
        staging = None
        try:
            staging = files.new_staging(out)
            (staging / "ort").mkdir()
            (staging / "models").mkdir()
            for name in PAGE_FILES:
                shutil.copyfile(SITE_SOURCE / name, staging / name)
            for name in RUNTIME_FILES:
                shutil.copyfile(dist / name, staging / "ort" / name)
            for path in export.files.values():
                shutil.copyfile(path, staging / "models" / path.name)
            np.ascontiguousarray(images, dtype=np.uint8).tofile(staging / TEST_IMAGES_FILE)
            facts = site_facts(export, staging, images)
            (staging / SITE_FILE).write_text(json.dumps(facts, indent=1) + "\n")
            files.publish(staging, out)
        except OSError as e:
            reason = e.strerror or e
            raise WebError(f"cannot write the site into {out} ({reason}); an earlier site is unchanged") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return facts


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with the MIME types a browser insists on for ES modules and WebAssembly."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self):
        self.send_header("Cache-Control", "no-cache")  # a rebuilt site is picked up on reload
        super().end_headers()

    def send_head(self):
        if "\0" in unquote(self.path):  # no file has such a name; os.path would raise on it
            self.send_error(400, "a path with a NUL character")
            return None
        return super().send_head()

    def log_message(self, format, *args):  # quiet: one line per failed request only
        if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
            super().log_message(format, *args)


def make_server(folder: Path, port: int, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    return http.server.ThreadingHTTPServer((host, port), partial(Handler, directory=str(folder)))


@click.command("web")
@click.argument("run", required=False)
@click.option(
    "--variant",
    type=click.Choice(VARIANTS),
    default="fp32",
    show_default=True,
    help="The model files the page runs; int8: int8-static where accepted, else int8-dynamic.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Site folder (default RUN/web).")
@click.option("--serve", is_flag=True, help="Then serve the site on localhost until Ctrl-C.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--data", "where", type=click.Path(file_okay=False), help="Where the run's data set is, if moved.")
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of runs: searched when RUN is omitted or given by name (default $VAE_DIST_RUNS or runs).",
)
def web_command(run, variant, out, serve, port, where, output_dir):
    """Build a static site that samples, explores and interpolates with RUN's verified export in the
    browser (onnxruntime-web, WebAssembly); RUN defaults to the newest verified export."""
    setup_logging()  # the one-time npm install says what it is doing
    output_dir = output_dir if output_dir is not None else paths.runs_dir()
    server = facts = None
    try:
        if serve:  # a busy port is found before the build, not after
            try:
                server = make_server(Path("."), port)
            except OSError as e:
                raise WebError(f"cannot serve on port {port} ({e.strerror}); pass another --port") from None
        export = find_export(run, output_dir, variant)
        out = out or export.folder.parent / runs.WEB_DIR
        facts = build_site(export, out, where)
    except sample.SampleError as e:  # unverified exports exit 1, mistakes 2, as the sampler's
        click.echo(f"error: {e}", err=True)
        sys.exit(e.status)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted; an earlier site is unchanged", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if server is not None and facts is None:  # the build failed: free the port
            server.server_close()
    sizes = ", ".join(f"{Path(f['path']).name} {f['size'] / 1e6:.2f} MB" for f in facts["files"].values())
    click.echo(f"{out}: {facts['run']} ({facts['variant']}: {sizes})")
    if server is None:
        serve = f"python3 -m http.server -d {out} --bind 127.0.0.1 8000"
        click.echo(f"open it: {serve}, then http://127.0.0.1:8000/ (or any static host)")
        return
    server.RequestHandlerClass = partial(Handler, directory=str(out))
    click.echo(f"serving {out} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
