"""A training run set up: its folder decided, its data loaded, its model built and its checkpoint
restored, as the `Session` the epoch loop (vae_dist.training) works with."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from vae_dist import files, runs, tracking
from vae_dist.config import Config, ConfigError
from vae_dist.data import splits
from vae_dist.ema import WeightAverage
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.models import VAE, build_model
from vae_dist.ranks import on_every_rank, on_main
from vae_dist.step import UpdateGuard, make_optimizer
from vae_dist.stopping import StopRequest

log = get_logger(__name__)


@dataclass
class Session:
    """Everything the epoch loop works with, once set up."""

    accelerator: Accelerator
    cfg: Config
    run_dir: Path
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped under several processes)
    core: VAE  # the same model, unwrapped
    optimizer: torch.optim.Optimizer
    train: splits.AnySplit  # uint8 [N, C, H, W], on the device or read from disk
    test: splits.AnySplit
    stop: StopRequest
    likelihood: PixelLikelihood  # what the decoder's output means (loss.likelihood)
    state: runs.TrainerState = field(default_factory=runs.TrainerState)
    curves: tracking.Curves = field(init=False)  # when curves.png is redrawn (main process)
    guard: UpdateGuard | None = field(init=False)  # train.grad_clip / train.skip_threshold
    average: WeightAverage | None = None  # train.ema

    @property
    def shown(self) -> VAE:
        """The model evaluated, drawn and saved: the weights' average with train.ema, else the model."""
        return self.average.model if self.average is not None else self.core

    def __post_init__(self):
        self.curves = tracking.Curves(self.run_dir, self.run_dir / runs.METRICS_FILE)
        self.guard = UpdateGuard.from_config(self.cfg)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // self.cfg.train.batch_size


# ---------------------------------------------------------------- setting up


def decide_run(
    accelerator: Accelerator, cfg: Config, resume: str | None, writer: ExitStack
) -> tuple[Path, Path | None, bool]:
    """The main process becomes the run folder's one writer (for as long as `writer` lasts), then
    decides the run folder and checkpoint (vae_dist.runs) and whether the run is already finished;
    the others are told. Nothing is written yet but the lock (and a checkpoint a kill left half-saved
    or set aside is cleared or put back)."""

    def hold(run_dir: Path) -> None:
        todo = "wait for it to end, or pass another --name"
        writer.enter_context(files.one_writer(run_dir, f"run {run_dir}", todo))

    def decide():
        run_dir, checkpoint = runs.decide_run(cfg, resume, hold)
        finished = runs.is_finished(run_dir, checkpoint, cfg.train.epochs)
        return str(run_dir), str(checkpoint) if checkpoint else None, finished

    run_dir, checkpoint, finished = on_main(accelerator, "deciding the run", decide)
    run_dir = Path(run_dir)
    cfg.run.name, cfg.run.output_dir = run_dir.name, str(run_dir.parent)  # config.yaml records the name used
    return run_dir, Path(checkpoint) if checkpoint else None, finished


def load_data(accelerator: Accelerator, cfg: Config) -> tuple[splits.AnySplit, splits.AnySplit]:
    """Both splits. One copy, download or preparation per machine: its main process first, then
    the others; either step failing anywhere fails everywhere (no process is left waiting). Copies
    on several machines must hold the same data (their digests are compared)."""

    def load():
        return splits.load_splits(cfg.data)

    local_main = accelerator.is_local_main_process
    first = on_every_rank(accelerator, "loading the data", load if local_main else lambda: None)
    train, test = on_every_rank(accelerator, "loading the data", (lambda: first) if local_main else load)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        digest = on_every_rank(accelerator, "checking the data", lambda: splits.dataset_digest(cfg.data))
        digests = gather_object([digest])
        if len(set(digests)) > 1:
            other = next(i for i, d in enumerate(digests) if d != digests[0])
            raise splits.DataError(
                f"process {other} reads other data than process 0 (their {cfg.data.path or 'data set'} differs); "
                "give every machine the same copy (vae-dist prepare --check DIR on each)"
            )
    if len(train) < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the training split ({len(train)} images)"
        )
    return train, test


def build(accelerator: Accelerator, cfg: Config, run_dir: Path, data, stop: StopRequest) -> Session:
    """The model and its optimizer, prepared by Accelerate, with the data on the device."""
    train, test = data
    likelihood = pixel_likelihood(cfg, train.image_shape)
    model = build_model(cfg.model, train.image_shape, likelihood.out_channels)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    # The average is copied before Accelerate wraps the model's forward (mixed precision).
    average = WeightAverage(model, cfg.train.ema) if cfg.train.ema > 0 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    if average is not None:
        average.model.to(device)
        accelerator.register_for_checkpointing(average)  # before a checkpoint is loaded
    core = accelerator.unwrap_model(model)
    return Session(
        accelerator, cfg, run_dir, model, core, optimizer, train.to(device), test.to(device), stop, likelihood,
        average=average,
    )


def pixel_likelihood(cfg: Config, image_shape: tuple[int, int, int]) -> PixelLikelihood:
    """loss.likelihood for images of `image_shape`, or a ConfigError when it cannot model them."""
    try:
        return PixelLikelihood(cfg.loss.likelihood, image_shape[0], cfg.loss.mixtures, cfg.loss.compile)
    except ValueError as e:
        raise ConfigError(f"loss.likelihood={cfg.loss.likelihood}: {e}; use bernoulli or gaussian") from None


def restore(s: Session, checkpoint: Path | None) -> None:
    """A checkpoint's state, if any; then the run folder's files (metrics of epochs that will run
    again are dropped)."""
    acc, cfg, run_dir = s.accelerator, s.cfg, s.run_dir
    if checkpoint:
        s.state = runs.load_checkpoint(acc, checkpoint)
        epoch, step = s.state.epoch, s.state.step_in_epoch
        if epoch > cfg.train.epochs or (epoch == cfg.train.epochs and step):
            raise runs.ResumeError(
                f"{checkpoint} is at epoch {epoch}, beyond train.epochs={cfg.train.epochs}; "
                "resume with at least as many epochs"
            )
        log.info(f"resumed from {checkpoint} (epoch {epoch}, step {s.state.global_step})", main_process_only=True)

    def write_run_files():
        with runs.writing(run_dir, run_dir):
            (run_dir / runs.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            runs.write_config(run_dir, cfg)
            metrics_path = run_dir / runs.METRICS_FILE
            kept = [r for r in files.read_jsonl(metrics_path) if r["epoch"] < s.state.epoch]
            files.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    on_main(acc, "writing the run folder", write_run_files)  # the first write to the run folder
    log.info(
        f"run {run_dir}: {cfg.model.kind} VAE on {splits.dataset_name(cfg.data)} {s.train.image_shape}, "
        f"{len(s.train)} train / {len(s.test)} test images, "
        f"{acc.num_processes} process(es) on {acc.device}, {s.steps_per_epoch} steps/epoch",
        main_process_only=True,
    )


def start(accelerator: Accelerator, cfg: Config, run_dir: Path, checkpoint: Path | None, stop: StopRequest) -> Session:
    """The session of a run about to train: data, model, then the checkpoint's state, if any."""
    session = build(accelerator, cfg, run_dir, load_data(accelerator, cfg), stop)
    restore(session, checkpoint)
    return session
