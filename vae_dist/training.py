"""Training a VAE with Accelerate: one loop for every model kind, on 1 process or many (the
command is vae_dist.train_command; `accelerate launch vae_dist/train.py` starts it).

`train` reads top to bottom: the processes (vae_dist.processes), the run folder (vae_dist.runs),
the data, the model and a checkpoint's state, the epochs, the model file. Which rows and noise each
process takes of a global batch, the determinism contract, is vae_dist.step's.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vae_dist import artifacts, files, runs, tracking
from vae_dist.config import Config
from vae_dist.data import splits
from vae_dist.epoch_end import test_elbo, write_grids
from vae_dist.errors import UserError
from vae_dist.losses import kl_weight
from vae_dist.models import VAE
from vae_dist.processes import make_accelerator
from vae_dist.ranks import on_main
from vae_dist.record import ModelRecord
from vae_dist.session import Session, decide_run, start
from vae_dist.step import FIRST_STEP_MESSAGE, learning_rate, micro_step, process_rows, process_slices, step_noise
from vae_dist.stopping import Stopped, StopRequest
from vae_dist.version import __version__

log = get_logger(__name__)


# ---------------------------------------------------------------- the epochs


def train_epochs(s: Session) -> dict[str, Any]:
    """The epoch loop, from where the state says; the last epoch's metrics."""
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(s.state.epoch, s.cfg.train.epochs):
            metrics = train_epoch(s, epoch)
            s.state = runs.TrainerState(epoch=epoch + 1, global_step=s.state.global_step)
            tracking.flush(s.accelerator)  # what was logged up to the checkpoint is kept; a resume purges the rest
            runs.save_checkpoint(s.accelerator, s.run_dir, s.state, s.cfg.train.keep_checkpoints)
    except (Stopped, KeyboardInterrupt):
        if s.accelerator.is_main_process:  # a stopped run's curves.png shows every epoch it finished
            try:
                draw_curves(s)
            except Exception as e:  # the stop and its message matter more than the picture
                log.warning(f"curves.png was not redrawn: {e}")
        raise
    on_main(s.accelerator, "drawing curves.png", lambda: draw_curves(s))
    return metrics


def draw_curves(s: Session) -> None:
    with runs.writing(s.run_dir, s.run_dir):
        s.curves.draw()


@dataclass
class EpochTally:
    """What an epoch has counted so far; a resumed epoch starts from the checkpoint's counts."""

    loss_sum: torch.Tensor  # float64 on the device: the sum of per-image losses of this process (updates made)
    images: int  # images of every process together
    started: float  # perf_counter() at the epoch's (virtual) start
    skipped: int = 0  # updates the guard skipped (train.grad_clip / train.skip_threshold)
    logged_images: int = 0  # for the images/s the trackers get
    logged_at: float = 0.0


def train_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """One epoch (or its rest, after a resume), then its end: evaluation, grids and metrics."""
    acc, state = s.accelerator, s.state
    # A resumed epoch's partial sum is the global one: it is counted once, on rank 0.
    partial = state.epoch_loss_sum if acc.process_index == 0 else 0.0
    tally = EpochTally(
        torch.tensor(partial, dtype=torch.float64, device=acc.device),
        state.epoch_images,
        time.perf_counter() - state.epoch_seconds,
        state.epoch_skipped,
    )
    tally.logged_images, tally.logged_at = tally.images, time.perf_counter()
    bar = tqdm(
        total=s.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {epoch}",
        dynamic_ncols=True,
        disable=not acc.is_local_main_process or not sys.stderr.isatty(),
    )
    try:
        run_steps(s, epoch, tally, bar)
    finally:
        bar.close()
    return end_epoch(s, epoch, tally)


