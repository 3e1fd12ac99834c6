"""The `vae-dist` command."""
from __future__ import annotations

import sys

import click

from export.cli import export_command, verify_command
from vae_dist import data
from vae_dist.train import train_command


@click.group()
@click.version_option(package_name="vae-dist")
def main():
    """Train VAEs with Accelerate and ship them as ONNX models."""


@main.command("data")
@click.option("--dataset", type=click.Choice(sorted(data.DATASETS)), default="fashion-mnist", show_default=True)
@click.option("--root", help="Folder to try first.")
@click.option("--download/--no-download", default=True, show_default=True, help="Fall back to torchvision's download.")
def data_command(dataset: str, root: str | None, download: bool):
    """Find the data set (or download it) and print the folder it is read from."""
    try:
        found = data.resolve(dataset, root, download=download)
        for train in (True, False):
            split = data.load_split(dataset, train, found)
            click.echo(f"{dataset} {'train' if train else 'test'}: {len(split)} images of {split.image_shape}", err=True)
    except data.DataError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(str(found))


main.add_command(train_command)
main.add_command(export_command)
main.add_command(verify_command)

if __name__ == "__main__":
    main()
