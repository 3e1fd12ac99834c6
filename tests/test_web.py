"""`vae-dist web`: the static site, opened in a real headless Chromium; what the browser computes
against Python onnxruntime on the same files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from export import sample, web
from export.pipeline import export_run
from helpers import TINY_TEST_NEG_ELBO, flip_byte, make_run
from helpers import run as run_command
from vae_dist.cli import main as cli_main
from vae_dist.data import prepare

SLIDERS = 32  # vae.js: MAX_SLIDERS
READY_S = 120  # a page that neither loads nor fails within this is a failure, not a hang


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = web.chromium_path()  # `make test` installs it (Makefile: browser)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, emoji_dir) -> dict[str, Path]:
    """Tiny exported runs: the shipped linear model's 1x28x28 shape, and a 3x64x64 colour CNN on
    the real emoji set, each with its int8 variants."""
    root = tmp_path_factory.mktemp("web")
    emoji = prepare.prepare(emoji_dir, root / "emoji").out
    runs = {
        "linear": make_run(root / "runs", "linear-tiny", "linear"),
        "conv64": make_run(
            root / "runs", "conv64-tiny", "conv", shape=(3, 64, 64), dataset=str(emoji), latent_dim=SLIDERS + 8
        ),
    }
    for kind, run in runs.items():
        result = export_run(run, variants=["int8-dynamic", *(["int8-static"] if kind == "conv64" else [])])
        assert result.verified, result.report.failure_lines()
    statuses = json.loads((runs["conv64"] / "onnx" / "manifest.json").read_text())["variants"]
    assert statuses["int8-static"]["status"] == "verified", "the QDQ variant must be tested in the browser"
    return runs


class Site:
    """A built site served on a free localhost port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.server = web.make_server(folder, 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def build(run: Path, out: Path, variant: str = "fp32") -> Site:
    result = CliRunner().invoke(cli_main, ["web", str(run), "--out", str(out), "--variant", variant])
    assert result.exit_code == 0, result.output
    return Site(out)


def open_page(browser, site: Site, init_script: str | None = None):
    page = browser.new_page()
    messages = []
    page.on("console", lambda m: messages.append((m.type, m.text)))
    page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
    if init_script:
        page.add_init_script(init_script)
    page.goto(site.url)
    return page, messages


def ready(page) -> dict:
    return page.evaluate(
        """(s) => Promise.race([
            window.vae.ready,
            new Promise((_, no) => setTimeout(() => no(new Error(`not ready in ${s} s`)), s * 1000)),
        ])""",
        READY_S,
    )


def outcome(page) -> str:
    """How window.vae.ready settled: 'resolved', or the rejection's text."""
    return page.evaluate(
        """(s) => Promise.race([
            window.vae.ready.then(() => 'resolved', (e) => String(e)),
            new Promise((ok) => setTimeout(() => ok(`not settled in ${s} s`), s * 1000)),
        ])""",
        READY_S,
    )


def draws(page, selector: str) -> int:
    """How many times the page has drawn a canvas (vae.js counts them in data-draws)."""
    return int(page.get_attribute(selector, "data-draws") or 0)


def wait_drawn(page, selector: str, after: int) -> None:
    page.wait_for_function(
        "([sel, n]) => Number(document.querySelector(sel).dataset.draws || 0) > n", arg=[selector, after]
    )


def onnx_outputs(path: Path, name: str, x: np.ndarray) -> list[np.ndarray]:
    """Python onnxruntime's outputs, with the sampler's session options: exact int8 arithmetic,
    which the WebAssembly kernels compute too (the default x86 AVX2 kernels can saturate: 0.08 off
    on a decoder pixel of these tiny models)."""
    session = ort.InferenceSession(str(path), sample.session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})


