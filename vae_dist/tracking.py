"""What a run shows of itself while it trains: Accelerate's experiment trackers (`run.log_with`,
TensorBoard by default, written into the run folder) and `curves.png` (`Curves`: when it is redrawn).

Only the main process logs. Steps are optimizer steps. A resumed run continues the same curves:
its TensorBoard writer purges whatever the interrupted run logged after the checkpoint it resumes
from (`purge_step`), and the trackers are flushed at every checkpoint, so each step appears once.
The purge holds only if the resumed run's event file is read after the earlier ones, see
`after_earlier_event_files`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from vae_dist import files
from vae_dist.config import Config, ConfigError

PROJECT = "vae-dist"  # the trackers' project name
LOGS_DIR = "logs"  # under the run folder: <run>/logs/vae-dist/ holds the TensorBoard event files
EVENT_FILE_PREFIX = "events.out.tfevents."  # then the second it was created, host, pid, a counter
CURVES_FILE = "curves.png"
CURVES_EVERY = 30.0  # seconds: curves.png is redrawn at most this often between a run's start and end
HPARAMS_FILE = "hparams.yml"  # the resolved config, flat, beside the TensorBoard event files


def check_trackers(names: list[str]) -> None:
    """Each of `names` is a tracker Accelerate knows and whose package is installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"run.log_with: {name!r} is not a tracker Accelerate knows "
                f"({', '.join(sorted(LOGGER_TYPE_TO_CLASS))}); use [] for none"
            )
        if importlib.util.find_spec(name) is None:  # each tracker's package has the tracker's name
            raise ConfigError(f"run.log_with: {name} needs the {name} package (pip install {name}), or remove it")


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The resolved config, flat, with values the trackers accept (lists and None as text)."""
    flat = {}
    for section in dataclasses.fields(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            ok = isinstance(value, (bool, int, float, str))
            flat[f"{section.name}.{key}"] = value if ok else str(value)
    return flat


def start(accelerator: Accelerator, cfg: Config, run_dir: Path, resumed_at: int | None) -> None:
    """Start the trackers of `cfg.run.log_with` for the run; `resumed_at`: the global step of the
    checkpoint the run resumes from (what was logged after it is purged), None for a new run."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if resumed_at is not None:
        after_earlier_event_files(run_dir / LOGS_DIR / PROJECT)
    trackers = []
    for name in cfg.run.log_with:
        kind = LOGGER_TYPE_TO_CLASS[name]
        if kind.requires_logging_directory:
            kwargs = {"purge_step": resumed_at + 1} if name == "tensorboard" and resumed_at is not None else {}
            trackers.append(kind(PROJECT, str(run_dir / LOGS_DIR), **kwargs))
        else:
            trackers.append(kind(PROJECT))
    accelerator.log_with = trackers
    accelerator.init_trackers(PROJECT)
    values = hyperparameters(cfg)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            store_hyperparameters(tracker, values)
        else:
            tracker.store_init_configuration(values)


def store_hyperparameters(tracker, values: dict[str, Any]) -> None:
    """The run's configuration in its own TensorBoard run, and as HPARAMS_FILE beside its event
    files. (Accelerate's own `store_init_configuration` writes them into a second run named by the
    time, so TensorBoard listed every run twice.)"""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    writer = tracker.writer
    for summary in hparams(values, metric_dict={}):
        writer._get_file_writer().add_summary(summary)
    writer.flush()
    files.atomic_write_text(Path(tracker.logging_dir) / HPARAMS_FILE, yaml.safe_dump(values))


def after_earlier_event_files(folder: Path) -> None:
    """Return once an event file created now sorts after every one in `folder`.

    TensorBoard reads a folder's event files in name order. A name starts with the whole second
    the file was created in, then host, pid and a per-process counter compared as text: within one
    second a resumed run's file can sort first (counter 10 before 9), and the earlier run's steps
    are then read after the purge that should have dropped them. One second later it cannot."""
    stamps = [
        int(stamp)
        for path in folder.glob(f"{EVENT_FILE_PREFIX}*")
        if (stamp := path.name[len(EVENT_FILE_PREFIX) :].split(".")[0]).isdigit()
    ]
    if stamps:  # at most a second: a file dated later by a skewed clock is not waited for
        time.sleep(min(1.0, max(0.0, max(stamps) + 1 - time.time())))


