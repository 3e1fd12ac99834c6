"""`make bench-web`: how fast an export decodes in the browser, next to native onnxruntime.

For the newest verified export of each model kind (or the runs given), builds its site, opens it
in headless Chromium and asks the page itself (`window.vae.latency`, `window.vae.redrawLatency`):
decode latency at batch 1 and 64 with onnxruntime-web's WebAssembly backend on one thread, and the
time one slider move takes to redraw the explorer. Native onnxruntime runs the same files on one
thread. Goals: a redraw under REDRAW_GOAL_MS for every model; the linear decoder's batch-1 latency
in the browser within LINEAR_GOAL times native.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from export import sample, web
from vae_dist import files, paths, runs
from vae_dist.data import builtin
from vae_dist.errors import UserError

FORMAT = "vae-dist-bench-web/1"  # the result file's "format"
BATCHES = (1, 64)
REDRAW_GOAL_MS = 16.0  # one frame at 60 Hz
LINEAR_GOAL = 4.0
READY_S = 120  # a page that neither starts nor fails in this time is reported, not waited on
READY_JS = """(s) => Promise.race([
    window.vae.ready.then(() => null, (e) => e.message),
    new Promise((ok) => setTimeout(() => ok(`not ready in ${s} s`), s * 1000)),
])"""


def newest_exports(output_dir: Path) -> dict[str, Path]:
    """Model kind -> the newest verified export folder of that kind, preferring the built-in data sets."""
    found: dict[str, tuple[bool, float, Path]] = {}
    for manifest_path in output_dir.glob(f"*/{runs.ONNX_DIR}/{runs.MANIFEST_FILE}"):
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            continue
        model = manifest.get("model") or {}
        if manifest.get("verified") is not True or "kind" not in model:
            continue
        key = (model.get("dataset") in builtin.DATASETS, manifest_path.stat().st_mtime, manifest_path.parent)
        if model["kind"] not in found or key[:2] > found[model["kind"]][:2]:
            found[model["kind"]] = key
    return {kind: folder for kind, (_, _, folder) in sorted(found.items())}


def native_latency(path: Path, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Median and best milliseconds of one decoder call on one thread, after three warm-up calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {sample.SIGNATURES["decoder"][0][0]: np.random.default_rng(12345).standard_normal(shape).astype(np.float32)}
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def measure(browser, folder: Path, repeats: int, screenshot: Path | None = None) -> dict:
    """Build the site of the export in `folder` in a temporary place and time it in the browser."""
    export = web.find_export(str(folder), folder.parent.parent, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        facts = web.build_site(export, site)
        server = web.make_server(site, 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            failure = page.evaluate(READY_JS, READY_S)
            if failure:
                raise web.WebError(f"the page of {folder} did not start: {failure}")
            result = {"run": facts["run"], "kind": facts["model"]["kind"], "shape": facts["model"]["image_shape"]}
            for batch in BATCHES:
                browser_ms = page.evaluate("([b, r]) => window.vae.latency(b, r)", [batch, repeats])
                result["min_sample_ms"] = browser_ms["min_sample_ms"]
                native = native_latency(export.files["decoder"], (batch, export.latent_dim), repeats)
                result[f"batch_{batch}"] = {
                    "browser_ms": browser_ms["median_ms"],
                    "native_ms": native["median_ms"],
                    "ratio": browser_ms["median_ms"] / native["median_ms"],
                }
            result["redraw_ms"] = page.evaluate("(r) => window.vae.redrawLatency(r)", repeats)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            page.close()
            server.shutdown()
            server.server_close()
    return result


@click.command()
@click.argument("run_names", nargs=-1)
@click.option("--output-dir", type=click.Path(path_type=Path), default=paths.runs_dir, show_default="runs")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--screenshot", type=click.Path(dir_okay=False, path_type=Path), help="A PNG of the first model's page.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="bench/web.json", show_default=True)
def main(run_names, output_dir, repeats, screenshot, json_path):
    """Decode latency in headless Chromium against native onnxruntime."""
    from playwright.sync_api import sync_playwright

    try:
        files.check_json_output(Path(json_path), FORMAT, frozenset({"chromium", "results"}))
        if screenshot is not None:
            sample.check_out(screenshot)  # a PNG, or nothing yet
    except (UserError, sample.SampleError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if run_names:
        folders = {name: runs.locate(name, output_dir) / runs.ONNX_DIR for name in run_names}
    else:
        folders = newest_exports(output_dir)
    if not folders:
        click.echo(f"error: no verified export under {output_dir}/; run make demo first", err=True)
        sys.exit(2)
    results = []
    try:
        chromium = web.chromium_path()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
            for i, folder in enumerate(folders.values()):
                results.append(measure(browser, folder, repeats, screenshot if i == 0 else None))
            version = browser.version
            browser.close()
    except (sample.SampleError, UserError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(
        f"decoder latency per call, median of {repeats} timings (in the browser each times calls spanning "
        f"{results[0]['min_sample_ms']:g} ms), one thread (Chromium {version}, onnxruntime-web "
        f"{web.runtime_version()} WebAssembly; native onnxruntime)"
    )
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        for batch in BATCHES:
            b = r[f"batch_{batch}"]
            click.echo(
                f"  {r['run']:<24} {r['kind']:<6} {shape:<8} batch {batch:>2}: browser {b['browser_ms']:8.3f} "
                f"ms, native {b['native_ms']:8.3f} ms, {b['ratio']:.2f}x"
            )
        mark = "met" if r["redraw_ms"] < REDRAW_GOAL_MS else "NOT met"
        click.echo(f"  {r['run']:<24} slider redraw {r['redraw_ms']:.2f} ms (goal < {REDRAW_GOAL_MS:g} ms: {mark})")
    for r in results:
        if r["kind"] == "linear":
            ratio = r["batch_1"]["ratio"]
            mark = "met" if ratio <= LINEAR_GOAL else "NOT met"
            click.echo(f"linear batch 1, browser / native: {ratio:.2f}x (goal <= {LINEAR_GOAL:g}x: {mark})")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    result = {"format": FORMAT, "chromium": version, "results": results}
    files.atomic_write_text(Path(json_path), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