@pytest.mark.parametrize("kind", ["linear", "conv64"])
@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_the_browser_computes_what_onnxruntime_computes(browser, exports, tmp_path, kind, variant):
    site = build(exports[kind], tmp_path / "site", variant)
    try:
        page, messages = open_page(browser, site)
        facts = ready(page)
        expected = {"fp32": "fp32", "int8": "int8-static" if kind == "conv64" else "int8-dynamic"}[variant]
        assert facts["variant"] == expected  # int8: the calibrated variant where it was accepted
        latent, shape = facts["model"]["latent_dim"], tuple(facts["model"]["image_shape"])
        rng = np.random.default_rng(0)
        n = 5
        z = rng.standard_normal((n, latent)).astype(np.float32)
        got = np.array(
            page.evaluate(
                "([z, n]) => window.vae.decode(new Float32Array(z), n).then(Array.from)", [z.ravel().tolist(), n]
            ),
            dtype=np.float32,
        )
        decoder = site.folder / facts["files"]["decoder"]["path"]
        (want,) = onnx_outputs(decoder, "z", z)
        assert got.shape == (n * int(np.prod(shape)),)
        assert np.abs(got - want.ravel()).max() <= 1e-5

        images = np.fromfile(site.folder / web.TEST_IMAGES_FILE, dtype=np.uint8).reshape(-1, *shape)
        x = images[:n].astype(np.float32) / 255
        got = page.evaluate(
            "([x, n]) => window.vae.encode(new Float32Array(x), n)"
            ".then(r => ({mu: Array.from(r.mu), logvar: Array.from(r.logvar)}))",
            [x.ravel().tolist(), n],
        )
        mu, logvar = onnx_outputs(site.folder / facts["files"]["encoder"]["path"], "x", x)
        assert np.abs(np.array(got["mu"], dtype=np.float32) - mu.ravel()).max() <= 1e-5
        assert np.abs(np.array(got["logvar"], dtype=np.float32) - logvar.ravel()).max() <= 1e-5
        assert [m for m in messages if m[0] in ("error", "pageerror", "warning")] == []
        page.close()
    finally:
        site.close()


def canvas_pixels(page, selector: str) -> np.ndarray:
    """The RGBA pixels of a canvas on the page."""
    data = page.evaluate(
        """(sel) => { const c = document.querySelector(sel);
                      return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""",
        selector,
    )
    return np.array(data, dtype=np.uint8)


@pytest.fixture(scope="module")
def linear_site(exports, tmp_path_factory):
    site = build(exports["linear"], tmp_path_factory.mktemp("linear-site") / "site")
    yield site
    site.close()


def test_the_page_draws_samples_and_a_slider_redraws_the_explorer(browser, linear_site):
    page, messages = open_page(browser, linear_site)
    facts = ready(page)
    samples = canvas_pixels(page, "#samples")
    assert samples.size and len(np.unique(samples)) > 10, "the sample grid is blank"
    page.evaluate("() => { document.getElementById('seed').value = '7'; }")  # no change event: no draw
    drawn = draws(page, "#samples")
    page.click("#new-samples")
    wait_drawn(page, "#samples", drawn)
    assert page.input_value("#seed") == "8"
    assert not np.array_equal(canvas_pixels(page, "#samples"), samples), "new samples drew the same grid"

    before, drawn = canvas_pixels(page, "#explorer"), draws(page, "#explorer")
    page.fill("#z0", "2.5")  # a range input: sets the value and fires input
    wait_drawn(page, "#explorer", drawn)
    assert not np.array_equal(before, canvas_pixels(page, "#explorer")), "moving a slider did not redraw"
    assert page.locator("#sliders input[type=range]").count() == min(SLIDERS, facts["model"]["latent_dim"])

    shown = {
        key: page.inner_text(f'#facts [data-fact="{key}"]')
        for key in ("run", "kind", "image_shape", "dataset", "status", "variant", "test_neg_elbo", "decoder")
    }
    assert shown["run"] == facts["run"] and shown["kind"] == "linear" and shown["variant"] == "fp32"
    assert shown["image_shape"] == "1 × 28 × 28" and shown["dataset"] == "fashion-mnist"
    assert shown["status"] == "verified" and shown["test_neg_elbo"] == f"{TINY_TEST_NEG_ELBO:.2f}"
    size = facts["files"]["decoder"]["size"] / 1e6
    assert shown["decoder"] == f"models/decoder.onnx ({size:.2f} MB)"
    assert page.is_hidden("#error")
    assert [m for m in messages if m[0] in ("error", "pageerror", "warning")] == []
    page.close()


