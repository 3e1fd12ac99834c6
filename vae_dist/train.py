"""Train a VAE with Accelerate: one loop for both models, on 1 process or many.

    accelerate launch vae_dist/train.py --config configs/conv.yaml --set train.epochs=5
    vae-dist train --config configs/linear.yaml

Determinism across world sizes: `train.batch_size` is the *global* batch. Every optimizer step
takes the next `batch_size` images of an epoch order drawn from the seed, and draws the
reparameterisation (and binarisation) noise for the whole global batch from a generator seeded
by (seed, step); each process then takes its own slice of both. The loss is a per-image mean, so
DDP's gradient averaging yields the global-batch mean. 1 process and N processes therefore follow
the same trajectory up to float rounding. See docs/guarantees.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from vae_dist import __version__, artifacts, data, runs, tracking
from vae_dist.config import Config, ConfigError, load_config
from vae_dist.errors import UserError
from vae_dist.evaluation import evaluate, write_grids
from vae_dist.losses import kl_weight, negative_elbo
from vae_dist.models import VAE, build_model
from vae_dist.ranks import on_every_rank, on_main
from vae_dist.rng import Stream, generator

log = get_logger(__name__)
FIRST_STEP_MESSAGE = "first optimizer step done"  # make bench times the start-up up to this line


class LaunchError(UserError):
    """The processes were started in a way that would not train correctly."""


# ---------------------------------------------------------------- processes


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


# ---------------------------------------------------------------- the step


def make_optimizer(model: VAE, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: several times faster than the
    # per-tensor loop for these small models (see `make bench`).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=fused)


def micro_step(accelerator, model, optimizer, x, eps, beta: float, likelihood: str):
    """Forward and backward on one micro-batch; the optimizer steps when the accumulation is
    complete (Accelerate skips `step` and the gradient all-reduce before that)."""
    if _wrappers_do_nothing(accelerator):
        # One process, no accumulation, no loss scaling: Accelerate's accumulate/backward/step
        # wrappers reduce to the plain calls (bitwise the same result), minus ~10% of the step.
        logits, mu, logvar = model(x, eps)
        terms = negative_elbo(logits, x, mu, logvar, beta, likelihood)
        terms.loss.mean().backward()  # per-image mean: see the module docstring
        optimizer.optimizer.step()
        optimizer.optimizer.zero_grad(set_to_none=True)
        return terms
    with accelerator.accumulate(model):
        logits, mu, logvar = model(x, eps)
        terms = negative_elbo(logits, x, mu, logvar, beta, likelihood)
        accelerator.backward(terms.loss.mean())
        optimizer.step()
        optimizer.zero_grad()
    return terms


def _wrappers_do_nothing(accelerator: Accelerator) -> bool:
    return (
        accelerator.num_processes == 1
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.scaler is None
        and accelerator.distributed_type == DistributedType.NO
    )


# ---------------------------------------------------------------- the phases


def decide_run(accelerator: Accelerator, cfg: Config, resume: str | None) -> tuple[Path, Path | None, bool]:
    """The main process decides the run folder and checkpoint (vae_dist.runs), and whether the run
    is already finished; the others are told. Nothing is written yet."""

    def decide():
        run_dir, checkpoint = runs.decide_run(cfg, resume)
        finished = runs.is_finished(run_dir, checkpoint, cfg.train.epochs)
        return str(run_dir), str(checkpoint) if checkpoint else None, finished

    run_dir, checkpoint, finished = on_main(accelerator, "deciding the run", decide)
    run_dir = Path(run_dir)
    cfg.run.name, cfg.run.output_dir = run_dir.name, str(run_dir.parent)  # config.yaml records the name used
    return run_dir, Path(checkpoint) if checkpoint else None, finished


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



@dataclass
class Session:
    """Everything the epoch loop works with, once set up."""

    accelerator: Accelerator
    cfg: Config
    run_dir: Path
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped under several processes)
    core: VAE  # the same model, unwrapped
    optimizer: torch.optim.Optimizer
    train: data.AnySplit  # uint8 [N, C, H, W], on the device or read from disk
    test: data.AnySplit
    stop: StopRequest
    state: runs.TrainerState = field(default_factory=runs.TrainerState)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // self.cfg.train.batch_size


def start_or_resume(
    accelerator: Accelerator, cfg: Config, run_dir: Path, checkpoint: Path | None, stop: StopRequest
) -> Session:
    """Data, model and optimizer, prepared by Accelerate; then the checkpoint's state, if any, and
    the run folder's files (metrics of epochs that will run again are dropped)."""
    # One copy, download or preparation per machine: its main process first, then the others.
    # Either step failing anywhere fails everywhere (no process is left waiting).
    def load():
        return data.load_splits(cfg.data)

    local_main = accelerator.is_local_main_process
    first = on_every_rank(accelerator, "loading the data", load if local_main else lambda: None)
    train_split, test_split = on_every_rank(accelerator, "loading the data", (lambda: first) if local_main else load)
    if accelerator.num_processes > 1:  # copies on several machines must be the same data
        from accelerate.utils import gather_object

        digest = on_every_rank(accelerator, "checking the data", lambda: data.dataset_digest(cfg.data))
        digests = gather_object([digest])
        if len(set(digests)) > 1:
            other = next(i for i, d in enumerate(digests) if d != digests[0])
            raise data.DataError(
                f"process {other} reads other data than process 0 (their {cfg.data.path or 'data set'} differs); "
                "give every machine the same copy (vae-dist prepare --check DIR on each)"
            )
    if len(train_split) < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the training split ({len(train_split)} images)"
        )
    model = build_model(cfg.model, train_split.image_shape)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    session = Session(
        accelerator,
        cfg,
        run_dir,
        model,
        accelerator.unwrap_model(model),
        optimizer,
        train_split.to(device),
        test_split.to(device),
        stop,
    )
    if checkpoint:
        session.state = runs.load_checkpoint(accelerator, checkpoint)
        epoch, step = session.state.epoch, session.state.step_in_epoch
        if epoch > cfg.train.epochs or (epoch == cfg.train.epochs and step):
            raise runs.ResumeError(
                f"{checkpoint} is at epoch {epoch}, beyond train.epochs={cfg.train.epochs}; "
                "resume with at least as many epochs"
            )
        log.info(f"resumed from {checkpoint} (epoch {epoch}, step {session.state.global_step})", main_process_only=True)

    def write_run_files():
        with runs.writing(run_dir, run_dir):
            (run_dir / runs.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            runs.write_config(run_dir, cfg)
            metrics_path = run_dir / runs.METRICS_FILE
            kept = [r for r in artifacts.read_jsonl(metrics_path) if r["epoch"] < session.state.epoch]
            artifacts.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    on_main(accelerator, "writing the run folder", write_run_files)  # the first write to the run folder
    log.info(
        f"run {run_dir}: {cfg.model.kind} VAE on {data.dataset_name(cfg.data)} {train_split.image_shape}, "
        f"{len(train_split)} train / {len(test_split)} test images, "
        f"{accelerator.num_processes} process(es) on {device}, {session.steps_per_epoch} steps/epoch",
        main_process_only=True,
    )
    return session


def train_epochs(s: Session) -> dict[str, Any]:
    """The epoch loop, from where the state says; the last epoch's metrics."""
    metrics: dict[str, Any] = {}
    for epoch in range(s.state.epoch, s.cfg.train.epochs):
        metrics = train_epoch(s, epoch)
        s.state = runs.TrainerState(epoch=epoch + 1, global_step=s.state.global_step)
        tracking.flush(s.accelerator)  # what was logged up to the checkpoint is kept; a resume purges the rest
        runs.save_checkpoint(s.accelerator, s.run_dir, s.state, s.cfg.train.keep_checkpoints)
    return metrics


def train_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """One epoch (or its rest, after a resume), then evaluation, grids and the metrics line."""
    acc, cfg, state = s.accelerator, s.cfg, s.state
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    B, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    micro = B // accum  # images per micro-step, all processes together
    local = micro // world
    dynamic = cfg.data.binarize == "dynamic"
    image_shape = s.train.image_shape
    steps = s.steps_per_epoch

    order = data.epoch_order(len(s.train), cfg.train.seed, epoch)
    # A resumed epoch's partial sum is the global one: it is counted once, on rank 0.
    loss_sum = torch.tensor(state.epoch_loss_sum if rank == 0 else 0.0, dtype=torch.float64, device=device)
    images_seen = state.epoch_images
    t0 = time.perf_counter() - state.epoch_seconds
    bar = tqdm(
        total=steps,
        initial=state.step_in_epoch,
        desc=f"epoch {epoch}",
        dynamic_ncols=True,
        disable=not acc.is_local_main_process or not sys.stderr.isatty(),
    )
    mine = [slice(m * micro + rank * local, m * micro + (rank + 1) * local) for m in range(accum)]

    def my_rows(step: int) -> torch.Tensor:  # this process's images of the step, micro-batch after micro-batch
        batch = order[step * B : (step + 1) * B]
        return torch.cat([batch[part] for part in mine])

    logged_images, logged_at = images_seen, time.perf_counter()  # for the images/s the trackers get
    todo = range(state.step_in_epoch, steps)
    for step, rows in zip(todo, data.prefetched(s.train, map(my_rows, todo), device)):
        beta = kl_weight(cfg.loss.beta, cfg.loss.kl_warmup_steps, state.global_step)
        gen = generator(cfg.train.seed, Stream.STEP_NOISE, state.global_step)
        eps = torch.randn(B, s.core.latent_dim, generator=gen)
        uniform = torch.rand(B, *image_shape, generator=gen) if dynamic else None
        for m in range(accum):
            x = data.to_float(rows[m * local : (m + 1) * local])
            if dynamic:
                x = (uniform[mine[m]].to(device) < x).to(x.dtype)
            terms = micro_step(acc, s.model, s.optimizer, x, eps[mine[m]].to(device), beta, cfg.loss.likelihood)
            loss_sum += terms.loss.detach().sum()
        images_seen += B
        state.global_step += 1
        if state.global_step == 1:
            log.info(FIRST_STEP_MESSAGE, main_process_only=True)
        if cfg.run.log_with and state.global_step % cfg.train.log_every == 0:  # the same on every process
            log_step(acc, terms.loss.detach().mean(), beta, images_seen - logged_images, logged_at, state.global_step)
            logged_images, logged_at = images_seen, time.perf_counter()
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{terms.loss.detach().mean().item():.2f}")
        every = cfg.train.checkpoint_every
        stop = s.stop.requested()
        if stop or (every and state.global_step % every == 0 and step + 1 < steps):
            state.step_in_epoch = step + 1
            state.epoch_loss_sum = acc.reduce(loss_sum.clone(), "sum").item()
            state.epoch_images, state.epoch_seconds = images_seen, time.perf_counter() - t0
            tracking.flush(acc)
            runs.save_checkpoint(acc, s.run_dir, state, cfg.train.keep_checkpoints)
        if stop:
            bar.close()
            raise Stopped(
                f"stopped by {signal.Signals(stop).name} at step {state.global_step} (epoch {epoch}); "
                f"{runs.progress_kept(s.run_dir)}; {runs.resume_hint(s.run_dir)}",
                128 + stop,
            )
    bar.close()
    seconds = time.perf_counter() - t0
    total_loss = acc.reduce(loss_sum.clone(), "sum").item()
    metrics = {
        "epoch": epoch,
        "step": state.global_step,
        "train_loss": total_loss / max(images_seen, 1),
        **evaluate(acc, s.core, s.test, cfg),
        "seconds": seconds,
        "images_per_s": images_seen / seconds if seconds > 0 else None,
        "processes": world,
    }

    def write_epoch_files():
        with runs.writing(s.run_dir, s.run_dir):
            grids = write_grids(s.core, s.test, cfg, s.run_dir / runs.IMAGES_DIR, epoch, device)
            artifacts.append_jsonl(s.run_dir / runs.METRICS_FILE, metrics)
            tracking.write_curves(s.run_dir, artifacts.read_jsonl(s.run_dir / runs.METRICS_FILE))
        epoch_values = {f"test/{k[5:]}": metrics[k] for k in ("test_neg_elbo", "test_recon", "test_kl")}
        epoch_values.update({"train/epoch_loss": metrics["train_loss"], "epoch": epoch})
        tracking.log(acc, epoch_values, state.global_step)
        tracking.log_images(acc, grids, state.global_step)

    on_main(acc, "writing the epoch's grids and metrics", write_epoch_files)
    log.info(
        f"epoch {epoch}: train loss {metrics['train_loss']:.2f}, test -ELBO {metrics['test_neg_elbo']:.2f} "
        f"(recon {metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}) nats, "
        f"{metrics['images_per_s']:.0f} images/s",
        main_process_only=True,
    )
    return metrics


def log_step(acc, loss: torch.Tensor, beta: float, images: int, since: float, step: int) -> None:
    """The trackers' step figures: the step's mean loss over every process, the KL weight, images/s."""
    loss = acc.reduce(loss.float().reshape(1), "mean").item()  # every process takes part
    seconds = time.perf_counter() - since
    values = {"train/loss": loss, "train/kl_weight": beta}
    if seconds > 0:
        values["train/images_per_s"] = images / seconds
    tracking.log(acc, values, step)


def save_final_model(s: Session, metrics: dict[str, Any]) -> dict[str, Any]:
    """model.safetensors, self-describing; a resumed finished run reports its last epoch."""
    cfg = s.cfg

    def write_model():
        nonlocal metrics
        if not metrics:
            metrics = (artifacts.read_jsonl(s.run_dir / runs.METRICS_FILE) or [{}])[-1]
        extra = {
            "dataset": data.dataset_name(cfg.data),
            "likelihood": cfg.loss.likelihood,
            "binarize": cfg.data.binarize,  # vae-dist evaluate binarises the test images of a dynamic run
            "epochs": cfg.train.epochs,
            "steps": s.state.global_step,
            "test_neg_elbo": metrics.get("test_neg_elbo"),
            "test_images": len(s.test),  # what test_neg_elbo was measured on (data.test_subset)
            "fit": data.dataset_fit(cfg.data),  # how images were made rows (vae-dist prepare), or None
            "eval_seed": cfg.train.eval_seed,  # export verification draws the same evaluation noise
            "versions": {"torch": torch.__version__, "vae_dist": __version__},
        }
        with runs.writing(s.run_dir, s.run_dir / artifacts.MODEL_FILE):
            artifacts.save_model(s.run_dir / artifacts.MODEL_FILE, s.core, cfg.model, extra)
        log.info(f"model written to {s.run_dir / artifacts.MODEL_FILE}", main_process_only=True)

    on_main(s.accelerator, "writing the model", write_model)
    return metrics


@dataclass
class TrainResult:
    run_dir: Path
    model: VAE  # this process's copy, unwrapped
    metrics: dict[str, Any]  # the last epoch's


def train(cfg: Config, resume: str | None = None, cpu: bool | None = None) -> TrainResult:
    """Train as configured. `cpu=None` picks the GPU when there is one."""
    tracking.check_trackers(cfg.run.log_with)
    accelerator = make_accelerator(cfg, cpu)
    set_seed(cfg.train.seed)
    run_dir, checkpoint, finished = decide_run(accelerator, cfg, resume)
    if finished:  # resuming a finished run changes nothing and writes nothing
        log.info(f"run {run_dir} is finished ({cfg.train.epochs} epochs); nothing to do", main_process_only=True)
        model, _ = artifacts.load_model(run_dir / artifacts.MODEL_FILE)
        metrics = (artifacts.read_jsonl(run_dir / runs.METRICS_FILE) or [{}])[-1]
        accelerator.end_training()
        return TrainResult(run_dir, model, metrics)
    stop = StopRequest(accelerator)
    try:
        session = start_or_resume(accelerator, cfg, run_dir, checkpoint, stop)
        resumed_at = session.state.global_step if checkpoint else None
        on_main(accelerator, "starting the trackers", lambda: tracking.start(accelerator, cfg, run_dir, resumed_at))
        metrics = train_epochs(session)
        metrics = save_final_model(session, metrics)
    except KeyboardInterrupt:
        raise Stopped(f"interrupted; {runs.progress_kept(run_dir)}; {runs.resume_hint(run_dir)}", 130) from None
    finally:
        stop.close()
    accelerator.end_training()
    return TrainResult(run_dir, session.core, metrics)


# ---------------------------------------------------------------- command line


@click.command("train")
@click.option(
    "--config",
    "config_path",
    help="YAML file (e.g. configs/conv.yaml) or a shipped config name (linear, conv). Without it: the run's "
    "own config when resuming, else the built-in defaults (the linear 784-400-20 VAE, 10 epochs).",
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.epochs=5."
)
@click.option("--name", help="Run name (folder under run.output_dir); default <kind>-<date>-<time>.")
@click.option("--output-dir", help="Folder holding the runs (run.output_dir; default $VAE_DIST_RUNS or ./runs).")
@click.option("--resume", help="'auto' (latest checkpoint of the run --name, if any) or a run/checkpoint path.")
@click.option(
    "--cpu/--no-cpu",
    default=None,
    help="Force CPU (gloo between processes) or leave the choice to Accelerate; default: CPU when no GPU is present.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes on this machine (one per GPU; gloo on CPU), started through Accelerate's launcher.",
)
def train_command(config_path, overrides, name, output_dir, resume, cpu, processes):
    """Train a VAE (on several processes with --processes, or under `accelerate launch`)."""
    main_rank = os.environ.get("RANK", "0") == "0"
    if processes > 1:
        from vae_dist.launch import launch_training

        if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            if main_rank:
                click.echo("error: --processes starts a launcher; under one, give the launcher the count", err=True)
            sys.exit(2)
        gpus = torch.cuda.device_count() if cpu is not True else 0
        if 0 < gpus < processes:
            click.echo(f"error: --processes {processes} but this machine has {gpus} GPU(s); use at most {gpus}, "
                       "or --cpu", err=True)
            sys.exit(2)

        args = [
            a
            for k, v in (
                ("--config", config_path),
                ("--name", name),
                ("--output-dir", output_dir),
                ("--resume", resume),
            )
            if v
            for a in (k, v)
        ]
        args += [a for o in overrides for a in ("--set", o)]
        args += [] if cpu is None else ["--cpu" if cpu else "--no-cpu"]
        sys.exit(launch_training(processes, args))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its INFO lines per checkpoint are noise here
    target = None
    try:
        if config_path is None and resume:
            # A resumed run without --config continues with the configuration it was started with.
            target = runs.find_run(resume, name, output_dir or load_config(None).run.output_dir)
            if target.saved_config is None:
                raise runs.ResumeError(
                    f"--resume {resume}: no run with a saved config.yaml there; "
                    "check --name/--output-dir or pass --config"
                )
            config_path = target.saved_config
        if config_path is None:
            logging.getLogger(__name__).info("no --config: training the built-in defaults (the linear 784-400-20 VAE)")
        cfg = load_config(config_path, overrides)
        cfg.run.name = name or cfg.run.name
        cfg.run.output_dir = output_dir or cfg.run.output_dir
        if resume and target is not None:  # the run is where it was found, wherever it was first written
            cfg.run.name, cfg.run.output_dir = target.run_dir.name, str(target.run_dir.parent)
        run_dir = train(cfg, resume=resume, cpu=cpu).run_dir
    except (UserError, OSError) as e:
        if main_rank:
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Stopped as e:
        if main_rank:
            click.echo(str(e), err=True)
        sys.exit(e.status)
    except KeyboardInterrupt:  # before the run folder was decided: nothing written
        if main_rank:
            click.echo("interrupted before training started; nothing was written", err=True)
        sys.exit(130)
    if main_rank:
        click.echo(str(run_dir))


if __name__ == "__main__":
    train_command()