def run_steps(s: Session, epoch: int, tally: EpochTally, bar) -> None:
    """The optimizer steps of the epoch from where the state says, each on this process's rows and
    noise of its global batch; a checkpoint mid-epoch when one is due or a stop is asked for."""
    acc, cfg, state = s.accelerator, s.cfg, s.state
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    slices = process_slices(batch, accum, acc.num_processes, acc.process_index)
    local = slices[0].stop - slices[0].start
    binarize = cfg.data.binarize == "dynamic"
    order = splits.epoch_order(len(s.train), cfg.train.seed, epoch)
    todo = range(state.step_in_epoch, s.steps_per_epoch)
    rows_of = (process_rows(order, step, batch, slices) for step in todo)
    for step, rows in zip(todo, splits.prefetched(s.train, rows_of, acc.device)):
        beta = kl_weight(cfg.loss.beta, cfg.loss.kl_warmup_steps, state.global_step)
        eps, uniform = step_noise(
            cfg.train.seed, state.global_step, batch, s.core.latent_dim, s.train.image_shape, binarize
        )
        if cfg.train.warmup_steps:
            for group in s.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, state.global_step)
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        for m, part in enumerate(slices):
            x = splits.to_float(rows[m * local : (m + 1) * local])
            if binarize:
                x = (uniform[part].to(acc.device) < x).to(x.dtype)
            eps_m = eps[part].to(acc.device)
            terms = micro_step(acc, s.model, s.optimizer, x, eps_m, beta, s.likelihood, s.guard)
            step_loss += terms.loss.detach().sum()
        if s.guard is not None and s.guard.last_skipped:  # the same on every process
            tally.skipped += 1
        else:
            tally.loss_sum += step_loss
            if s.average is not None and not s.optimizer.step_was_skipped:  # fp16's scaler skips some
                s.average.update(s.core)
        tally.images += batch
        state.global_step += 1
        after_step(s, step, tally, terms.loss.detach(), beta, bar)
        stop = s.stop.requested()
        every = cfg.train.checkpoint_every
        save = stop or (every and state.global_step % every == 0 and step + 1 < s.steps_per_epoch)
        if save or state.global_step % cfg.train.log_every == 0:  # the same on every process
            ensure_finite(s, epoch, tally)
        if save:
            save_mid_epoch(s, step, tally)
        if stop:
            raise Stopped(
                f"stopped by {signal.Signals(stop).name} at step {state.global_step} (epoch {epoch}); "
                f"{runs.progress_kept(s.run_dir)}; {runs.resume_hint(s.run_dir)}",
                128 + stop,
            )


def after_step(s: Session, step: int, tally: EpochTally, loss: torch.Tensor, beta: float, bar) -> None:
    """What a step shows: the first step's log line, the trackers' figures, the progress bar."""
    if s.state.global_step == 1:
        log.info(FIRST_STEP_MESSAGE, main_process_only=True)
    if s.cfg.run.log_with and s.state.global_step % s.cfg.train.log_every == 0:  # the same on every process
        log_step(s, loss.mean(), beta, tally)
    bar.update(1)
    if step % 50 == 0:
        bar.set_postfix(loss=f"{loss.mean().item():.2f}")


def log_step(s: Session, loss: torch.Tensor, beta: float, tally: EpochTally) -> None:
    """The trackers' step figures: the step's mean loss over every process, the KL weight, images/s;
    the learning rate during a warm-up; the gradient norm and the updates skipped, when guarded."""
    acc, step = s.accelerator, s.state.global_step
    loss = acc.reduce(loss.float().reshape(1), "mean").item()  # every process takes part
    seconds = time.perf_counter() - tally.logged_at
    values = {"train/loss": loss, "train/kl_weight": beta}
    if seconds > 0:
        values["train/images_per_s"] = (tally.images - tally.logged_images) / seconds
    if s.cfg.train.warmup_steps:
        values["train/lr"] = learning_rate(s.cfg, step - 1)
    if s.guard is not None:
        values.update({"train/grad_norm": s.guard.last_norm, "train/skipped_updates": tally.skipped})  # this epoch's
    tracking.log(acc, values, step)
    tally.logged_images, tally.logged_at = tally.images, time.perf_counter()


