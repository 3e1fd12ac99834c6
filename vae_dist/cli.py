"""The `vae-dist` command. Sub-commands are imported when they run, so that `vae-dist data` does
not load the trainer and nothing here loads the export stack (onnx, onnxruntime)."""

from __future__ import annotations

import importlib
import sys

import click

from vae_dist.data import builtin

# name -> ("module:attribute" of a click command, its line in `vae-dist --help`)
COMMANDS = {
    "prepare": ("vae_dist.data.prepare:prepare_command", "Make a dataset to train on from a folder of images."),
    "train": ("vae_dist.train_command:train_command", "Train a VAE (under `accelerate launch` for several processes)."),
    "evaluate": (
        "vae_dist.evaluate:evaluate_command",
        "Estimate log p(x) of a trained run by importance sampling (IWAE bound).",
    ),
    "runs": ("vae_dist.listing:runs_command", "List the runs in a folder: data, epochs, -ELBO, NLL, export."),
    "export": ("export.cli:export_command", "Export runs to ONNX, verify them with onnxruntime, make edge variants."),
    "verify": ("export.cli:verify_command", "Verify an existing export again."),
    "web": ("export.web:web_command", "Build (and serve) a static site that runs an export in the browser."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module, _, attr = COMMANDS[name][0].partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as e:
                if e.name and e.name.split(".")[0] in ("vae_dist", "export"):
                    raise  # a broken install of this package: keep the traceback
                raise click.UsageError(
                    f"`vae-dist {name}` needs {e.name}, which is not installed here "
                    "(pip install -e . installs every dependency)"
                ) from None
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [
            (name, COMMANDS[name][1] if name in COMMANDS else self.get_command(ctx, name).get_short_help_str(limit=200))
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="vae-dist")
def main():
    """Train VAEs with Accelerate and ship them as ONNX models."""


@main.command("data")
@click.option("--dataset", type=click.Choice(builtin.NAMES), default="fashion-mnist", show_default=True)
@click.option("--root", help="Your own folder of IDX files: read in place, never copied; refused without them.")
@click.option("--download/--no-download", default=True, show_default=True, help="Fall back to torchvision's download.")
@click.option("--test-images", is_flag=True, help="Print the test split's IDX image file instead of the folder.")
def data_command(dataset: str, root: str | None, download: bool, test_images: bool):
    """Find the data set (or download it) and print the folder it is read from."""
    try:
        found = builtin.resolve(dataset, root, download=download, given_as="--root")
        for train in (True, False):
            images = builtin.read_images(dataset, train, found)
            click.echo(
                f"{dataset} {'train' if train else 'test'}: {len(images)} images of {images.shape[1:]}", err=True
            )
    except builtin.DataError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(str(builtin.images_file(dataset, False, found) if test_images else found))


if __name__ == "__main__":
    main()