def test_sliders_cover_at_most_the_first_dimensions(browser, exports, tmp_path):
    site = build(exports["conv64"], tmp_path / "site")
    try:
        page, _ = open_page(browser, site)
        facts = ready(page)
        assert facts["model"]["latent_dim"] > SLIDERS
        assert page.locator("#sliders input[type=range]").count() == SLIDERS
        page.close()
    finally:
        site.close()


def test_interpolation_between_two_picked_test_images(browser, linear_site):
    page, _ = open_page(browser, linear_site)
    ready(page)
    first = canvas_pixels(page, "#interpolation")
    thumbs = page.locator("#test-images .thumb")
    assert thumbs.count() == web.TEST_IMAGES
    drawn = draws(page, "#interpolation")
    thumbs.nth(5).click()
    thumbs.nth(9).click()
    page.wait_for_function("() => document.querySelector('#interpolation').dataset.b === '9'")
    wait_drawn(page, "#interpolation", drawn + 1)
    assert page.get_attribute("#interpolation", "data-a") == "5"
    assert not np.array_equal(canvas_pixels(page, "#interpolation"), first)
    page.close()


def test_the_page_times_its_own_decoder(browser, linear_site):
    page, _ = open_page(browser, linear_site)
    ready(page)
    for batch in (1, 64):
        timing = page.evaluate("(b) => window.vae.latency(b, 3)", batch)
        assert timing["batch"] == batch and timing["repeats"] == 3
        assert 0 < timing["min_ms"] <= timing["median_ms"] < 10_000
        assert 1 <= timing["calls_per_sample"] <= 1024 and timing["min_sample_ms"] > 0
    assert 0 < page.evaluate("() => window.vae.redrawLatency(3)") < 10_000
    page.close()


def test_the_page_checks_files_without_crypto_subtle(browser, linear_site):
    """Plain-http hosts have no crypto.subtle; the page's own SHA-256 must accept the real files."""
    page, messages = open_page(
        browser, linear_site, "Object.defineProperty(Crypto.prototype, 'subtle', {get: () => undefined})"
    )
    assert page.evaluate("() => globalThis.crypto.subtle") is None
    assert ready(page)["run"] == "linear-tiny"
    assert [m for m in messages if m[0] in ("error", "pageerror")] == []
    page.close()


def _remove(folder: Path, facts: dict) -> str:
    (folder / facts["files"]["decoder"]["path"]).unlink()
    return Path(facts["files"]["decoder"]["path"]).name


