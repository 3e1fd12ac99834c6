"""What several test modules share: the tiny runs, the commands they launch, the harness that
makes torch unimportable, and the constants they agree on. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import click
import torch
from safetensors.torch import load_file

from vae_dist import artifacts
from vae_dist.config import ModelConfig
from vae_dist.data import builtin
from vae_dist.models import build_model
from vae_dist.record import ModelRecord
from vae_dist.runs import MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "vae_dist" / "train.py")
EVALUATE = str(ROOT / "vae_dist" / "evaluate.py")
SHAPE = (1, 28, 28)  # Fashion-MNIST
LATENT = 4  # the tiny models' latent size
EMOJI_FILES, EMOJI_TRAIN = 3786, 3377  # the emoji set's PNG files; its training split, prepared as shipped
TINY_TEST_NEG_ELBO = 543.21  # what a tiny run's model file claims as its test -ELBO
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


# ---------------------------------------------------------------- tiny finished runs


def make_run(
    runs: Path,
    name: str,
    kind: str,
    likelihood: str = "bernoulli",
    seed: int = 0,
    latent_dim: int = LATENT,
    eval_seed: int = 0,
    shape: tuple[int, int, int] = SHAPE,
    dataset: str = "fashion-mnist",
) -> Path:
    """A finished run holding only a tiny untrained model of images `shape`: all that export needs."""
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, latent_dim=latent_dim, hidden_dims=[32], channels=[4, 8])
    run = runs / name
    run.mkdir(parents=True)
    record = ModelRecord(
        model=cfg,
        image_shape=shape,
        dataset=dataset,
        likelihood=likelihood,
        epochs=0,
        steps=0,
        test_neg_elbo=TINY_TEST_NEG_ELBO,
        eval_seed=eval_seed,
        versions={"torch": torch.__version__, "vae_dist": "0.1.0"},
    )
    artifacts.save_model(run / MODEL_FILE, build_model(cfg, shape), record)
    return run


def cli() -> click.Group:
    """The `vae-dist` group, as the installed command has it."""
    from vae_dist.cli import main

    return main


def fashion_test_idx() -> Path:
    """The real Fashion-MNIST test images' IDX file (installed by `make test`)."""
    return builtin.images_file("fashion-mnist", False, builtin.resolve("fashion-mnist", download=False))


# ---------------------------------------------------------------- launching training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, script_args: list[str], extra: list[str] | None = None, script: str = TRAIN) -> list[str]:
    """`accelerate launch` of `script` (the training script) on `nproc` CPU processes (real DDP over gloo)."""
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if nproc > 1:
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1"]
    return cmd + (extra or []) + [script, *script_args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores
    e["CUDA_VISIBLE_DEVICES"] = ""  # the guarantees under test are the CPU/gloo ones, GPU or not
    return e


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, cwd: Path = ROOT, preexec_fn=None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env(), preexec_fn=preexec_fn
    )
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


# ---------------------------------------------------------------- modules made unimportable

# What a device without torch lacks: any import of these fails, as if they were not installed.
NO_TORCH = ("torch", "torchvision", "onnx", "onnxscript", "onnx_ir", "vae_dist", "click", "safetensors", "accelerate")
# What a training machine may lack: the export stack.
NO_EXPORT_STACK = ("onnx", "onnxruntime", "onnxscript", "onnx_ir")
# A None entry in sys.modules makes `import name` fail and importlib.util.find_spec(name) answer
# None, exactly as for a package that is not installed.
BLOCKER = """
import sys
sys.modules.update(dict.fromkeys({blocked!r}))
"""


def python_without(blocked: tuple[str, ...], code: str, cwd: Path = ROOT, timeout: float = 120, args=()):
    """Run `code` in a fresh Python where the modules `blocked` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=set(blocked)) + code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
    )


def run_sampler(args: list[str], cwd: Path = ROOT, script: Path | None = None, blocked=NO_TORCH):
    """`python -m export.sample ARGS`, or `python SCRIPT ARGS`, with `blocked` unimportable."""
    if script:
        launch = (
            f"import runpy; sys.argv = [{str(script)!r}, *{args!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')"
        )
    else:
        launch = (
            f"import runpy; sys.argv = ['sample.py', *{args!r}]; "
            "runpy.run_module('export.sample', run_name='__main__', alter_sys=True)"
        )
    return python_without(blocked, launch, cwd=cwd, timeout=60)


# ---------------------------------------------------------------- a disk that fills up


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def full_disk(folder: Path, free_bytes: int):
    """Make writes under `folder` fail once they need more than about `free_bytes` new bytes.

    As root, `folder` becomes a tmpfs holding its current files plus `free_bytes` of room (the
    disk really fills: ENOSPC). Otherwise, or where mounting is not allowed, processes started
    with the yielded `preexec_fn` may not write any file larger than `free_bytes` (EFBIG, with
    SIGXFSZ ignored so the write fails instead of killing the process). Yields (preexec_fn or
    None, the mechanism's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _can_mount():
        aside = folder.with_name(folder.name + ".aside")
        shutil.move(folder, aside)
        folder.mkdir()
        size = _du(aside) + free_bytes + 64 * 1024  # tmpfs counts whole pages
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode == 0
        if mounted:
            try:
                shutil.copytree(aside, folder, dirs_exist_ok=True)
                yield None, "tmpfs"
            finally:
                kept = folder.with_name(folder.name + ".kept")
                shutil.copytree(folder, kept)  # what the command left, for the test to inspect
                subprocess.run(["umount", str(folder)], check=True)
                folder.rmdir()
                kept.rename(folder)
                shutil.rmtree(aside)
            return
        folder.rmdir()
        shutil.move(aside, folder)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (free_bytes, free_bytes))

    yield limit, "RLIMIT_FSIZE"
