"""Process set-up: the Accelerator for a run, and the checks that the processes were started in a
way that trains correctly (one process group of the size the environment says, a global batch
they can share)."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from vae_dist import threads
from vae_dist.config import Config, ConfigError
from vae_dist.errors import UserError


class LaunchError(UserError):
    """The processes were started in a way that would not train correctly."""


def make_accelerator(cfg: Config, cpu: bool | None = None) -> Accelerator:
    # Without cpu=True on a machine without a GPU, `accelerate launch --num_processes 2` would
    # start two processes that each train alone; with it, they form one gloo process group.
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and launched != cfg.train.mixed_precision:
        raise ConfigError(
            f"the launcher asks for mixed precision {launched!r} but train.mixed_precision is "
            f"{cfg.train.mixed_precision!r}; set it with --set train.mixed_precision={launched}"
        )
    if cpu and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    threads_line = threads.apply()  # before any work: the launcher's default is not kept
    waiting = rendezvous()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
        )
    except ValueError as e:  # e.g. WORLD_SIZE set by hand without a rendezvous address
        raise LaunchError(f"cannot set up the processes: {str(e).splitlines()[0]}") from e
    except torch.distributed.DistError as e:  # the peers never came
        raise LaunchError(f"{waiting or 'the rendezvous'} failed: {str(e).splitlines()[0]}; start every process") from e
    check_launch(accelerator)
    world = accelerator.num_processes
    if cfg.train.batch_size % (world * cfg.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of processes x "
            f"train.grad_accum_steps ({world} x {cfg.train.grad_accum_steps}); it is the global batch"
        )
    get_logger(__name__).info(threads_line, main_process_only=True)  # once the launch is known to be sound
    return accelerator


def rendezvous() -> str | None:
    """For processes started by hand (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set, no launcher):
    say what this one is about to wait for, since it waits silently until the peers come or
    PyTorch's time-out passes. Under a launcher the wait is short and says nothing."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world in ("", "1") or "MASTER_ADDR" not in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    waiting = (
        f"rank {os.environ.get('RANK', '?')} of {world} waiting for the other processes at "
        f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')} "
        f"(time-out {default_pg_timeout.total_seconds() / 60:g} min)"
    )
    logging.getLogger(__name__).info(waiting)  # Accelerate's logger cannot log before its state exists
    return waiting


def check_launch(accelerator: Accelerator) -> None:
    sizes = {
        k: int(os.environ.get(k, "1") or 1)
        for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    }
    name, world = max(sizes.items(), key=lambda kv: kv[1])
    if world > 1 and accelerator.num_processes != world:
        raise LaunchError(
            f"{name}={world} but this process is not part of a {world}-process group "
            f"(distributed type {accelerator.distributed_type}); the processes would train "
            "independently. Launch with `accelerate launch` and a config from configs/accelerate/"
        )
