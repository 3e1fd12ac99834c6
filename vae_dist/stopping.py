"""Stopping a run cleanly: SIGTERM asks for a checkpoint after the next optimizer step, agreed
by every process; `Stopped` carries the message and the exit status."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator


class Stopped(Exception):
    """Training stopped on a signal; the message says what was kept and how to continue."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status  # 128 + the signal's number, as a shell reports it


class StopRequest:
    """SIGTERM (what schedulers send before killing a pre-empted job) asks the run to save a
    checkpoint after its next optimizer step and stop. The processes agree on that step: each
    step, they share whether any of them was signalled (over gloo, whatever the training backend)."""

    def __init__(self, accelerator: Accelerator):
        self.signal = 0
        self.group = None
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum, frame) -> None:
        self.signal = signum
        self.close()  # a second SIGTERM is not deferred: it ends the process as it would have

    def requested(self) -> int:
        """The signal that asks to stop (0: none), the same on every process."""
        if self.group is None:
            return self.signal
        import torch.distributed as dist

        flag = torch.tensor([self.signal])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
