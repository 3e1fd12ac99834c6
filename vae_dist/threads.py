"""How many CPU threads each training or evaluation process uses: the cores this process may run on,
shared equally among the processes of the machine, unless the user chose a count.

What counts as the user's choice: OMP_NUM_THREADS in the environment the command was started
with, or `--num_cpu_threads_per_process` given to `accelerate launch`. Accelerate's launcher sets
OMP_NUM_THREADS=1 for every process by default on a machine without a GPU, which looks the same to
the process; so under `accelerate launch` the launcher's own command line and the environment it
was started with are read (/proc on Linux) to tell its default from a choice. Where /proc cannot
be read, OMP_NUM_THREADS is taken as given. docs/training.md#threads says the same for users.

The same processes flush denormal numbers to zero (`flush_denormals`) and keep the memory of freed
tensors for the next ones (`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
THREADS_OPTION = "--num_cpu_threads_per_process"  # accelerate launch's option
ANCESTORS = 6  # the launcher is the parent (one process) or the parent of torch's elastic agent
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def cores() -> int:
    """The CPUs this process may run on (its affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """The processes of this run on this machine (torch's launchers say; else this one alone)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def _is_accelerate_launch(args: list[str]) -> bool:
    names = [Path(a).name for a in args[:4]]
    return (
        "accelerate-launch" in names
        or any(a == "accelerate" and b == "launch" for a, b in zip(names, names[1:]))
        or "accelerate.commands.launch" in args[:4]
    )


def accelerate_launcher() -> tuple[list[str], dict[str, str]] | None:
    """The command line and the starting environment of the `accelerate launch` process this one
    runs under, or None (not under one, or /proc unreadable)."""
    pid = os.getppid()
    for _ in range(ANCESTORS):
        cmdline, stat = _proc(pid, "cmdline"), _proc(pid, "stat")
        if cmdline is None or stat is None or pid <= 1:
            return None
        args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
        if _is_accelerate_launch(args):
            environ = _proc(pid, "environ") or b""
            pairs = (entry.decode(errors="replace").partition("=") for entry in environ.split(b"\0") if entry)
            return args, {key: value for key, _, value in pairs}
        pid = int(stat.rsplit(b")", 1)[1].split()[1])  # the parent's pid, after the command's name
    return None


def chosen() -> tuple[int | None, str]:
    """The user's count of threads per process and what set it; (None, "") when none was chosen."""
    value = os.environ.get(THREADS_ENV, "")
    count = int(value) if value.isdigit() and int(value) > 0 else None
    if count is None:
        return None, ""
    launcher = accelerate_launcher()
    if launcher is None:
        return count, THREADS_ENV
    args, environ = launcher
    if any(a == THREADS_OPTION or a.startswith(THREADS_OPTION + "=") for a in args):
        return count, THREADS_OPTION
    if THREADS_ENV in environ:
        return count, THREADS_ENV
    return None, ""  # Accelerate's default, not a choice


def per_process() -> tuple[int, str]:
    """The threads each process of this machine uses, and why, in words."""
    count, source = chosen()
    if count is not None:
        return count, f"set by {source}"
    return max(1, cores() // local_processes()), f"{cores()} cores shared by {local_processes()} process(es)"


def apply() -> str:
    """Set this process's torch threads (per_process), flush denormal numbers to zero
    (flush_denormals) and keep freed memory (keep_freed_memory); the log line that says how many
    threads."""
    import torch

    count, why = per_process()
    torch.set_num_threads(count)
    flush_denormals()
    keep_freed_memory()
    return f"{count} CPU thread(s) per process ({why})"


def flush_denormals() -> bool:
    """Treat float32 numbers below 1.2e-38 (denormals) as zero in every thread torch computes on
    (x86 FTZ/DAZ, AArch64 FZ); False where the CPU cannot. Adam's running averages of a gradient
    that stays zero (the weights of pixels that are black in every image) decay into that range
    after a few hundred steps, and arithmetic on denormals is many times slower: without this the
    linear VAE's epochs slow down one after the other (docs/benchmarks.md#the-loop-users-run).
    Only arithmetic in which a denormal takes part changes: it counts as zero."""
    import torch

    return torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """Serve every allocation from the C library's heap and keep freed memory there for the next
    one; False where the C library is not glibc. By default glibc maps each block of 32 MiB or more
    afresh from the kernel and unmaps it when freed, so that a tensor of a 64x64 model's
    activations ([32, 64, 64, 64] floats, 32 MiB) costs thousands of page faults each time it is
    made, a large part of a 64x64 hierarchical model's training step
    (docs/benchmarks.md#the-hierarchical-vaes). The process keeps its peak memory until it ends."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
