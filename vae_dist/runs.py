"""The run folder: its layout, which run a command means, and the checkpoints inside it.

    RUN/config.yaml                  the resolved configuration (with the run name used)
    RUN/metrics.jsonl                one line per epoch
    RUN/images/                      reconstruction and prior-sample grids per epoch
    RUN/model.safetensors            the final model (vae_dist.artifacts)
    RUN/onnx/                        its export (vae-dist export), RUN/web/ its browser site (vae-dist web)
    RUN/checkpoints/step-NNNNNNNN/   Accelerate's state plus trainer_state.json

`find_run` is the one place that reads --resume, --name and --output-dir; `decide_run` turns its
answer into the run folder and checkpoint a training run uses, refusing what would lose results.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vae_dist import files, paths, ranks
from vae_dist.config import Config, read_yaml
from vae_dist.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"  # vae_dist.artifacts writes it, vae_dist.record reads its header
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"  # vae-dist evaluate: one line per evaluation, appended
ONNX_DIR = "onnx"  # vae-dist export writes the run's export here
MANIFEST_FILE = "manifest.json"  # in ONNX_DIR: what was exported and whether it verified
WEB_DIR = "web"  # vae-dist web builds the run's browser site here
IMAGES_DIR = "images"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
# Accelerate's names for the model and optimizer state inside a checkpoint
CHECKPOINT_MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
# Keys that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "data.in_memory",  # where the rows are read from, not what they hold
    "data.memory_limit_mb",
    "train.log_every",  # what is logged, not what is trained (run.log_with, like every run.* key, may change too)
}


class ResumeError(UserError):
    """A run cannot be started or resumed as asked."""


@dataclass
class TrainerState:
    """Where the loop is; saved beside Accelerate's state so a resume continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum of per-image training losses so far in this epoch
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    epoch_skipped: int = 0  # updates skipped so far in this epoch (vae_dist.step.UpdateGuard)


ADDED_STATE_FIELDS = {"epoch_skipped": 0}  # TrainerState fields older checkpoints lack, with their value then


# ---------------------------------------------------------------- which run


@dataclass(frozen=True)
class RunTarget:
    """What --resume/--name/--output-dir point at."""

    run_dir: Path | None  # None: a new run, named after its model kind once that is known
    checkpoint: Path | None  # the checkpoint to resume from, if any
    resume: bool  # --resume was given

    @property
    def saved_config(self) -> Path | None:
        """The configuration the run was started with, if it has one."""
        path = self.run_dir / CONFIG_FILE if self.run_dir else None
        return path if path and path.is_file() else None


def find_run(resume: str | None, name: str | None, output_dir: str | Path) -> RunTarget:
    """Read --resume (None, 'auto', a run folder or a checkpoint folder), --name and --output-dir."""
    if resume and resume != "auto":
        path = Path(resume)
        if CHECKPOINT_RE.match(path.name) and path.parent.name == CHECKPOINTS_DIR:
            if not (path / STATE_FILE).is_file():
                raise ResumeError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
            return RunTarget(path.parent.parent, path, True)
        if (path / CONFIG_FILE).is_file():
            checkpoints = list_checkpoints(path)
            if not checkpoints:
                raise ResumeError(f"run {path} has no checkpoint to resume from")
            return RunTarget(path, checkpoints[-1], True)
        raise ResumeError(
            f"--resume {resume}: not a run folder nor a checkpoint (give RUNS/NAME or RUNS/NAME/checkpoints/step-N)"
        )
    if resume == "auto" and not name:
        raise ResumeError("--resume auto needs --name (the run to continue)")
    if not name:
        return RunTarget(None, None, False)
    check_name(name)
    run_dir = Path(output_dir) / name
    if resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints and (run_dir / MODEL_FILE).exists():
            # A folder that holds a trained model is never started again from scratch: that would
            # replace its model, configuration, metrics and images. (One stopped before its first
            # checkpoint holds nothing that its own configuration would not write again the same.)
            raise ResumeError(
                f"run {run_dir} holds a model but no checkpoint to resume from; pass another --name "
                "to start a new run, or move the folder away"
            )
        return RunTarget(run_dir, checkpoints[-1] if checkpoints else None, True)
    return RunTarget(run_dir, None, False)


def locate(run: str | Path, output_dir: str | Path | None = None) -> Path:
    """RUN as the commands take it: a path, or else a run name under the runs folder
    (`output_dir`, default $VAE_DIST_RUNS or ./runs), e.g. `vae-dist export conv-20241102-101500`."""
    path = Path(run)
    if not path.exists() and not path.is_absolute():
        folder = Path(output_dir) if output_dir is not None else paths.runs_dir()
        if (folder / path).exists():
            return folder / path
    return path