def _corrupt(folder: Path, facts: dict) -> str:
    path = folder / facts["files"]["encoder"]["path"]
    flip_byte(path, path.stat().st_size // 2)
    return path.name


def _rejected(folder: Path, facts: dict) -> str:
    (folder / web.SITE_FILE).write_text(json.dumps({**facts, "status": "rejected"}))
    return 'Refusing to run: model variant "fp32" has status "rejected", not "verified".'


def _no_runtime(folder: Path, facts: dict) -> str:
    (folder / "ort" / "ort-wasm-simd-threaded.wasm").unlink()
    return "WebAssembly could not start: "


def _missing_message(folder: Path, facts: dict) -> str:
    return f"Model file models/{_remove(folder, facts)} is missing (HTTP 404)."


def _corrupt_message(folder: Path, facts: dict) -> str:
    return f"Model file models/{_corrupt(folder, facts)} is corrupt: its sha256 does not match site.json."


def _corrupt_test_images(folder: Path, facts: dict) -> str:
    flip_byte(folder / facts["test_images"]["path"], 0)
    return f"Test image file {facts['test_images']['path']} is corrupt: its sha256 does not match site.json."


def _no_webassembly(folder: Path, facts: dict) -> str:
    return "WebAssembly could not start: this browser does not provide WebAssembly."


@pytest.mark.parametrize(
    "damage, init_script",
    [
        (_missing_message, None),
        (_corrupt_message, None),
        (_corrupt_test_images, None),
        (_rejected, None),
        (_no_runtime, None),
        (_no_webassembly, "delete window.WebAssembly"),
    ],
    ids=[
        "missing-file", "corrupt-file", "corrupt-test-images", "rejected-variant", "runtime-missing", "no-webassembly"
    ],
)
def test_each_failure_shows_its_message_on_the_page(browser, linear_site, tmp_path, damage, init_script):
    folder = Path(shutil.copytree(linear_site.folder, tmp_path / "site"))
    expected = damage(folder, json.loads((folder / web.SITE_FILE).read_text()))
    site = Site(folder)
    try:
        page, _ = open_page(browser, site, init_script)
        settled = outcome(page)
        message = page.inner_text("#error")
        assert message.startswith(expected) and page.is_visible("#error") and page.is_hidden("#app"), message
        assert settled == f"Error: {message}"
        page.close()
    finally:
        site.close()


@pytest.mark.parametrize(
    "script, expected",
    [
        (None, "vae.js could not be loaded."),
        ("const broken = ;\n", "The page could not start: vae.js did not run in this browser"),
    ],
    ids=["missing", "unparsable"],
)
def test_a_page_whose_script_cannot_run_says_so(browser, linear_site, tmp_path, script, expected):
    folder = Path(shutil.copytree(linear_site.folder, tmp_path / "site"))
    if script is None:
        (folder / "vae.js").unlink()
    else:
        (folder / "vae.js").write_text(script)
    site = Site(folder)
    try:
        page, _ = open_page(browser, site)
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error").startswith(expected)
        assert page.is_hidden("#status") and page.is_hidden("#app")
        page.close()
    finally:
        site.close()


def test_the_site_holds_the_page_the_runtime_the_models_and_test_images(exports, tmp_path):
    out = tmp_path / "site"
    build(exports["conv64"], out).close()
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == sorted(
        [
            *web.PAGE_FILES,
            *(f"ort/{f}" for f in web.RUNTIME_FILES),
            "models/encoder.onnx",
            "models/decoder.onnx",
            web.SITE_FILE,
            web.TEST_IMAGES_FILE,
        ]
    )
    facts = json.loads((out / web.SITE_FILE).read_text())
    manifest = json.loads((exports["conv64"] / "onnx" / "manifest.json").read_text())
    assert facts["model"]["image_shape"] == [3, 64, 64] and facts["model"]["dataset"] == "emoji"
    assert facts["status"] == "verified" and facts["runtime"]["version"] == web.runtime_version()
    for role in ("encoder", "decoder"):
        entry = facts["files"][role]
        assert entry["sha256"] == manifest["files"][f"{role}.onnx"]["sha256"]
        assert entry["size"] == (out / entry["path"]).stat().st_size
    images = np.fromfile(out / web.TEST_IMAGES_FILE, dtype=np.uint8)
    assert images.size == web.TEST_IMAGES * 3 * 64 * 64
    from vae_dist.data import splits

    test = splits.split_for_model(manifest["model"]["dataset"], (3, 64, 64), False)
    assert np.array_equal(images.reshape(-1, 3, 64, 64), test[: web.TEST_IMAGES].numpy())


def test_the_server_sends_module_and_webassembly_types(linear_site):
    from urllib.request import urlopen

    for name, kind in [
        ("ort/ort.wasm.min.mjs", "text/javascript"),
        ("ort/ort-wasm-simd-threaded.wasm", "application/wasm"),
        ("index.html", "text/html"),
        (web.SITE_FILE, "application/json"),
    ]:
        with urlopen(linear_site.url + name) as response:
            assert response.headers["Content-Type"].split(";")[0] == kind, name


def _web(*args: str):
    return CliRunner().invoke(cli_main, ["web", *args])


def test_unverified_exports_and_rejected_variants_are_refused(exports, tmp_path):
    run = Path(shutil.copytree(exports["linear"], tmp_path / "run"))
    manifest_path = run / "onnx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["variants"]["int8-dynamic"]["status"] = "rejected"
    manifest["variants"]["int8-dynamic"]["reasons"] = ["quality cost over the budget"]
    manifest_path.write_text(json.dumps(manifest))
    result = _web(str(run), "--variant", "int8")
    assert result.exit_code == 1 and "quality cost over the budget" in result.output, result.output
    assert "--allow-rejected" not in result.output and not (run / "web").exists()

    manifest_path.write_text(json.dumps({**manifest, "verified": False}))
    result = _web(str(run))
    assert result.exit_code == 1 and "did not pass verification" in result.output
    assert not (run / "web").exists()


def test_a_folder_that_is_not_a_site_is_never_overwritten(exports, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _web(str(exports["linear"]), "--out", str(out))
    assert result.exit_code == 2 and "is not a site built by vae-dist web" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_site_inside_the_export_folder_is_refused(exports, tmp_path):
    run = Path(shutil.copytree(exports["linear"], tmp_path / "run"))
    result = _web(str(run), "--out", str(run / "onnx" / "web"))
    assert result.exit_code == 2 and "inside the export folder" in result.output
    assert not (run / "onnx" / "web").exists()
    result = _web(str(run), "--out", "/")
    assert result.exit_code == 2 and "error: --out / is a file system root" in result.output


def test_an_export_that_changes_during_the_build_is_refused(exports, tmp_path, monkeypatch):
    """The files are checked against the manifest the checks read; a `vae-dist export` or `verify`
    that rewrites it meanwhile must not give a site that claims the new one's verdict."""
    run = Path(shutil.copytree(exports["linear"], tmp_path / "run"))
    manifest_path = run / "onnx" / "manifest.json"
    real_load = web.sample.load_model

    def load_then_rewrite(path, role, threads):
        model = real_load(path, role, threads)
        if role == "decoder":  # the last file checked: then the export is verified again, and fails
            manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "verified": False}))
        return model

    monkeypatch.setattr(web.sample, "load_model", load_then_rewrite)
    result = _web(str(run), "--out", str(tmp_path / "site"))
    assert result.exit_code == 2 and "changed while the site was being built" in result.output
    assert not (tmp_path / "site").exists()


