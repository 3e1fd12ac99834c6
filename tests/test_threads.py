"""Threads per process on the CPU: the cores shared among the processes of the machine, whatever
`accelerate launch` set by default, unless the user chose a count; the log says which."""

from __future__ import annotations

import re
import sys

import pytest

from helpers import VAE_DIST, env, launch_cmd, run, set_options, tiny_overrides
from vae_dist import threads


def without_threads_set() -> dict[str, str]:
    environ = env()
    environ.pop("OMP_NUM_THREADS")
    return environ


def threads_line(proc) -> str:
    (line,) = [x for x in proc.stderr.splitlines() if "CPU thread(s) per process" in x]
    return line.split(" INFO ")[-1].removeprefix("[RANK 0] ")


def train_args(tmp_path, name: str) -> list[str]:
    return ["--config", "linear", *set_options(tiny_overrides(log_with=[])), "--output-dir", str(tmp_path),
            "--name", name]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launch_shares_the_cores_unless_the_user_chose(tmp_path, processes):
    share = max(1, threads.cores() // processes)
    proc = run(launch_cmd(processes, train_args(tmp_path, "default")), environ=without_threads_set())
    assert threads_line(proc) == f"{share} CPU thread(s) per process ({threads.cores()} cores shared by {processes} " \
        "process(es))"
    chosen = {"OMP_NUM_THREADS": "1"}
    proc = run(launch_cmd(processes, train_args(tmp_path, "env")), environ={**without_threads_set(), **chosen})
    assert threads_line(proc) == "1 CPU thread(s) per process (set by OMP_NUM_THREADS)"
    option = ["--num_cpu_threads_per_process", "1"]
    proc = run(launch_cmd(processes, train_args(tmp_path, "option"), option), environ=without_threads_set())
    assert threads_line(proc) == "1 CPU thread(s) per process (set by --num_cpu_threads_per_process)"


@pytest.mark.slow
def test_vae_dist_train_gives_each_of_its_processes_its_share(tmp_path):
    proc = run([VAE_DIST, "train", "--processes", "2", *train_args(tmp_path, "two")], environ=without_threads_set())
    share = max(1, threads.cores() // 2)
    assert re.fullmatch(rf"{share} CPU thread\(s\) per process \(set by OMP_NUM_THREADS\)", threads_line(proc))
    proc = run([VAE_DIST, "train", *train_args(tmp_path, "one")], environ=without_threads_set())
    assert threads_line(proc).startswith(f"{threads.cores()} CPU thread(s) per process")


def test_outside_a_launcher_the_environment_decides(monkeypatch):
    monkeypatch.setattr(threads, "accelerate_launcher", lambda: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.per_process() == (3, "set by OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.per_process() == (max(1, threads.cores() // 2), f"{threads.cores()} cores shared by 2 process(es)")


def test_the_launcher_is_recognised_by_its_command_line():
    assert threads._is_accelerate_launch(["/venv/bin/python3", "/venv/bin/accelerate", "launch", "x.py"])
    assert threads._is_accelerate_launch(["/venv/bin/accelerate-launch", "x.py"])
    assert threads._is_accelerate_launch(["python", "-m", "accelerate.commands.launch", "x.py"])
    assert not threads._is_accelerate_launch(["/venv/bin/vae-dist", "train", "--processes", "2"])


def test_a_training_process_flushes_denormals_to_zero_in_every_thread():
    # In a new process, as training and evaluation start: a denormal counts as zero in the
    # threads of torch's pool too (the product is split among them), and without it it does not.
    probe = (
        "import sys, torch; from vae_dist import threads; torch.set_num_threads(2); "
        "torch.ones(1 << 22).mul(2).sum(); "  # the pool exists before the setting, as it may in a process
        "sys.argv[1] == 'apply' and threads.apply(); torch.set_num_threads(2); "
        "print((torch.full((1 << 22,), 1e-39) * 1.0 == 0).float().mean().item())"
    )
    assert run([sys.executable, "-c", probe, "apply"]).stdout.split() == ["1.0"]
    assert run([sys.executable, "-c", probe, "no"]).stdout.split() == ["0.0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings; Linux only")
def test_a_training_process_keeps_the_memory_of_a_freed_tensor_for_the_next():
    # A 64 MiB tensor, over glibc's mapping threshold: by default its memory goes back to the
    # kernel when it is freed (the resident size falls by about its size); after apply() it stays
    # in the heap for the next tensor, which then costs no page faults.
    probe = (
        "import os, sys, torch; from vae_dist import threads; "
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20; "
        "sys.argv[1] == 'apply' and threads.apply(); "
        "t = torch.ones(1 << 24); held = rss(); del t; print(held - rss())"
    )
    assert int(run([sys.executable, "-c", probe, "no"]).stdout) >= 60
    assert int(run([sys.executable, "-c", probe, "apply"]).stdout) <= 4