MAX_NAME_BYTES = 200  # a folder name may hold 255; its lock and staging names add to it


def check_name(name: str) -> None:
    """A run name is one plain folder name: it can never point outside the runs folder, break a
    line of `vae-dist runs`, pass for an option, or be too long for the file system."""
    plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and not Path(name).is_absolute()
    if not plain or any(ord(c) < 32 or ord(c) == 127 for c in name) or name.startswith("-"):
        raise ResumeError(
            f"run name {name!r} is not a plain folder name; use letters, digits, '-', '_' or '.' "
            "(not first: '-')"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ResumeError(f"run name of {len(name.encode())} bytes is too long; use at most {MAX_NAME_BYTES}")


def is_finished(run_dir: Path, checkpoint: Path | None, epochs: int) -> bool:
    """The run already holds its final model for `epochs` epochs: resuming it has nothing to do."""
    if checkpoint is None or not (run_dir / MODEL_FILE).is_file():
        return False
    state = read_state(checkpoint)
    return state.epoch == epochs and not state.step_in_epoch


def auto_name(kind: str) -> str:
    return f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def decide_run(
    cfg: Config, resume: str | None, hold: Callable[[Path], None] = lambda run_dir: None
) -> tuple[Path, Path | None]:
    """The run folder and checkpoint for training `cfg`, after refusing anything that would
    overwrite a run or continue it with another configuration. Runs on the main process; `hold` is
    called with the folder as soon as it is known (it makes this process its one writer), and what
    the folder holds is read again after that."""
    target = find_run(resume, cfg.run.name, cfg.run.output_dir)
    run_dir = target.run_dir or Path(cfg.run.output_dir) / auto_name(cfg.model.kind)
    hold(run_dir)
    for tmp in (run_dir / CHECKPOINTS_DIR).glob(".tmp-step-*"):  # no other writer now: a killed save's
        shutil.rmtree(tmp, ignore_errors=True)
    files.restore_all_moved_aside(run_dir / CHECKPOINTS_DIR)  # a checkpoint a kill left aside mid-swap
    if target.run_dir is not None:
        target = find_run(resume, cfg.run.name, cfg.run.output_dir)
    checkpoint = target.checkpoint
    if not target.resume and (run_dir / CONFIG_FILE).exists():
        raise ResumeError(
            f"run directory {run_dir} already holds a run; "
            "pass --resume auto to continue it or --name to start a new one"
        )
    if checkpoint or (target.resume and (run_dir / CONFIG_FILE).exists()):
        diff = config_differences(read_saved_config(run_dir), cfg)  # refuses a run without config.yaml
        if diff:
            raise ResumeError(f"cannot resume {run_dir} with a different configuration: {'; '.join(diff)}")
    if checkpoint:
        newer = [p.name for p in list_checkpoints(run_dir) if p.name > checkpoint.name]
        if newer:
            raise ResumeError(
                f"{run_dir} has checkpoints newer than {checkpoint.name} ({', '.join(newer)}); "
                "move them away to restart from an older one"
            )
        check_checkpoint(checkpoint)
    return run_dir, checkpoint


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """The configuration a run was started with, as a mapping of sections."""
    path = run_dir / CONFIG_FILE
    try:
        saved = read_yaml(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ResumeError(f"{path} cannot be read ({str(e).splitlines()[0]}); restore it to resume") from None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ResumeError(f"{path} is not a saved configuration (a mapping of sections); restore it to resume")
    return saved


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in d.items() for k, v in values.items()}


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    # A key the saved config lacks (written before the key existed) had its default value.
    a = {**flat_config(Config().to_dict()), **flat_config(saved)}
    b = flat_config(current.to_dict())
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith("run."))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if k not in RESUMABLE_CHANGES]


def write_config(run_dir: Path, cfg: Config) -> None:
    files.atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> None:
    """Accelerate's state plus ours, written to a temporary folder and renamed: a kill at any
    moment leaves either the previous checkpoints or a complete new one. A failed write (a full
    disk) removes the temporary folder and fails on every process."""
    folder = run_dir / CHECKPOINTS_DIR
    final = folder / f"step-{state.global_step:08d}"
    tmp = folder / f".tmp-step-{state.global_step:08d}"

    def prepare():
        with writing(run_dir, tmp):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def save():
        with writing(run_dir, tmp):
            accelerator.save_state(str(tmp))

    def finish():
        with writing(run_dir, tmp):
            files.atomic_write_text(tmp / STATE_FILE, json.dumps(state.__dict__, indent=1))
        # The same step saved twice (e.g. an epoch's end after a step's save) replaces the first
        # copy; the copy moved aside meanwhile has no step- name, so it is never picked.
        files.publish(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)

    try:
        ranks.on_main(accelerator, "preparing a checkpoint", prepare)
        ranks.on_every_rank(accelerator, "saving a checkpoint", save)
        ranks.on_main(accelerator, "finishing a checkpoint", finish)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # gives back the space a partial checkpoint took
        raise


