"""vae_dist.files, the one way every writer writes: atomic files, folders published by rename, and
a kill between the two renames of a publish recovered the same way by prepare, export and web."""

from __future__ import annotations

import errno
import os
import sys

import numpy as np
import pytest

from helpers import BIN, DEAD_PID, make_run, run
from vae_dist import files
from vae_dist.data import prepared

# Runs `vae-dist ARGS` with os.replace patched: the rename that would put a new folder in place of
# TARGET, once the old one is moved aside, kills the process instead (SIGKILL: nothing cleans up).
KILLED_AT_PUBLISH = """
import os, signal, sys
target = os.path.abspath(sys.argv[1])
real = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(dst) == target and not os.path.exists(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from vae_dist.cli import main
main(sys.argv[2:])
"""


def killed_at_publish(target, *args: str):
    proc = run([sys.executable, "-c", KILLED_AT_PUBLISH, str(target), *args], check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not target.exists(), "the kill came before the old folder was moved aside"
    (aside,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}{files.ASIDE_MARK}")]
    return aside


def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- kills between the two renames


def test_prepare_killed_between_its_renames_is_put_back_by_the_next_reader_and_writer(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "ds"
    train, test = (rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8) for n in (12, 4))
    from vae_dist.data import prepare

    prepare.from_arrays(out, train, test)
    before = tree(out)
    (tmp_path / "src").mkdir()
    from PIL import Image

    for i in range(6):
        Image.new("L", (4, 4), i * 40).save(tmp_path / "src" / f"{i}.png")
    aside = killed_at_publish(out, "prepare", str(tmp_path / "src"), "--out", str(out), "--force")
    assert prepared.read_info(out)["counts"] == {"train": 12, "test": 4}  # a reader puts it back
    assert tree(out) == before and not aside.exists()

    killed_at_publish(out, "prepare", str(tmp_path / "src"), "--out", str(out), "--force")
    done = run([str(BIN / "vae-dist"), "prepare", str(tmp_path / "src"), "--out", str(out), "--force",
                "--test-fraction", "0.5"])
    assert "3 train + 3 test images" in done.stdout  # the next writer replaces it as asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]  # nothing left aside or staged


def test_an_export_killed_between_its_renames_is_put_back_by_verify_and_export(tmp_path):
    from export.pipeline import export_run, verify_run

    run_dir = make_run(tmp_path, "r", "linear")
    assert export_run(run_dir, variants=[]).verified
    before = tree(run_dir / "onnx")
    killed_at_publish(run_dir / "onnx", "export", str(run_dir), "--variants", "none")
    report, _ = verify_run(run_dir)
    assert report.passed and tree(run_dir / "onnx").keys() == before.keys()
    assert (run_dir / "onnx" / "decoder.onnx").read_bytes() == before["decoder.onnx"]

    killed_at_publish(run_dir / "onnx", "export", str(run_dir), "--variants", "none")
    assert export_run(run_dir, variants=[]).verified
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.safetensors", "onnx"]


def test_a_site_build_killed_between_its_renames_is_put_back_by_the_next_build(tmp_path):
    from export.pipeline import export_run

    run_dir = make_run(tmp_path, "r", "linear")
    assert export_run(run_dir, variants=[]).verified
    site = tmp_path / "site"
    run([str(BIN / "vae-dist"), "web", str(run_dir), "--out", str(site)])
    before = tree(site)
    aside = killed_at_publish(site, "web", str(run_dir), "--out", str(site))
    files.restore_moved_aside(site)  # what every build does first
    assert tree(site) == before and not aside.exists()
    killed_at_publish(site, "web", str(run_dir), "--out", str(site))
    run([str(BIN / "vae-dist"), "web", str(run_dir), "--out", str(site)])
    assert tree(site).keys() == before.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "site"]


# ---------------------------------------------------------------- the pieces


def test_publish_replaces_a_folder_whole_or_keeps_a_complete_one(tmp_path):
    target = tmp_path / "out"
    for content in ("old", "new"):
        staging = files.new_staging(target)
        (staging / "f").write_text(content)
        assert files.publish(staging, target)
        assert (target / "f").read_text() == content
    staging = files.new_staging(target)
    (staging / "f").write_text("late")
    assert not files.publish(staging, target, keep_existing=lambda folder: (folder / "f").is_file())
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_what_dead_processes_left_is_removed_or_put_back(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    stale, live = files.staging_name(target, DEAD_PID), files.staging_name(target, os.getppid())
    for folder in (stale, live):
        folder.mkdir()
    assert files.remove_stale_staging(target) == [stale] and live.is_dir()
    aside = files.aside_name(target, DEAD_PID)
    aside.mkdir()
    assert not files.restore_moved_aside(target) and not aside.exists()  # the publish was complete
    os.replace(target, aside)
    assert files.restore_moved_aside(target) and target.is_dir()


def test_checkpoints_left_aside_are_found_by_their_names(tmp_path):
    for name in ("step-00000010", "step-00000020"):
        aside = files.aside_name(tmp_path / name, DEAD_PID)
        aside.mkdir()
        (aside / "x").write_text(name)
    (tmp_path / "step-00000020").mkdir()
    assert files.restore_all_moved_aside(tmp_path) == [tmp_path / "step-00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000020"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    files.atomic_write_text(path, "old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(path, fails)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_failed_append_is_cut_back_and_a_torn_last_line_is_left_out(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    files.append_jsonl(path, {"epoch": 0})
    with open(path, "a") as f:
        f.write('{"epoch": 1, "los')  # a kill during an append
    assert files.read_jsonl(path) == [{"epoch": 0}]
    path.write_text('{"epoch": 0}\n')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(OSError):
        files.append_jsonl(path, {"epoch": 1})
    assert path.read_text() == '{"epoch": 0}\n'


def test_writing_names_the_file_and_says_whether_room_is_missing(tmp_path):
    with pytest.raises(files.WriteError, match=r"cannot write .*x\.json \(Permission denied\)") as e:
        with files.writing(tmp_path / "x.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.json"))
    assert not e.value.no_room and e.value.path == tmp_path / "x.json"
    with pytest.raises(files.WriteError) as e:
        with files.writing(tmp_path):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })  os error 28")
    assert e.value.no_room and e.value.reason == os.strerror(errno.ENOSPC)
    with pytest.raises(KeyError):  # anything else is a bug, and keeps its traceback
        with files.writing(tmp_path):
            raise KeyError("x")