class Diverged(UserError):
    """The training loss or the weights stopped being finite numbers."""


def ensure_finite(s: Session, epoch: int, tally: EpochTally) -> None:
    """Stop the run once this epoch's loss so far or a weight is not a finite number, on any
    process (every process takes part): nothing of it is saved, so no checkpoint, model file or
    metrics line ever holds a NaN. Checked every train.log_every steps and before each save."""
    acc = s.accelerator
    finite = [torch.isfinite(tally.loss_sum).all(), *(torch.isfinite(p).all() for p in s.core.parameters())]
    bad = (~torch.stack(finite).all()).to(torch.float32).reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    if bad.item():
        checkpoints = runs.list_checkpoints(s.run_dir)
        kept = f"its last good checkpoint is {checkpoints[-1].name}" if checkpoints else "it has no checkpoint"
        raise Diverged(
            f"training diverged: the loss or the weights are no longer finite at step {s.state.global_step} "
            f"(epoch {epoch}, train.lr={s.cfg.train.lr:g}); no model was written and {kept}. "
            "Lower train.lr (or set loss.kl_warmup_steps) and train again under another --name"
        )


def save_mid_epoch(s: Session, step: int, tally: EpochTally) -> None:
    """A checkpoint after `step`, with the epoch's counts so far (summed over processes)."""
    state = s.state
    state.step_in_epoch = step + 1
    state.epoch_loss_sum = s.accelerator.reduce(tally.loss_sum.clone(), "sum").item()
    state.epoch_images, state.epoch_seconds = tally.images, time.perf_counter() - tally.started
    state.epoch_skipped = tally.skipped
    tracking.flush(s.accelerator)
    runs.save_checkpoint(s.accelerator, s.run_dir, state, s.cfg.train.keep_checkpoints)


def end_epoch(s: Session, epoch: int, tally: EpochTally) -> dict[str, Any]:
    """The exact test -ELBO, the grids, the metrics line, curves.png and the trackers' epoch figures."""
    acc, cfg = s.accelerator, s.cfg
    ensure_finite(s, epoch, tally)
    seconds = time.perf_counter() - tally.started
    total_loss = acc.reduce(tally.loss_sum.clone(), "sum").item()
    metrics = {
        "epoch": epoch,
        "step": s.state.global_step,
        "train_loss": total_loss / max(tally.images - tally.skipped * cfg.train.batch_size, 1),
        **test_elbo(acc, s.shown, s.likelihood, s.test, cfg),
        "seconds": seconds,
        "images_per_s": tally.images / seconds if seconds > 0 else None,
        "processes": acc.num_processes,
        "skipped_updates": tally.skipped,
    }

    def write_epoch_files():
        with runs.writing(s.run_dir, s.run_dir):
            grids = write_grids(s.shown, s.likelihood, s.test, cfg, s.run_dir / runs.IMAGES_DIR, epoch, acc.device)
            files.append_jsonl(s.run_dir / runs.METRICS_FILE, metrics)
            s.curves.epoch_ended()
        shown = ("test_neg_elbo", "test_recon", "test_kl", "test_bits_per_dim")
        epoch_values = {f"test/{k[5:]}": metrics[k] for k in shown if k in metrics}
        epoch_values.update({"train/epoch_loss": metrics["train_loss"], "epoch": epoch})
        tracking.log(acc, epoch_values, s.state.global_step)
        tracking.log_images(acc, grids, s.state.global_step)

    on_main(acc, "writing the epoch's grids and metrics", write_epoch_files)
    log.info(
        f"epoch {epoch}: train loss {metrics['train_loss']:.2f}, test -ELBO {metrics['test_neg_elbo']:.2f} "
        f"(recon {metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}) nats"
        + (f" = {metrics['test_bits_per_dim']:.4f} bits/dim" if "test_bits_per_dim" in metrics else "")
        + ", "
        f"{metrics['images_per_s']:.0f} images/s" + (f", {tally.skipped} update(s) skipped" if tally.skipped else ""),
        main_process_only=True,
    )
    return metrics


