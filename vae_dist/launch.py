"""`vae-dist train --processes N`: Accelerate's launcher, run from here on this machine.

Under `accelerate launch`, a worker's one-line error or a forwarded signal ends in about thirty
lines of launcher traceback and exit status 1. Started from here, the launcher's failure is turned
back into the worker's own: its line (already printed) and its exit status (2 for a usage error,
130 or 143 for a signal). The processes and what they train are the same as with `accelerate
launch --multi_gpu --num_processes N`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

from vae_dist import threads
from vae_dist.errors import UserError

TRAIN_SCRIPT = str(Path(__file__).with_name("train.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_training(processes: int, args: list[str], port: int | None = None) -> int:
    """Run `train.py ARGS` on `processes` processes of this machine; the exit status to report.
    Each process uses the threads the user chose (OMP_NUM_THREADS), else its share of the cores,
    given to the launcher as a choice so that the processes keep it (vae_dist.threads)."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (its logger, set below)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The launcher's records of a failure or a signal repeat what the workers say themselves.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    argv = ["--num_machines", "1", "--num_processes", str(processes), "--dynamo_backend", "no"]
    argv += ["--mixed_precision", "no"]  # the training config decides; "no" here leaves it to it
    count = threads.chosen()[0] or max(1, threads.cores() // processes)
    argv += [threads.THREADS_OPTION, str(count)]
    argv += ["--multi_gpu", "--main_process_port", str(port or _free_port()), TRAIN_SCRIPT, *args]
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a worker killed by signal S reports -S
    except SignalException as e:
        return 128 + int(e.sigval)
    except subprocess.CalledProcessError as e:
        return e.returncode
    return 0


def relaunch(processes: int, cpu: bool | None, options: dict[str, str | None], overrides: tuple[str, ...]) -> int:
    """`vae-dist train --processes N` with its `options` (--config, --name, ...) and overrides:
    refused under a launcher or with more processes than GPUs, else `launch_training`."""
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("--processes starts a launcher; under one, give the launcher the count")
    import torch

    gpus = torch.cuda.device_count() if cpu is not True else 0
    if 0 < gpus < processes:
        raise UserError(f"--processes {processes} but this machine has {gpus} GPU(s); use at most {gpus}, or --cpu")
    args = [a for option, value in options.items() if value for a in (option, value)]
    args += [a for o in overrides for a in ("--set", o)]
    args += [] if cpu is None else ["--cpu" if cpu else "--no-cpu"]
    return launch_training(processes, args)
