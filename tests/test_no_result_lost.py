"""No result lost, from the outside: outputs never replace what their command did not write, one
writer per run, export or dataset, `prepare` stopped at any point, training that diverges."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import BIN, DEAD_PID, ROOT, env, file_hashes, make_run, run
from vae_dist import files
from vae_dist.runs import MODEL_FILE

HOLD = """
import sys, time
from pathlib import Path
from vae_dist import files
with files.one_writer(Path(sys.argv[1]), "x", "y"):
    print("holding", flush=True)
    time.sleep(600)
"""


def holder(target):
    """A process that holds `target`'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env())
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_the_sampler_replaces_only_a_png(tmp_path):
    run_dir = make_run(tmp_path, "r", "linear")
    before = (run_dir / MODEL_FILE).read_bytes()
    proc = run([sys.executable, "-m", "export.sample", "sample", "--out", str(run_dir / MODEL_FILE)], check=False)
    assert proc.returncode == 2 and "exists and is not a PNG" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / MODEL_FILE).read_bytes() == before
    proc = run([sys.executable, "-m", "export.sample", "sample", "--out", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "is a folder" in proc.stderr


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(tmp_path):
    target = tmp_path / "runs" / "same"
    first = holder(target)
    try:
        with pytest.raises(files.Busy, match=rf"x is being written by process {first.pid} on .* since .*; y"):
            with files.one_writer(target, "x", "y"):
                pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with files.one_writer(target, "x", "y"):  # the kernel released the lock of the killed process
        assert files.lock_name(target).is_file()
    assert not files.lock_name(target).exists()


@pytest.mark.slow
def test_a_run_being_trained_refuses_a_second_training_of_it(tmp_path):
    runs = tmp_path / "runs"
    first = holder(runs / "same")  # what a training of runs/same holds while it runs
    try:
        cmd = [str(BIN / "vae-dist"), "train", "--config", "linear", "--output-dir", str(runs), "--name", "same",
               "--set", "train.lr=0.01"]
        proc = run(cmd, check=False)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: run {runs / 'same'} is being written by process {first.pid} on {os.uname().nodename} since "
        + proc.stderr.split(" since ", 1)[1].split(";")[0]
        + "; wait for it to end, or pass another --name"
    )
    assert not (runs / "same").exists()


def test_prepare_stopped_by_sigterm_or_sigkill_leaves_nothing_and_no_worker(tmp_path, emoji_dir):
    """Stopped while its workers decode: SIGTERM ends in one line (exit 143) with nothing written;
    SIGKILL leaves a staging folder the next prepare removes; either way no worker lives on."""
    out = tmp_path / "ds"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        cmd = [str(BIN / "vae-dist"), "prepare", str(emoji_dir), "--out", str(out), "--size", "64", "--workers", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        staging = files.staging_name(out, proc.pid)
        deadline, workers = time.monotonic() + 60, []
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            workers = _children(proc.pid)
        assert len(workers) == 2 and (staging / "decoded.npy").exists(), "the workers were not decoding"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        time.sleep(1)
        assert not [w for w in workers if _alive(w)], "a decode worker outlived prepare"
        assert not out.exists() and "Traceback" not in err, err[-2000:]
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and err.strip().splitlines()[-1] == "stopped by SIGTERM; nothing was written"
            assert not staging.exists()
        else:
            assert proc.returncode == -9 and staging.exists()
    run([str(BIN / "vae-dist"), "prepare", str(emoji_dir), "--out", str(out), "--size", "16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the killed one's staging folder is gone


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_training_that_diverges_stops_in_one_line_and_writes_no_model(tmp_path):
    runs = tmp_path / "runs"
    cmd = [str(BIN / "vae-dist"), "train", "--config", "linear", "--output-dir", str(runs), "--name", "d",
           "--set", "train.lr=1e6", "--set", "data.train_subset=2048", "--set", "train.epochs=2"]
    proc = run(cmd, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: the loss or the weights are no longer finite at step ")
    assert "train.lr=1e+06); no model was written and it has no checkpoint" in line and "Traceback" not in proc.stderr
    assert not (runs / "d" / MODEL_FILE).exists()
    for path in (runs / "d").rglob("*.json*"):
        text = path.read_text()
        json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
        assert "NaN" not in text and "Infinity" not in text, path


# ---------------------------------------------------------------- read-only places


@contextlib.contextmanager
def read_only(folder):
    """`folder` made read-only: as root (who may write through file permissions) a read-only tmpfs
    holding a copy of it, else its permissions."""
    if os.geteuid() == 0:
        aside = folder.with_name(folder.name + ".aside")
        shutil.move(folder, aside)
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)], check=True)
        try:
            shutil.copytree(aside, folder, dirs_exist_ok=True, symlinks=True)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
            folder.rmdir()
            shutil.move(aside, folder)
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.mark.slow
def test_a_read_only_runs_folder_is_refused_before_any_work(tmp_path):
    from export.pipeline import export_run

    runs = tmp_path / "runs"
    run_dir = make_run(runs, "r", "linear")
    assert export_run(run_dir, variants=[]).verified
    before = file_hashes(runs)
    commands = {
        "export": [str(BIN / "vae-dist"), "export", str(run_dir), "--variants", "none"],
        "verify": [str(BIN / "vae-dist"), "verify", str(run_dir)],
        "evaluate": [str(BIN / "vae-dist"), "evaluate", str(run_dir), "--k", "2"],
        "train": [str(BIN / "vae-dist"), "train", "--config", "linear", "--output-dir", str(runs), "--name", "new"],
        "prepare": [str(BIN / "vae-dist"), "prepare", "fashion-mnist", "--out", str(runs / "ds")],
        "web": [str(BIN / "vae-dist"), "web", str(run_dir)],
    }
    with read_only(runs):
        for name, cmd in commands.items():
            started = time.monotonic()
            proc = run(cmd, check=False)
            line = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
            assert "cannot write into" in line and ("Read-only file system" in line or "Permission denied" in line), (
                name,
                line,
            )
            assert time.monotonic() - started < 60, name  # refused at once, not after the work
    assert file_hashes(runs) == before


# ---------------------------------------------------------------- an export left aside, damaged models


def test_an_export_left_aside_is_put_back_or_named_wherever_it_is_looked_up(tmp_path):
    from export.pipeline import export_run

    runs = tmp_path / "runs"
    run_dir = make_run(runs, "r", "linear")
    assert export_run(run_dir, variants=[]).verified
    aside = files.aside_name(run_dir / "onnx", DEAD_PID)
    os.replace(run_dir / "onnx", aside)
    proc = run([sys.executable, "-m", "export.sample", "sample", "--model-dir", str(run_dir), "--out",
                str(tmp_path / "s.png")], check=False)
    assert proc.returncode == 2 and f"vae-dist verify {run_dir}` puts it back" in proc.stderr, proc.stderr
    listing = json.loads(run([str(BIN / "vae-dist"), "runs", "--output-dir", str(runs), "--json"]).stdout)
    assert listing[0]["export"].startswith("set aside")
    site = tmp_path / "site"
    run([str(BIN / "vae-dist"), "web", str(run_dir), "--out", str(site)])  # web puts it back, then builds
    assert (run_dir / "onnx" / "manifest.json").is_file() and not aside.exists() and (site / "index.html").is_file()


def test_a_damaged_model_file_is_listed_and_marked(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "good", "linear")
    bad = make_run(runs, "bad", "linear") / MODEL_FILE
    from safetensors.torch import load_file, save_file

    from vae_dist import record

    meta = record.read(bad).to_metadata()
    save_file(load_file(str(bad)), str(bad), metadata={**meta, "dataset": "12"})
    proc = run([str(BIN / "vae-dist"), "runs", "--output-dir", str(runs)])
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"good", "bad"} and "damaged" in rows["bad"] and "damaged" not in rows["good"]


def test_the_site_takes_its_test_images_from_the_data_set_of_the_verified_model(tmp_path):
    """The manifest's copy of the data set's name is covered by no hash: changing it changes
    nothing; a model file that is not the one verified is refused."""
    from export.pipeline import export_run

    run_dir = make_run(tmp_path / "runs", "r", "linear")
    assert export_run(run_dir, variants=[]).verified
    manifest_path = run_dir / "onnx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["dataset"] = str(tmp_path / "elsewhere")
    manifest_path.write_text(json.dumps(manifest))
    run([str(BIN / "vae-dist"), "web", str(run_dir), "--out", str(tmp_path / "site")])
    make_run(tmp_path / "other", "r", "linear", seed=5)
    shutil.copy(tmp_path / "other" / "r" / MODEL_FILE, run_dir / MODEL_FILE)
    proc = run([str(BIN / "vae-dist"), "web", str(run_dir), "--out", str(tmp_path / "site")], check=False)
    assert proc.returncode == 2 and "is not the model" in proc.stderr.strip().splitlines()[-1]


def test_the_server_answers_a_nul_in_a_path_with_400_and_no_traceback(tmp_path, capfd):
    import threading
    import urllib.error
    import urllib.request

    from export import web

    server = web.make_server(tmp_path, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/%00")
        assert e.value.code == 400
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_long_evaluation_says_how_far_it_is_and_how_long_it_will_take(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r", "linear")
    cmd = [str(BIN / "vae-dist"), "evaluate", str(run_dir), "--k", "100000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        _, err = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = [line for line in err.splitlines() if " of 10000 images (" in line]
    assert lines and re.search(r"about \d+(\.\d+)? (days|h|min|s) left$", lines[0]), err[-2000:]


def _grey_alpha_16_bit_png(path) -> None:
    """A 4x4 PNG of colour type 4 (grey and alpha), 16 bits per sample, written by hand."""
    import struct
    import zlib

    import numpy as np

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    values = np.arange(16, dtype=">u2").reshape(4, 4) * 4000
    rows = b"".join(b"\0" + np.stack([row, np.full(4, 65535, ">u2")], 1).tobytes() for row in values)
    header = struct.pack(">IIBBBBB", 4, 4, 16, 4, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_a_16_bit_grey_png_with_transparency_is_refused_not_read_as_noise(tmp_path):
    from PIL import Image

    from vae_dist.data.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.new("L", (4, 4), 50 * i).save(src / f"{i}.png")
    _grey_alpha_16_bit_png(src / "deep.png")
    info = prepare(str(src), tmp_path / "ds", channels=1, test_fraction=0.25).info
    assert info["skipped"] == [{"path": "deep.png", "reason": (
        "a 16-bit grey PNG with transparency, which Pillow cannot read faithfully; save it with 8 bits")}]
    run_dir = make_run(tmp_path / "runs", "r", "linear", shape=(1, 4, 4), dataset=str(tmp_path / "ds"))
    from export.pipeline import export_run

    assert export_run(run_dir, variants=[]).verified
    cmd = [sys.executable, "-m", "export.sample", "reconstruct", "--model-dir", str(run_dir), str(src / "deep.png")]
    proc = run([*cmd, "--out", str(tmp_path / "r.png")], check=False)
    assert proc.returncode == 2 and "is a 16-bit grey PNG with transparency" in proc.stderr, proc.stderr


def test_a_file_cut_short_after_the_png_signature_is_skipped_not_a_crash(tmp_path):
    from PIL import Image

    from vae_dist.data.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.new("L", (4, 4), 50 * i).save(src / f"{i}.png")
    (src / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0")  # 18 bytes
    info = prepare(str(src), tmp_path / "ds", test_fraction=0.25).info
    assert [s["path"] for s in info["skipped"]] == ["cut.png"]