def resume_hint(run_dir: Path) -> str:
    """How to continue `run_dir`, as a user would type it."""
    args = f"--name {run_dir.name}"
    if Path(run_dir.parent) != paths.runs_dir():
        args += f" --output-dir {run_dir.parent}"
    return f"to continue, run the same command with {args} --resume auto"


def progress_kept(run_dir: Path) -> str:
    """Where a continued run would start from, in words."""
    checkpoints = list_checkpoints(run_dir)
    return f"the run's latest checkpoint is {checkpoints[-1].name}" if checkpoints else "the run has no checkpoint yet"


@contextmanager
def writing(run_dir: Path, where: Path):
    """Turn a failed write under `where` into one line: which file, that nothing written before
    was lost, and how to continue. Other errors pass through unchanged."""
    try:
        with files.writing(where):
            yield
    except files.WriteError as e:
        path = e.path or where
        raise files.WriteError(
            f"could not write {'into ' if path.is_dir() else ''}{path} ({e.reason}); "
            f"nothing the run wrote before is lost ({progress_kept(run_dir)}). "
            f"{'Free some space' if e.no_room else 'Make the folder writable'}; then, {resume_hint(run_dir)}",
            path,
            e.reason,
            e.no_room,
        ) from None


def remove_checkpoint(path: Path) -> None:
    # The state file goes first: a kill during the removal leaves a folder that is never picked.
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


def _damaged(checkpoint: Path, what: str) -> ResumeError:
    """The error for a checkpoint that cannot be resumed from, with the way to an earlier one."""
    earlier = [p for p in list_checkpoints(checkpoint.parent.parent) if p.name < checkpoint.name]
    if earlier:
        todo = f"move {checkpoint} away and run the command again to resume from {earlier[-1].name}"
    else:
        todo = "there is no earlier checkpoint: start a new run with another --name"
    return ResumeError(f"checkpoint {checkpoint} is damaged: {what}; {todo}")


def read_state(checkpoint: Path) -> TrainerState:
    """A checkpoint's trainer_state.json, checked field by field."""
    path = checkpoint / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(checkpoint, f"{STATE_FILE} cannot be read ({str(e).splitlines()[0]})") from None
    fields = TrainerState.__dataclass_fields__
    if not isinstance(raw, dict):
        raise _damaged(checkpoint, f"{STATE_FILE} holds a {type(raw).__name__}, not an object")
    raw = {**ADDED_STATE_FIELDS, **raw}  # a checkpoint written before a field existed had its default
    unknown, missing = sorted(set(raw) - set(fields)), sorted(set(fields) - set(raw))
    if unknown or missing:
        what = "; ".join(f"{k} field(s) {', '.join(v)}" for k, v in (("unknown", unknown), ("no", missing)) if v)
        raise _damaged(checkpoint, f"{STATE_FILE} has {what}")
    for name, value in raw.items():
        kind = int if fields[name].type == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise _damaged(checkpoint, f"{STATE_FILE} has {name}={value!r}")
    return TrainerState(**raw)


def check_checkpoint(checkpoint: Path) -> TrainerState:
    """Refuse, before anything is loaded or written, a checkpoint that cannot be resumed from."""
    from safetensors import SafetensorError, safe_open

    state = read_state(checkpoint)
    model = checkpoint / CHECKPOINT_MODEL_FILE
    for needed in (model, checkpoint / OPTIMIZER_FILE):
        if not needed.is_file():
            raise _damaged(checkpoint, f"{needed.name} is missing")
    try:
        with safe_open(str(model), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise _damaged(checkpoint, f"{model.name} cannot be read ({str(e).splitlines()[0]})") from None
    return state


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainerState:
    state = check_checkpoint(checkpoint)
    for index in range(len(accelerator._custom_objects)):  # the weights' average (train.ema)
        if not (checkpoint / f"custom_checkpoint_{index}.pkl").is_file():
            raise _damaged(checkpoint, f"custom_checkpoint_{index}.pkl (the weights' average, train.ema) is missing")
    from safetensors import SafetensorError

    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, EOFError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        # torch reports a damaged file as a RuntimeError of its zip reader; any other RuntimeError
        # (out of memory, a shape mismatch) is not the checkpoint's fault and keeps its traceback
        if isinstance(e, RuntimeError) and not isinstance(e, SafetensorError) and "PytorchStreamReader" not in str(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise _damaged(checkpoint, f"it cannot be loaded ({reason})") from None
    return state
