"""Distributed guarantees, each checked with real processes started by `accelerate launch`:
1 and 2 processes train the same model, evaluation covers the test split exactly once, a run
killed with SIGKILL resumes to the same weights, and 2 machines on loopback match 1 process."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    ROOT,
    VAE_DIST,
    checkpoint_step,
    env,
    free_port,
    kill_when,
    launch_cmd,
    metrics,
    relative_l2,
    run,
    set_options,
    start,
    tiny_overrides,
    weights,
)
from vae_dist.runs import list_checkpoints

pytestmark = pytest.mark.slow  # every test here launches real training processes

# 50 optimizer steps of a global batch of 64; an odd test split exercises the padding.
PARITY_OVERRIDES = tiny_overrides(train_subset=3200, test_subset=999)
PARITY = ["--config", "configs/linear.yaml", *set_options(PARITY_OVERRIDES)]
# Slow enough (conv, 2 epochs of 40 steps) to be killed mid-run; checkpoints every 10 steps.
RESUME = [
    "--config",
    "configs/conv.yaml",
    *set_options(
        tiny_overrides(epochs=2, train_subset=2560, test_subset=200, checkpoint_every=10, keep_checkpoints=3)
    ),
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p1")
    run(launch_cmd(1, [*PARITY, "--output-dir", str(out), "--name", "r"]))
    return out / "r"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Run through the probe so that each rank's own weights are saved."""
    out = tmp_path_factory.mktemp("p2")
    probe = str(ROOT / "tests" / "rank_probe.py")
    cmd = launch_cmd(2, [])[:-1] + [
        probe,
        str(out),
        "configs/linear.yaml",
        *PARITY_OVERRIDES,
        f"run.output_dir={out}",
        "run.name=r",
    ]
    run(cmd)
    return out


def test_a_non_finite_loss_on_one_process_is_skipped_by_every_process(tmp_path):
    # Rank 1's third loss is NaN: the averaged gradient is NaN on both ranks, both skip that update,
    # count it, and go on to the same finite weights.
    probe = str(ROOT / "tests" / "rank_probe.py")
    overrides = [*PARITY_OVERRIDES, "train.grad_clip=1000", f"run.output_dir={tmp_path}", "run.name=r"]
    run(launch_cmd(2, [])[:-1] + [probe, str(tmp_path), "configs/linear.yaml", *overrides],
        environ={**env(), "POISON": "1:3"})
    a, b = weights(tmp_path / "rank0.safetensors"), weights(tmp_path / "rank1.safetensors")
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
    lines = metrics(tmp_path / "r")
    assert sum(m["skipped_updates"] for m in lines) == 1 and all(math.isfinite(m["train_loss"]) for m in lines)


