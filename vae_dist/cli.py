"""The `vae-dist` command."""
from __future__ import annotations

import click

from vae_dist.train import train_command


@click.group()
@click.version_option(package_name="vae-dist")
def main():
    """Train VAEs with Accelerate and ship them as ONNX models."""


main.add_command(train_command)

if __name__ == "__main__":
    main()
