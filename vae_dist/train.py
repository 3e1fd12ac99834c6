"""Train a VAE with Accelerate: one loop for both models, on 1 process or many.

    accelerate launch vae_dist/train.py --config configs/conv.yaml --set train.epochs=5
    vae-dist train --config configs/linear.yaml

Determinism across world sizes: `train.batch_size` is the *global* batch. Every optimizer step
takes the next `batch_size` images of an epoch order drawn from the seed, and draws the
reparameterisation (and binarisation) noise for the whole global batch from a generator seeded
by (seed, step); each process then takes its own slice of both. The loss is a per-image mean, so
DDP's gradient averaging yields the global-batch mean. 1 process and N processes therefore follow
the same trajectory up to float rounding.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from vae_dist import artifacts, data
from vae_dist.config import Config, ConfigError, load_config
from vae_dist.losses import kl_weight, negative_elbo
from vae_dist.models import VAE, build_model

log = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
# Keys that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {"train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batch_size"}


class LaunchError(RuntimeError):
    """The processes were started in a way that would not train correctly."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed from."""


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
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
        )
    except ValueError as e:  # e.g. WORLD_SIZE set by hand without a rendezvous address
        raise LaunchError(f"cannot set up the processes: {str(e).splitlines()[0]}") from e
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    sizes = {k: int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")}
    name, world = max(sizes.items(), key=lambda kv: kv[1])
    if world > 1 and accelerator.num_processes != world:
        raise LaunchError(
            f"{name}={world} but this process is not part of a {world}-process group "
            f"(distributed type {accelerator.distributed_type}); the processes would train "
            "independently. Launch with `accelerate launch` and a config from configs/accelerate/"
        )


@dataclass
class TrainerState:
    """Where the loop is; saved beside Accelerate's state so a resume continues exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum of per-image training losses so far in this epoch
    epoch_images: int = 0
    epoch_seconds: float = 0.0


# ---------------------------------------------------------------- run directory and checkpoints


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in d.items() for k, v in values.items()}


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    a, b = flat_config(saved), flat_config(current.to_dict())
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith("run."))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if k not in RESUMABLE_CHANGES]


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_run(cfg: Config, resume: str | None) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint to resume from (if any). Runs on the main process."""
    if resume and resume != "auto":
        path = Path(resume)
        if CHECKPOINT_RE.match(path.name) and path.parent.name == "checkpoints":
            if not (path / STATE_FILE).is_file():
                raise ResumeError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
            return path.parent.parent, path
        if (path / "config.yaml").is_file():
            ckpts = list_checkpoints(path)
            if not ckpts:
                raise ResumeError(f"run {path} has no checkpoint to resume from")
            return path, ckpts[-1]
        raise ResumeError(f"--resume {resume}: not a run directory nor a checkpoint (runs/NAME/checkpoints/step-N)")
    name = cfg.run.name or f"{cfg.model.kind}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.run.output_dir) / name
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return run_dir, (ckpts[-1] if ckpts else None)
    if (run_dir / "config.yaml").exists():
        raise ResumeError(
            f"run directory {run_dir} already holds a run; pass --resume auto to continue it "
            "or --name to start a new one"
        )
    return run_dir, None


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep: int) -> None:
    """Accelerate's state plus ours, written to a temporary folder and renamed: a kill at any
    moment leaves either the previous checkpoints or a complete new one."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{state.global_step:08d}"
    tmp = folder / f".tmp-step-{state.global_step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        artifacts.atomic_write_text(tmp / STATE_FILE, json.dumps(state.__dict__, indent=1))
        if final.exists():  # the same step saved twice (e.g. epoch end after a step save)
            _remove_checkpoint(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()


def _remove_checkpoint(path: Path) -> None:
    # The state file goes first: a kill during the removal leaves a folder that is never picked.
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainerState:
    accelerator.load_state(str(checkpoint))
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: VAE, test: data.Split, cfg: Config) -> dict[str, float]:
    """-ELBO on exactly the whole test split, whatever the number of processes.

    Each process takes a contiguous share, padded to equal length; every row carries its image
    index, padding rows carry -1, and after the gather each image counts exactly once.
    """
    n, world, rank = len(test), accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    share = torch.arange(rank * per, (rank + 1) * per)
    valid = share < n
    share = share.clamp(max=n - 1)
    # Fixed evaluation noise, one row per test image: the value does not depend on the split.
    eps = torch.randn(n, model.latent_dim, generator=data.generator(cfg.train.eval_seed, 2))
    rows = []
    model.eval()
    for lo in range(0, per, cfg.train.eval_batch_size):
        idx = share[lo : lo + cfg.train.eval_batch_size]
        x = data.to_float(test.images[idx.to(test.images.device)])
        logits, mu, logvar = model(x, eps[idx].to(x.device))
        t = negative_elbo(logits, x, mu, logvar, 1.0, cfg.loss.likelihood)
        index = torch.where(valid[lo : lo + len(idx)], idx, -1).to(x.device, torch.float64)
        rows.append(torch.stack([index, t.recon.double(), t.kl.double()], dim=1))
    model.train()
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=accelerator.device)
    table = accelerator.gather_for_metrics(local).cpu()
    table = table[table[:, 0] >= 0]
    table = table[table[:, 0].argsort()]
    count = table.shape[0]
    assert count == n and torch.equal(table[:, 0].long(), torch.arange(n)), (
        f"evaluation covered {count} rows for {n} test images"
    )
    recon, kl = table[:, 1].mean().item(), table[:, 2].mean().item()
    return {"test_neg_elbo": recon + kl, "test_recon": recon, "test_kl": kl, "test_images": count}


@torch.no_grad()
def write_grids(model: VAE, test: data.Split, cfg: Config, run_dir: Path, epoch: int, device) -> None:
    model.eval()
    x = data.to_float(test.images[: cfg.train.grid_images].to(device))
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))  # the decoder's mean at the posterior mean
    images = run_dir / "images"
    artifacts.save_reconstruction_grid(images / f"reconstruction_epoch{epoch:03d}.png", x, recon)
    z = torch.randn(cfg.train.grid_samples, model.latent_dim, generator=data.generator(cfg.train.seed, 3))
    samples = torch.sigmoid(model.decode(z.to(device)))
    artifacts.save_sample_grid(images / f"samples_epoch{epoch:03d}.png", samples)
    model.train()


# ---------------------------------------------------------------- training


def make_optimizer(model: VAE, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: several times faster than the
    # per-tensor loop for these small models (see `make bench`).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=fused)


def micro_step(accelerator, model, optimizer, x, eps, beta: float, likelihood: str):
    """Forward and backward on one micro-batch; the optimizer steps when the accumulation is
    complete (Accelerate skips `step` and the gradient all-reduce before that)."""
    with accelerator.accumulate(model):
        logits, mu, logvar = model(x, eps)
        terms = negative_elbo(logits, x, mu, logvar, beta, likelihood)
        accelerator.backward(terms.loss.mean())  # per-image mean: see the module docstring
        optimizer.step()
        optimizer.zero_grad()
    return terms


@dataclass
class TrainResult:
    run_dir: Path
    model: VAE  # this process's copy, unwrapped
    metrics: dict[str, Any]  # the last epoch's


def train(cfg: Config, resume: str | None = None, cpu: bool | None = None) -> TrainResult:
    """Train as configured. `cpu=None` picks the GPU when there is one."""
    accelerator = make_accelerator(cfg, cpu)
    world = accelerator.num_processes
    if cfg.train.batch_size % (world * cfg.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of processes x "
            f"train.grad_accum_steps ({world} x {cfg.train.grad_accum_steps}); it is the global batch"
        )
    set_seed(cfg.train.seed)

    # Only the main process decides the run directory; the others are told.
    decided: list[Any] = [None, None, None]
    if accelerator.is_main_process:
        try:
            run_dir, checkpoint = resolve_run(cfg, resume)
            decided = [str(run_dir), str(checkpoint) if checkpoint else None, None]
            if checkpoint:
                saved = yaml.safe_load((run_dir / "config.yaml").read_text())
                if not isinstance(saved, dict):
                    raise ResumeError(f"{run_dir / 'config.yaml'} is not a saved configuration")
                diff = config_differences(saved, cfg)
                if diff:
                    raise ResumeError(
                        f"cannot resume {run_dir} with a different configuration: {'; '.join(diff)}"
                    )
                newer = [p.name for p in list_checkpoints(run_dir) if p.name > checkpoint.name]
                if newer:
                    raise ResumeError(
                        f"{run_dir} has checkpoints newer than {checkpoint.name} ({', '.join(newer)}); "
                        "move them away to restart from an older one"
                    )
            (run_dir / "images").mkdir(parents=True, exist_ok=True)  # fails here, before any collective
        except Exception as e:  # every rank must learn of it, or the others wait forever
            decided = [None, None, f"{e}".splitlines()[0] if str(e) else type(e).__name__]
    broadcast_object_list(decided)
    if decided[2]:
        raise ResumeError(decided[2])
    run_dir, checkpoint = Path(decided[0]), (Path(decided[1]) if decided[1] else None)

    with accelerator.local_main_process_first():  # one copy or download per machine
        train_split, test_split = data.load_splits(cfg.data)
    image_shape = train_split.image_shape
    steps_per_epoch = len(train_split) // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the training split "
            f"({len(train_split)} images)"
        )
    model = build_model(cfg.model, image_shape)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: VAE = accelerator.unwrap_model(model)
    device = accelerator.device
    train_images = train_split.images.to(device)
    test_split = data.Split(test_split.images.to(device))

    state = TrainerState()
    if checkpoint:
        state = load_checkpoint(accelerator, checkpoint)
        if state.epoch > cfg.train.epochs or (state.epoch == cfg.train.epochs and state.step_in_epoch):
            raise ResumeError(
                f"{checkpoint} is at epoch {state.epoch}, beyond train.epochs={cfg.train.epochs}; "
                "resume with at least as many epochs"
            )
        log.info(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step})", main_process_only=True)
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # Epochs after the checkpoint will be run again: drop their entries so that each
        # epoch has exactly one.
        kept = [r for r in artifacts.read_jsonl(metrics_path) if r["epoch"] < state.epoch]
        artifacts.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    accelerator.wait_for_everyone()
    log.info(
        f"run {run_dir}: {cfg.model.kind} VAE on {cfg.data.name} {image_shape}, {len(train_split)} train / "
        f"{len(test_split)} test images, {world} process(es) on {device}, {steps_per_epoch} steps/epoch",
        main_process_only=True,
    )

    B = cfg.train.batch_size
    micro = B // cfg.train.grad_accum_steps  # images per micro-step, all processes together
    local = micro // world
    rank = accelerator.process_index
    dynamic = cfg.data.binarize == "dynamic"
    metrics: dict[str, Any] = {}

    for epoch in range(state.epoch, cfg.train.epochs):
        order = data.epoch_order(len(train_split), cfg.train.seed, epoch).to(device)
        # A resumed epoch's partial sum is the global one: it is counted once, on rank 0.
        partial = state.epoch_loss_sum if rank == 0 else 0.0
        loss_sum = torch.tensor(partial, dtype=torch.float64, device=device)
        images_seen = state.epoch_images
        t0 = time.perf_counter() - state.epoch_seconds
        bar = tqdm(
            total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch}",
            disable=not accelerator.is_local_main_process or not sys.stderr.isatty(), dynamic_ncols=True,
        )
        for step in range(state.step_in_epoch, steps_per_epoch):
            beta = kl_weight(cfg.loss.beta, cfg.loss.kl_warmup_steps, state.global_step)
            batch = order[step * B : (step + 1) * B]
            gen = data.generator(cfg.train.seed, 1, state.global_step)
            eps = torch.randn(B, core.latent_dim, generator=gen)
            uniform = torch.rand(B, *image_shape, generator=gen) if dynamic else None
            for m in range(cfg.train.grad_accum_steps):
                mine = slice(m * micro + rank * local, m * micro + (rank + 1) * local)
                x = data.to_float(train_images[batch[mine]])
                if dynamic:
                    x = (uniform[mine].to(device) < x).to(x.dtype)
                terms = micro_step(accelerator, model, optimizer, x, eps[mine].to(device), beta, cfg.loss.likelihood)
                loss_sum += terms.loss.detach().sum()
            images_seen += B
            state.global_step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{terms.loss.detach().mean().item():.2f}")
            every = cfg.train.checkpoint_every
            if every and state.global_step % every == 0 and step + 1 < steps_per_epoch:
                state.step_in_epoch = step + 1
                state.epoch_loss_sum = accelerator.reduce(loss_sum.clone(), "sum").item()
                state.epoch_images, state.epoch_seconds = images_seen, time.perf_counter() - t0
                save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints)
        bar.close()
        seconds = time.perf_counter() - t0
        total_loss = accelerator.reduce(loss_sum.clone(), "sum").item()

        metrics = {
            "epoch": epoch,
            "step": state.global_step,
            "train_loss": total_loss / max(images_seen, 1),
            **evaluate(accelerator, core, test_split, cfg),
            "seconds": seconds,
            "images_per_s": images_seen / seconds if seconds > 0 else None,
            "processes": world,
        }
        if accelerator.is_main_process:
            write_grids(core, test_split, cfg, run_dir, epoch, device)
            artifacts.append_jsonl(metrics_path, metrics)
        log.info(
            f"epoch {epoch}: train loss {metrics['train_loss']:.2f}, test -ELBO {metrics['test_neg_elbo']:.2f} "
            f"(recon {metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}) nats, "
            f"{metrics['images_per_s']:.0f} images/s",
            main_process_only=True,
        )
        state = TrainerState(epoch=epoch + 1, global_step=state.global_step)
        save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints)

    if accelerator.is_main_process:
        if not metrics:  # resumed a finished run: report its last epoch
            metrics = (artifacts.read_jsonl(metrics_path) or [{}])[-1]
        artifacts.save_model(
            run_dir / artifacts.MODEL_FILE,
            core,
            cfg.model,
            {
                "dataset": cfg.data.name,
                "likelihood": cfg.loss.likelihood,
                "epochs": cfg.train.epochs,
                "steps": state.global_step,
                "test_neg_elbo": metrics.get("test_neg_elbo"),
                "versions": {"torch": torch.__version__, "vae_dist": _version()},
            },
        )
        log.info(f"model written to {run_dir / artifacts.MODEL_FILE}", main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, core, metrics)


def _version() -> str:
    from vae_dist import __version__

    return __version__


# ---------------------------------------------------------------- command line

USER_ERRORS = (ConfigError, data.DataError, LaunchError, ResumeError, OSError)


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file, e.g. configs/conv.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. train.epochs=5.")
@click.option("--name", help="Run name (folder under run.output_dir); default <kind>-<date>-<time>.")
@click.option("--output-dir", help="Folder holding the runs (run.output_dir).")
@click.option("--resume", help="'auto' (latest checkpoint of the run --name, if any) or a run/checkpoint path.")
@click.option(
    "--cpu/--no-cpu", default=None,
    help="Force CPU (gloo between processes) or leave the choice to Accelerate; default: CPU when no GPU is present.",
)
def train_command(config_path, overrides, name, output_dir, resume, cpu):
    """Train a VAE (run under `accelerate launch` for several processes)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    try:
        if config_path is None and resume:
            config_path = _saved_config(resume, name, output_dir)
            if config_path is None:
                raise ResumeError(f"--resume {resume}: no run with a saved config.yaml there; check --name/--output-dir or pass --config")
        cfg = load_config(config_path, overrides)
        cfg.run.name = name or cfg.run.name
        cfg.run.output_dir = output_dir or cfg.run.output_dir
        if resume == "auto" and not cfg.run.name:
            raise ConfigError("--resume auto needs --name (the run to continue)")
        run_dir = train(cfg, resume=resume, cpu=cpu).run_dir
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if os.environ.get("RANK", "0") == "0":
        click.echo(str(run_dir))


def _saved_config(resume: str, name: str | None, output_dir: str | None) -> str | None:
    """A resumed run without --config continues with the configuration it was started with."""
    if resume == "auto":
        run_dir = Path(output_dir or "runs") / name if name else None
    else:
        path = Path(resume)
        run_dir = path.parent.parent if CHECKPOINT_RE.match(path.name) else path
    saved = run_dir / "config.yaml" if run_dir else None
    return str(saved) if saved and saved.is_file() else None


if __name__ == "__main__":
    train_command()