# ---------------------------------------------------------------- the end


def save_final_model(s: Session, metrics: dict[str, Any]) -> dict[str, Any]:
    """model.safetensors, self-describing; a resumed finished run reports its last epoch."""
    cfg = s.cfg

    def write_model():
        nonlocal metrics
        if not metrics:
            metrics = (files.read_jsonl(s.run_dir / runs.METRICS_FILE) or [{}])[-1]
        record = ModelRecord(
            model=cfg.model,
            image_shape=s.core.image_shape,
            dataset=splits.dataset_name(cfg.data),
            likelihood=cfg.loss.likelihood,
            mixtures=cfg.loss.mixtures,
            binarize=cfg.data.binarize,  # vae-dist evaluate binarises the test images of a dynamic run
            epochs=cfg.train.epochs,
            steps=s.state.global_step,
            test_neg_elbo=metrics.get("test_neg_elbo"),
            test_images=len(s.test),  # what test_neg_elbo was measured on (data.test_subset)
            fit=splits.dataset_fit(cfg.data),
            eval_seed=cfg.train.eval_seed,
            versions={"torch": torch.__version__, "vae_dist": __version__},
        )
        with runs.writing(s.run_dir, s.run_dir / runs.MODEL_FILE):
            artifacts.save_model(s.run_dir / runs.MODEL_FILE, s.shown, record)
        log.info(f"model written to {s.run_dir / runs.MODEL_FILE}", main_process_only=True)

    on_main(s.accelerator, "writing the model", write_model)
    return metrics


@dataclass
class TrainResult:
    run_dir: Path
    model: VAE  # this process's copy of the model saved (the weights' average with train.ema), unwrapped
    metrics: dict[str, Any]  # the last epoch's


def train(cfg: Config, resume: str | None = None, cpu: bool | None = None) -> TrainResult:
    """Train as configured. `cpu=None` picks the GPU when there is one."""
    tracking.check_trackers(cfg.run.log_with)
    accelerator = make_accelerator(cfg, cpu)
    set_seed(cfg.train.seed)
    with ExitStack() as writer:  # the main process is the run folder's one writer until the end
        run_dir, checkpoint, finished = decide_run(accelerator, cfg, resume, writer)
        return run(accelerator, cfg, run_dir, checkpoint, finished)


def run(accelerator: Accelerator, cfg: Config, run_dir: Path, checkpoint: Path | None, finished: bool) -> TrainResult:
    """The run decided: nothing to do when it is finished, else its epochs and its model file."""
    if finished:  # resuming a finished run changes nothing and writes nothing
        log.info(f"run {run_dir} is finished ({cfg.train.epochs} epochs); nothing to do", main_process_only=True)
        model, _ = artifacts.load_model(run_dir / runs.MODEL_FILE)
        metrics = (files.read_jsonl(run_dir / runs.METRICS_FILE) or [{}])[-1]
        accelerator.end_training()
        return TrainResult(run_dir, model, metrics)
    stop = StopRequest(accelerator)
    try:
        session = start(accelerator, cfg, run_dir, checkpoint, stop)
        resumed_at = session.state.global_step if checkpoint else None
        on_main(accelerator, "starting the trackers", lambda: tracking.start(accelerator, cfg, run_dir, resumed_at))
        metrics = train_epochs(session)
        metrics = save_final_model(session, metrics)
    except KeyboardInterrupt:
        raise Stopped(f"interrupted; {runs.progress_kept(run_dir)}; {runs.resume_hint(run_dir)}", 130) from None
    finally:
        stop.close()
    accelerator.end_training()
    return TrainResult(run_dir, session.shown, metrics)
