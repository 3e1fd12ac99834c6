"""Which process does what, and failures every process hears about.

A step that fails on one process must fail on all of them: a process left waiting in a collective
would hang until PyTorch's time-out. Both helpers share the first failure's one-line message; the
process where it happened raises the original error (a bug keeps its traceback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vae_dist.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator


def _message(e: BaseException, what: str, rank: int) -> str:
    if isinstance(e, (UserError, OSError)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"process {rank} failed while {what} (see its traceback)"


def on_main(accelerator: Accelerator, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process only, its result shared with every process."""
    from accelerate.utils import broadcast_object_list

    shared: list[Any] = [None, None]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            shared[0] = fn()
        except BaseException as e:
            shared[1], failure = _message(e, what, accelerator.process_index), e
    broadcast_object_list(shared)
    if failure is not None:
        raise failure
    if shared[1]:
        raise UserError(shared[1])
    return shared[0]


def on_every_rank(accelerator: Accelerator, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on every process; if it fails on any, it fails on all."""
    from accelerate.utils import gather_object

    result, failure, message = None, None, None
    try:
        result = fn()
    except BaseException as e:  # an interrupt too: the peers must not wait in the gather below
        failure, message = e, _message(e, what, accelerator.process_index)
    messages = gather_object([message]) if accelerator.num_processes > 1 else [message]
    if failure is not None:
        raise failure
    first = next((m for m in messages if m), None)
    if first:
        raise UserError(first)
    return result