def log(accelerator: Accelerator, values: dict[str, float], step: int) -> None:
    accelerator.log(values, step=step)


def log_images(accelerator: Accelerator, grids: dict[str, np.ndarray], step: int) -> None:
    """The epoch's grids (uint8 [C, H, W], as written to PNG), to the trackers that take images."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    rgb = {name: np.broadcast_to(pixels, (3, *pixels.shape[1:]))[None] for name, pixels in grids.items()}
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images(rgb, step=step, dataformats="NCHW")


def flush(accelerator: Accelerator) -> None:
    """Everything logged so far on disk (called with each checkpoint)."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        writer = getattr(tracker, "writer", None)
        if writer is not None and hasattr(writer, "flush"):
            writer.flush()


def end(accelerator: Accelerator) -> None:
    accelerator.end_training()


class Curves:
    """When curves.png is redrawn: at the end of an epoch once CURVES_EVERY seconds have passed since
    it was last drawn (or since the training started), and after the last epoch or when the run
    stops early (`draw`). Drawing it with matplotlib after every epoch would cost a visible share
    of a short epoch (docs/benchmarks.md#the-loop-users-run); metrics.jsonl has every epoch at once."""

    def __init__(self, run_dir: Path, metrics_file: Path):
        self.run_dir, self.metrics_file = run_dir, metrics_file
        self.drawn_at = time.perf_counter()  # of the last drawing; the session's start before one
        curves = run_dir / CURVES_FILE
        # metrics.jsonl has epochs curves.png does not show (a run stopped before it was redrawn)
        self.stale = metrics_file.is_file() and (
            not curves.is_file() or curves.stat().st_mtime_ns < metrics_file.stat().st_mtime_ns
        )

    def epoch_ended(self) -> None:
        self.stale = True
        if time.perf_counter() - self.drawn_at >= CURVES_EVERY:
            self.draw()

    def draw(self) -> None:
        """Redraw now, if metrics.jsonl has epochs curves.png does not show."""
        if self.stale:
            write_curves(self.run_dir, files.read_jsonl(self.metrics_file))
            self.drawn_at, self.stale = time.perf_counter(), False


def write_curves(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """curves.png: training loss and test -ELBO per epoch (also in bits/dim where the likelihood is
    discrete), and the test -ELBO's two terms."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in records], "o-", label="training loss (mean per image)")
    left.plot(epochs, [r["test_neg_elbo"] for r in records], "s-", label="test -ELBO")
    left.set(xlabel="epoch", ylabel="nats per image", title="loss")
    if "test_bits_per_dim" in records[-1]:  # a discrete likelihood: the same figures in bits/dim
        per_nat = records[-1]["test_bits_per_dim"] / records[-1]["test_neg_elbo"]
        left.secondary_yaxis("right", functions=(lambda n: n * per_nat, lambda b: b / per_nat)).set_ylabel(
            "bits per dimension"
        )
    right.plot(epochs, [r["test_recon"] for r in records], "o-", label="reconstruction")
    twin = right.twinx()
    twin.plot(epochs, [r["test_kl"] for r in records], "s-", color="tab:red", label="KL")
    right.set(xlabel="epoch", ylabel="reconstruction, nats", title="test -ELBO, its two terms")
    twin.set_ylabel("KL, nats")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    left.legend()
    right.legend(handles=right.get_lines() + twin.get_lines(), loc="center right")
    fig.suptitle(f"{run_dir.name}")
    files.atomic_write(run_dir / CURVES_FILE, lambda tmp: fig.savefig(tmp, format="png"))
