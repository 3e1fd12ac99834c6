"""Shared helpers: launching the real training script and reading what it wrote."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "vae_dist" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, script_args: list[str], extra: list[str] | None = None) -> list[str]:
    """`accelerate launch` of the training script on `nproc` CPU processes (real DDP over gloo)."""
    cmd = [str(BIN / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nproc > 1:
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1"]
    return cmd + (extra or []) + [TRAIN, *script_args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores
    e["CUDA_VISIBLE_DEVICES"] = ""  # the guarantees under test are the CPU/gloo ones, GPU or not
    return e


def run(cmd: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return ((va - vb).norm() / va.norm()).item()


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """Real Fashion-MNIST; `make test` installs it, so a missing data set fails rather than skips."""
    from vae_dist import data

    return data.resolve("fashion-mnist", download=False)
