"""`vae-dist train`: the command's options, the configuration they describe, and its one-line
errors and exit statuses. `accelerate launch vae_dist/train.py` runs this command on every process;
the loop it starts is vae_dist.training's."""

from __future__ import annotations

import logging
import os
import sys

import click

from vae_dist import launch, runs
from vae_dist.config import Config, load_config, shipped_config_names
from vae_dist.errors import UserError
from vae_dist.stopping import Stopped
from vae_dist.training import train


@click.command("train")
@click.option(
    "--config",
    "config_path",
    help=f"YAML file (e.g. configs/conv.yaml) or a shipped config name ({', '.join(shipped_config_names())}). "
    "Without it: the run's own config when resuming, else the built-in defaults (the linear 784-400-20 VAE, "
    "10 epochs).",
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
    try:
        if processes > 1:
            options = {"--config": config_path, "--name": name, "--output-dir": output_dir, "--resume": resume}
            sys.exit(launch.relaunch(processes, cpu, options, overrides))
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its INFO lines per checkpoint are noise here
        cfg = command_config(config_path, overrides, name, output_dir, resume)
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


def command_config(config_path, overrides, name, output_dir, resume) -> Config:
    """The configuration the command's options describe. A resumed run without --config continues
    with the configuration it was started with, in the folder where it was found."""
    target = None
    if config_path is None and resume:
        target = runs.find_run(resume, name, output_dir or load_config(None).run.output_dir)
        if target.saved_config is None:
            raise runs.ResumeError(
                f"--resume {resume}: no run with a saved config.yaml there; check --name/--output-dir or pass --config"
            )
        config_path = target.saved_config
    if config_path is None:
        logging.getLogger(__name__).info("no --config: training the built-in defaults (the linear 784-400-20 VAE)")
    cfg = load_config(config_path, overrides)
    cfg.run.name = name or cfg.run.name
    cfg.run.output_dir = output_dir or cfg.run.output_dir
    if target is not None:
        cfg.run.name, cfg.run.output_dir = target.run_dir.name, str(target.run_dir.parent)
    return cfg
