"""What the commands tell a user about themselves: whole descriptions in `vae-dist --help`, every
shipped config named, which runs a command without RUN took, the quality budget as applied."""

from __future__ import annotations

import re

import numpy as np
from click.testing import CliRunner

from helpers import cli, make_run
from vae_dist.config import shipped_config_names
from vae_dist.data import prepare


def test_the_command_list_shows_every_description_whole():
    from vae_dist.cli import COMMANDS

    out = CliRunner().invoke(cli(), ["--help"], terminal_width=200).output
    commands = out[out.index("Commands:") :]
    assert "..." not in commands
    for name, (_, description) in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(description)}$", out, re.M), name
    assert "Find the data set (or download it) and print the folder it is read from." in out


def test_train_help_names_every_shipped_config():
    out = CliRunner().invoke(cli(), ["train", "--help"], terminal_width=200).output
    assert "conv64" in shipped_config_names()
    assert f"shipped config name ({', '.join(shipped_config_names())})" in " ".join(out.split())


def test_export_without_run_says_which_runs_it_took_and_the_budget_it_applied(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8)
    dataset = prepare.from_arrays(tmp_path / "ds", images[:40], images[40:]).out
    make_run(tmp_path / "runs", "colour", "conv", shape=(3, 32, 32), dataset=str(dataset))
    result = CliRunner().invoke(cli(), ["export", "--output-dir", str(tmp_path / "runs"), "--variants", "fp16"])
    assert result.exit_code == 0, result.output
    assert (
        f"no RUN given: using the newest run of each model kind under {tmp_path / 'runs'}/: colour (conv); "
        "give RUN to choose"
    ) in result.output
    # 0.5 nats per 784 pixels, for 3x32x32 = 3072 pixels: 1.959 nats
    assert "quality budget 0.5 nats of test -ELBO per 784 pixels: 1.959 nats for 3x32x32 images" in result.output