def test_both_ranks_hold_identical_weights(two_processes):
    a, b = weights(two_processes / "rank0.safetensors"), weights(two_processes / "rank1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], v) for k, v in weights(two_processes / "r" / "model.safetensors").items())


def test_one_and_two_processes_train_the_same_model(one_process, two_processes):
    m1, m2 = metrics(one_process), metrics(two_processes / "r")
    assert m1[0]["step"] == m2[0]["step"] == 50
    assert (m1[0]["processes"], m2[0]["processes"]) == (1, 2)
    diff = relative_l2(weights(one_process / "model.safetensors"), weights(two_processes / "r" / "model.safetensors"))
    print(f"relative L2 difference of the parameters after 50 steps, 1 vs 2 processes: {diff:.3e}")
    assert diff <= 1e-5


def test_evaluation_is_exact_across_world_sizes(one_process, two_processes):
    m1, m2 = metrics(one_process)[0], metrics(two_processes / "r")[0]
    assert m1["test_images"] == m2["test_images"] == 999  # no image dropped or counted twice
    # the 2-process figure comes from the gathered rows of both ranks
    r0 = json.loads((two_processes / "metrics0.json").read_text())
    r1 = json.loads((two_processes / "metrics1.json").read_text())
    assert r0["test_neg_elbo"] == r1["test_neg_elbo"]
    print(f"test -ELBO, 1 vs 2 processes: {m1['test_neg_elbo']:.6f} vs {m2['test_neg_elbo']:.6f}")
    assert abs(m1["test_neg_elbo"] - m2["test_neg_elbo"]) <= 1e-4


def test_two_processes_reading_from_disk_train_the_same_model(tmp_path, one_process):
    """Each process reads only its own rows of each batch from the prepared files."""
    run(launch_cmd(2, [*PARITY, "--set", "data.in_memory=never", "--output-dir", str(tmp_path), "--name", "r"]))
    diff = relative_l2(weights(one_process / "model.safetensors"), weights(tmp_path / "r" / "model.safetensors"))
    print(f"1 process in memory vs 2 processes reading from disk: relative L2 {diff:.3e}")
    assert diff <= 1e-5
    assert metrics(tmp_path / "r")[-1]["test_neg_elbo"] == pytest.approx(
        metrics(one_process)[-1]["test_neg_elbo"], abs=1e-4
    )


def _start(nproc: int, args: list[str]) -> subprocess.Popen:
    return start(
        launch_cmd(nproc, args), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"full{nproc}")
        run(launch_cmd(nproc, [*RESUME, "--output-dir", str(out), "--name", "r"]))
        runs[nproc] = out / "r"
    return runs


@pytest.mark.parametrize(
    "nproc,point,reading",
    [
        (1, "first checkpoint", "always"),
        (1, "first epoch logged", "always"),
        (2, "mid second epoch", "always"),
        (1, "first checkpoint", "never"),  # rows read from disk; compared with the in-memory run
    ],
)
def test_sigkill_then_resume_gives_the_same_weights(tmp_path, uninterrupted, nproc, point, reading):
    run_dir = tmp_path / "r"
    args = [*RESUME, "--set", f"data.in_memory={reading}"]
    ready = {
        "first checkpoint": lambda: checkpoint_step(run_dir) >= 10,
        "first epoch logged": lambda: (
            (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()
        ),
        "mid second epoch": lambda: checkpoint_step(run_dir) >= 50,
    }[point]
    kill_when(_start(nproc, [*args, "--output-dir", str(tmp_path), "--name", "r"]), ready)
    assert not (run_dir / "model.safetensors").exists(), "the run finished before the kill"
    killed_at = checkpoint_step(run_dir)
    if point == "first epoch logged":  # by path, with the configuration saved in the run
        run(launch_cmd(nproc, ["--resume", str(run_dir)]))
    else:
        run(launch_cmd(nproc, [*args, "--output-dir", str(tmp_path), "--name", "r", "--resume", "auto"]))

    a = weights(uninterrupted[nproc] / "model.safetensors")
    b = weights(run_dir / "model.safetensors")
    if nproc == 1:
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from step {killed_at}: weights differ"
    else:
        diff = relative_l2(a, b)
        print(f"2 processes, killed at step {killed_at} and resumed: relative L2 difference {diff:.3e}")
        assert diff <= 1e-6
    assert [m["epoch"] for m in metrics(run_dir)] == [0, 1]
    assert metrics(run_dir)[-1]["test_neg_elbo"] == pytest.approx(
        metrics(uninterrupted[nproc])[-1]["test_neg_elbo"], abs=1e-6
    )


def test_half_written_checkpoint_is_never_picked(tmp_path, uninterrupted):
    """A kill during a save leaves only a temporary folder, or a folder without our state file."""
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(uninterrupted[1], run_dir)
    good = list_checkpoints(run_dir)[-1]
    (run_dir / "checkpoints" / ".tmp-step-00000999").mkdir()
    (run_dir / "checkpoints" / "step-00000999").mkdir()
    (run_dir / "checkpoints" / "step-00000999" / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(run_dir)[-1] == good


def test_resume_with_another_model_or_data_is_refused(tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted[1], tmp_path / "r")
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    args = [*RESUME, "--output-dir", str(tmp_path), "--name", "r", "--resume", "auto"]
    out = run(launch_cmd(1, [*args, *set_options(["model.latent_dim=8", "data.binarize=dynamic"])]), check=False)
    assert out.returncode != 0
    assert "model.latent_dim (20 -> 8)" in out.stderr and "data.binarize ('none' -> 'dynamic')" in out.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # nothing touched


def test_checkpoints_load_without_unpickling(uninterrupted):
    ckpt = list_checkpoints(uninterrupted[2])[-1]
    assert (ckpt / "model.safetensors").is_file()
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert "state" in state and "param_groups" in state
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


def test_non_distributed_multi_process_launch_is_refused(tmp_path):
    """Leaving the device to Accelerate on a machine without a GPU would train 2 models alone."""
    out = run(launch_cmd(2, [*PARITY, "--no-cpu", "--output-dir", str(tmp_path), "--name", "r"]), check=False)
    assert out.returncode != 0
    assert "WORLD_SIZE=2 but this process is not part of a 2-process group" in out.stderr
    assert not (tmp_path / "r").exists()


def test_two_machines_on_loopback_match_one_process(tmp_path, one_process):
    port = free_port()
    procs = []
    for rank in (0, 1):
        machine = ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--rdzv_backend", "static"]
        cmd = launch_cmd(
            2, [*PARITY, "--output-dir", str(tmp_path), "--name", "r"], extra=machine, machines=2, port=port
        )
        procs.append(start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = metrics(tmp_path / "r")[0]
    assert m["processes"] == 2 and m["test_images"] == 999
    assert abs(m["test_neg_elbo"] - metrics(one_process)[0]["test_neg_elbo"]) <= 1e-4
    diff = relative_l2(weights(one_process / "model.safetensors"), weights(tmp_path / "r" / "model.safetensors"))
    print(f"relative L2 difference, 1 process vs 2 machines: {diff:.3e}")
    assert diff <= 1e-5


def test_resume_from_an_older_checkpoint_or_into_fewer_epochs_is_refused(tmp_path, uninterrupted):
    import shutil

    shutil.copytree(uninterrupted[1], tmp_path / "r")
    older, newest = list_checkpoints(tmp_path / "r")[-2:]
    model_before = (tmp_path / "r" / "model.safetensors").read_bytes()
    out = run(launch_cmd(1, ["--resume", str(older)]), check=False)
    assert out.returncode != 0 and f"newer than {older.name} ({newest.name})" in out.stderr
    out = run(launch_cmd(1, ["--resume", str(tmp_path / "r"), "--set", "train.epochs=1"]), check=False)
    assert out.returncode != 0 and "beyond train.epochs=1" in out.stderr
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == model_before  # nothing overwritten
    assert list_checkpoints(tmp_path / "r")[-2:] == [older, newest]


def test_a_run_folder_that_cannot_be_written_stops_every_process(tmp_path):
    """The first write happens on the main process only; its failure must end the other rank too,
    not leave it waiting in a collective."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.time()
    out = run(launch_cmd(2, [*PARITY, "--output-dir", str(blocker / "runs"), "--name", "r"]), timeout=300, check=False)
    assert out.returncode != 0 and time.time() - started < 120
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0], out.stderr[-3000:]


def _vae_dist_train(nproc: int, args: list[str], stderr) -> subprocess.Popen:
    """`vae-dist train` itself (nproc 1) or through its launcher (--processes nproc)."""
    cmd = [VAE_DIST, "train", *args] + (["--processes", str(nproc)] if nproc > 1 else [])
    return start(cmd, stdout=subprocess.DEVNULL, stderr=stderr)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_at_the_next_step_and_the_run_resumes_to_the_same_weights(tmp_path, uninterrupted, nproc):
    """What a scheduler does before pre-empting a job: SIGTERM to the command (the launcher
    passes it on to every process). Every process saves at the same next step, and stops with
    exit status 143 and one line saying how to continue."""
    run_dir = tmp_path / "r"
    args = [*RESUME, "--output-dir", str(tmp_path), "--name", "r"]
    with open(tmp_path / "stderr", "w") as err:
        proc = _vae_dist_train(nproc, args, err)
        deadline = time.time() + 300
        while checkpoint_step(run_dir) < 10:  # running, past its first checkpoint
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, (tmp_path / "stderr").read_text()[-3000:]
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step "), stderr[-3000:]
    step = int(last.split("at step ")[1].split()[0])
    assert f"the run's latest checkpoint is step-{step:08d}" in last and "--name r " in last and "--resume auto" in last
    assert checkpoint_step(run_dir) == step and not (run_dir / "model.safetensors").exists()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    state = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    assert state["global_step"] == step

    with open(tmp_path / "stderr2", "w") as err:
        assert _vae_dist_train(nproc, [*args, "--resume", "auto"], err).wait(timeout=600) == 0
    a, b = weights(uninterrupted[nproc] / "model.safetensors"), weights(run_dir / "model.safetensors")
    if nproc == 1:
        assert all(torch.equal(a[k], b[k]) for k in a), f"stopped at step {step}: weights differ"
    else:
        assert relative_l2(a, b) <= 1e-6
    assert [m["epoch"] for m in metrics(run_dir)] == [0, 1]


def test_sigint_exits_130_with_the_way_to_continue(tmp_path):
    run_dir = tmp_path / "r"
    with open(tmp_path / "stderr", "w") as err:
        proc = _vae_dist_train(1, [*RESUME, "--output-dir", str(tmp_path), "--name", "r"], err)
        deadline = time.time() + 300
        while checkpoint_step(run_dir) < 10:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr and "Aborted" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; the run's latest checkpoint is step-") and "--resume auto" in last, last


def test_a_launched_run_reports_a_usage_error_in_one_line_and_its_exit_status(tmp_path):
    """`vae-dist train --processes 2`: the worker's one line and exit 2, none of the launcher's traceback."""
    out = run(
        [
            VAE_DIST,
            "train",
            "--processes",
            "2",
            *PARITY,
            "--set",
            "train.batch_size=7",
            "--output-dir",
            str(tmp_path),
            "--name",
            "r",
        ],
        check=False,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size (7) must be a multiple"), out.stderr
    assert not (tmp_path / "r").exists()


def test_a_process_started_by_hand_says_what_it_waits_for(tmp_path):
    """WORLD_SIZE/MASTER_ADDR set by hand and the peer never comes: before waiting, the process
    logs the address, its rank and world size, and the time-out."""
    port = free_port()
    e = {**env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    e["MASTER_PORT"] = str(port)
    cmd = [VAE_DIST, "train", "--config", "linear", "--output-dir", str(tmp_path), "--name", "r"]
    proc = start(cmd, environ=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "waiting" not in line:
            assert time.time() < deadline and proc.poll() is None
            line = proc.stderr.readline()
        assert f"rank 0 of 2 waiting for the other processes at 127.0.0.1:{port} (time-out 30 min)" in line
        time.sleep(1)
        assert proc.poll() is None  # still waiting, as it said
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "r").exists()