def test_a_busy_port_is_found_before_anything_is_built(exports, tmp_path):
    import socket

    run = Path(shutil.copytree(exports["linear"], tmp_path / "run"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = _web(str(run), "--serve", "--port", str(busy.getsockname()[1]))
    assert result.exit_code == 2 and "pass another --port" in result.output
    assert not (run / "web").exists()


def test_a_rebuild_replaces_the_earlier_site_whole(exports, tmp_path):
    run = Path(shutil.copytree(exports["linear"], tmp_path / "run"))
    assert _web(str(run), "--variant", "int8").exit_code == 0
    assert (run / "web" / "models" / "decoder.int8-dynamic.onnx").is_file()
    assert _web(str(run)).exit_code == 0
    assert sorted(p.name for p in (run / "web" / "models").iterdir()) == ["decoder.onnx", "encoder.onnx"]
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors", "onnx", "web"]  # no staging left


def test_without_npm_the_error_says_what_to_install(exports, tmp_path, monkeypatch):
    monkeypatch.setenv(web.RUNTIME_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(web.shutil, "which", lambda name: None)
    result = _web(str(exports["linear"]), "--out", str(tmp_path / "site"))
    assert result.exit_code == 2 and "npm is needed" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "site").exists()


def test_the_browser_benchmark_reports_both_models_against_native(exports, tmp_path):
    """`make bench-web` on the tiny exports: a figure for every model and batch, a screenshot, the
    JSON record; the timings themselves are not asserted."""
    from export import bench_web

    def bench(*args: str) -> subprocess.CompletedProcess:  # its own process: playwright's sync API is in use here
        return run_command([sys.executable, "-m", "export.bench_web", *args], check=False, environ=os.environ)

    out, shot = tmp_path / "web.json", tmp_path / "page.png"
    runs_dir = exports["linear"].parent
    result = bench("--output-dir", str(runs_dir), "--repeats", "2", "--json", str(out), "--screenshot", str(shot))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["chromium"].split(".")[0].isdigit()
    assert sorted(r["kind"] for r in doc["results"]) == ["conv", "linear"]
    for r in doc["results"]:
        for batch in bench_web.BATCHES:
            b = r[f"batch_{batch}"]
            assert b["browser_ms"] > 0 and b["native_ms"] > 0
            assert b["ratio"] == pytest.approx(b["browser_ms"] / b["native_ms"])
        assert r["redraw_ms"] > 0
    assert "linear batch 1, browser / native:" in result.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = bench("--output-dir", str(tmp_path / "none"), "--json", str(out))
    assert empty.returncode == 2 and empty.stderr.startswith("error: no verified export under")
