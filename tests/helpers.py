"""What several test modules share: the tiny runs, the commands they launch, the harness that
makes torch unimportable, the files they write or damage, and the constants they agree on.
Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import click
import numpy as np
import torch
from safetensors.torch import load_file

from vae_dist import artifacts
from vae_dist.config import Config, ModelConfig
from vae_dist.data import builtin
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.models import build_model
from vae_dist.record import ModelRecord
from vae_dist.runs import METRICS_FILE, MODEL_FILE, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VAE_DIST = str(BIN / "vae-dist")  # the installed command
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
    out_channels = PixelLikelihood(likelihood, shape[0]).out_channels
    artifacts.save_model(run / MODEL_FILE, build_model(cfg, shape, out_channels), record)
    return run


def cli() -> click.Group:
    """The `vae-dist` group, as the installed command has it."""
    from vae_dist.cli import main

    return main


def fashion_test_idx() -> Path:
    """The real Fashion-MNIST test images' IDX file (installed by `make test`)."""
    return builtin.images_file("fashion-mnist", False, builtin.resolve("fashion-mnist", download=False))


# ---------------------------------------------------------------- tiny real runs

# A real run in a few seconds: the first 256 training images in 4 steps of 64, the first 64 test images.
TINY_RUN = {"data.train_subset": 256, "data.test_subset": 64, "train.epochs": 1, "train.batch_size": 64}


def _config_keys() -> dict[str, str]:
    """Each config key's name -> its `section.key`, for the names that one section alone has."""
    keys: dict[str, list[str]] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            keys.setdefault(f.name, []).append(f"{section.name}.{f.name}")
    return {name: found[0] for name, found in keys.items() if len(found) == 1}


def tiny_overrides(**changes) -> list[str]:
    """The overrides ("section.key=value") of a tiny run: TINY_RUN, with `changes` by key name
    (`train_subset=512`, `hidden_dims=[32]`); None leaves that key to the config's own value."""
    keys, values = _config_keys(), dict(TINY_RUN)
    for name, value in changes.items():
        if name not in keys:
            raise TypeError(f"tiny_overrides: {name!r} is not the name of one config key; append 'section.key=...'")
        values[keys[name]] = value
    overrides = []
    for key, value in values.items():
        if value is not None:
            overrides.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return overrides


def set_options(overrides: list[str]) -> list[str]:
    """`overrides` as a command line gives them: `--set KEY=VALUE` each."""
    return [arg for override in overrides for arg in ("--set", override)]


# ---------------------------------------------------------------- launching training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(
    nproc: int,
    script_args: list[str],
    extra: list[str] | None = None,
    script: str = TRAIN,
    machines: int = 1,
    port: int | None = None,
) -> list[str]:
    """`accelerate launch` of `script` (the training script) on `nproc` CPU processes in all (real DDP
    over gloo), on `machines` machines that meet at `port` (a free one unless given)."""
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--num_machines",
        str(machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if nproc > 1:
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(port or free_port())]
    else:
        cmd += ["--num_processes", "1"]
    return cmd + (extra or []) + [script, *script_args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores
    e["CUDA_VISIBLE_DEVICES"] = ""  # the guarantees under test are the CPU/gloo ones, GPU or not
    return e


def run(
    cmd: list[str],
    timeout: float = 600,
    check: bool = True,
    cwd: Path = ROOT,
    preexec_fn=None,
    environ: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmd` to its end in `cwd`, with the environment `environ` (by default env()), its output
    captured; with `check`, a non-zero exit status fails the test and shows the output's end."""
    environ = env() if environ is None else dict(environ)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environ, preexec_fn=preexec_fn
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(cmd: list[str], cwd: Path = ROOT, environ: Mapping[str, str] | None = None, **popen) -> subprocess.Popen:
    """Start `cmd` as `run` would, for a test that watches it, signals it or waits for it itself;
    `popen`: subprocess.Popen's other arguments (stdout, stderr, text, start_new_session)."""
    return subprocess.Popen(cmd, cwd=cwd, env=env() if environ is None else dict(environ), **popen)


def kill_when(proc: subprocess.Popen, ready: Callable[[], object], timeout: float = 300) -> None:
    """SIGKILL `proc`'s process group as soon as `ready()` is true."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def checkpoint_step(run_dir: Path) -> int:
    """The optimizer step of a run's newest checkpoint (0: none yet)."""
    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


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
    return run(
        [sys.executable, "-c", BLOCKER.format(blocked=set(blocked)) + code, *args], timeout, check=False, cwd=cwd
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

    yield file_size_limit(free_bytes), "RLIMIT_FSIZE"


def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """A preexec_fn: the process may write no file larger than `max_bytes`; such a write fails
    (EFBIG, SIGXFSZ ignored) instead of killing the process."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


# ---------------------------------------------------------------- files written, read back or damaged


def file_hashes(root: Path, patterns: tuple[str, ...] = ("**/*",), each_matches: bool = False) -> dict[str, str]:
    """The sha256 of each file under `root` that one of the globs `patterns` matches, by its path
    relative to `root`: two compare equal when no file was added, removed or changed. With
    `each_matches`, a pattern that matches no file fails the test (its check would be empty)."""
    found = {}
    for pattern in patterns:
        files = [p for p in root.glob(pattern) if p.is_file()]
        assert files or not each_matches, f"{pattern!r} matches no file: the unchanged-check would be empty"
        found.update({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return found


def json_lines(path: Path) -> list[dict]:
    """Each line of a JSON-lines file, parsed; a torn line fails the test (the library's reader
    drops it)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """A run's metrics log, one record per epoch."""
    return json_lines(run_dir / METRICS_FILE)


def idx_bytes(array) -> bytes:
    """`array` (numpy or torch, of any shape) as an IDX file of unsigned bytes, as the MNIST files are."""
    values = np.asarray(array).astype(np.uint8)
    return bytes([0, 0, 8, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape) + values.tobytes()


def write_idx(path: Path, array) -> Path:
    """`array` as an IDX file at `path`, gzipped (the same bytes each time) when the name ends in .gz."""
    blob = idx_bytes(array)
    path.write_bytes(gzip.compress(blob, mtime=0) if path.suffix == ".gz" else blob)
    return path


def write_idx_set(folder: Path, train, test, gz: bool = False) -> Path:
    """The four Fashion-MNIST IDX files, flat in `folder` (.gz with `gz`): the images `train` and
    `test`, and labels 0 to 9 in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, images in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(len(images)) % 10)
    return folder


def flip_byte(path: Path, at: int) -> None:
    """Invert byte `at` (negative: from the end) of the file at `path`: the same size, other content."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def shift_initializer(path: Path, pick: Callable, by: float, entries: slice = slice(None)) -> None:
    """Add `by` to `entries` of the initializer that `pick(model)` returns, in the ONNX file at
    `path`: still a valid model, which computes something else."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensor = pick(model)
    values = numpy_helper.to_array(tensor).copy()
    values[entries] += np.float32(by)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(path))


def poisoned_losses(loss_of, calls: set[int]):
    """`loss_of` (vae_dist.step.negative_elbo) made to return NaN per-image losses at the given
    calls, counted from 1 in `.calls` (set it back to 0 to count again): an update whose gradient
    is not finite, where a test wants one."""

    def poisoned(*args, **kwargs):
        terms = loss_of(*args, **kwargs)
        poisoned.calls += 1
        if poisoned.calls in calls:
            terms.loss = terms.loss * float("nan")
        return terms

    poisoned.calls = 0
    return poisoned

