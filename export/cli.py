"""Click commands `export` and `verify`, meant to be added to the `vae-dist` group.

Exit status: 0 when everything exported/verified, 1 when a verification failed, 2 for a usage
problem (no such run, no data set, bad option, a disk too full to write the export), 130 when
interrupted. The fp32 files decide: an edge variant that is rejected or could not be made is
reported, and recorded in the manifest, but does not change it. See docs/export.md#exit-status.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from export.spec import DEFAULT_OPSET, ELBO_TOL, nats_for_image
from export.variants import QUALITY_BUDGET, VARIANTS, parse_names
from vae_dist import paths
from vae_dist.errors import UserError
from vae_dist.runs import locate

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def setup_logging() -> None:
    # Progress from this project only: the exporter's optimiser passes log every rewrite at INFO,
    # and onnxruntime's quantisers one line per tensor through the root logger.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    for name in ("export", "vae_dist"):
        logging.getLogger(name).setLevel(logging.INFO)


def newest_note(what: str, found: dict[str, Path], output_dir: Path) -> str:
    """The line a command without RUN prints: which runs it took, and how to choose another."""
    names = ", ".join(f"{run.name} ({kind})" for kind, run in found.items())
    return f"no RUN given: using the newest {what} of each model kind under {output_dir}/: {names}; give RUN to choose"


def _print_report(title: str, report, manifest: dict | None = None) -> None:
    for line in report.summary_lines():
        click.echo(f"  {line}")
    for line in report.failure_lines():
        click.echo(f"  FAIL {line}")
    variants = (manifest or {}).get("variants")
    if variants:
        budget, shape = manifest["quality_budget"], manifest["model"]["image_shape"]
        applied = f"{nats_for_image(budget, shape):.4g} nats for {'x'.join(map(str, shape))} images"
        click.echo(f"  variants (quality budget {budget:g} nats of test -ELBO per 784 pixels: {applied}):")
        for line in variant_lines(variants):
            click.echo(f"    {line}")
    # The verdict is the last line a user reads.
    click.echo(f"{title}: {'verified' if report.passed else 'verification FAILED'}")


def variant_lines(section: dict) -> list[str]:
    """One line per variant of a manifest's "variants" section."""
    lines = []
    for name, entry in section.items():
        q = entry.get("quality")
        sizes = ", ".join(f"{f} {r['size'] / 1e6:.2f} MB" for f, r in entry.get("files", {}).items() if "size" in r)
        cost = f"-ELBO {q['neg_elbo_change']:+.4f} nats, recon MSE {q['recon_mse_change']:+.2e}; " if q else ""
        lines.append(f"{name:<16} {entry['status']:<8}  {cost}{sizes}")
        lines += [f"    {reason}" for reason in entry.get("reasons", [])]
    return lines


def _variant_names(ctx, param, value: str):
    try:
        return parse_names(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


atol_option = click.option(
    "--atol",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Absolute tolerance for every output, onnxruntime vs torch [default: per sub-model, 1e-4].",
)
elbo_tol_option = click.option(
    "--elbo-tol",
    type=click.FloatRange(min=0, min_open=True),
    default=ELBO_TOL,
    show_default=True,
    help="Largest allowed |ONNX - torch| mean test -ELBO, in nats per 784 pixels (scaled by the image size).",
)
output_dir_option = click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=paths.runs_dir,
    show_default="$VAE_DIST_RUNS or runs",
    help="Folder of runs: searched when RUN is omitted, and for RUN given as a bare run name.",
)
quality_budget_option = click.option(
    "--quality-budget",
    type=click.FloatRange(min=0),
    default=None,
    help=f"Largest |change| of the mean test -ELBO (nats per 784 pixels, scaled by the image size) against "
    f"fp32 torch for an edge variant to be accepted; beyond it the variant is marked rejected "
    f"[default: {QUALITY_BUDGET}; for verify, the export's].",
)
data_root_option = click.option(
    "--data",
    "--data-root",
    "data_root",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the run's data set is: its IDX folder for a built-in set, or the prepared dataset's folder "
    "[default: the data folder and the system data set, or the folder the model file names].",
)


@click.command("export")
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option(
    "--opset",
    type=click.IntRange(min=7),
    default=DEFAULT_OPSET,
    show_default=True,
    help="ONNX opset (ai.onnx) of the written graphs; below 18 the exporter converts down, which can fail.",
)
@atol_option
@elbo_tol_option
@click.option(
    "--variants",
    "variant_names",
    default="all",
    show_default=True,
    callback=_variant_names,
    help=f"Edge variants to make beside the fp32 files: all, none, or a comma-separated list of {', '.join(VARIANTS)}.",
)
@quality_budget_option
@data_root_option
@output_dir_option
def export_command(run, opset, atol, elbo_tol, variant_names, quality_budget, data_root, output_dir):
    """Export RUN's encoder and decoder to RUN/onnx and verify them with onnxruntime; then make
    and judge the edge variants (fp16, int8, ORT format) beside them.

    Without RUN: the latest run of each model kind under --output-dir.
    """
    setup_logging()
    from export.pipeline import export_run, find_latest_runs
    from vae_dist.artifacts import ModelFileError
    from vae_dist.files import WriteError

    if run is not None:
        targets = [locate(run, output_dir)]
    else:
        latest = find_latest_runs(output_dir)
        if not latest:
            click.echo(f"error: no finished run under {output_dir}/; train one first (vae-dist train)", err=True)
            sys.exit(EXIT_USAGE)
        click.echo(newest_note("run", latest, output_dir), err=True)
        targets = list(latest.values())
    status = 0
    for target in targets:  # one bad run does not keep the others from being exported
        try:
            result = export_run(
                target,
                opset=opset,
                atol=atol,
                data_root=data_root,
                elbo_tol=elbo_tol,
                variants=variant_names,
                quality_budget=QUALITY_BUDGET if quality_budget is None else quality_budget,
            )
        except UserError as e:
            named = isinstance(e, (WriteError, ModelFileError))  # these name their file already
            click.echo(f"error: {e}" if named else f"error: {target}: {e}", err=True)
            status = max(status, EXIT_USAGE)
            continue
        except KeyboardInterrupt:
            click.echo(f"interrupted while exporting {target}; its previous export is untouched", err=True)
            sys.exit(EXIT_INTERRUPTED)
        _print_report(str(result.onnx_dir), result.report, result.manifest)
        if not result.verified:
            status = max(status, EXIT_FAILED)
    sys.exit(status)


@click.command("verify")
@click.argument("run", type=click.Path(path_type=Path))
@atol_option
@elbo_tol_option
@quality_budget_option
@data_root_option
@output_dir_option
def verify_command(run, atol, elbo_tol, quality_budget, data_root, output_dir):
    """Verify RUN/onnx against RUN's model file, and judge its edge variants again; the verdicts
    go into RUN/onnx/manifest.json."""
    setup_logging()
    from export.manifest import read_manifest
    from export.pipeline import verify_run

    try:
        report, onnx_dir = verify_run(
            locate(run, output_dir), atol=atol, data_root=data_root, elbo_tol=elbo_tol, quality_budget=quality_budget
        )
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:  # the manifest is replaced whole, so it is the old one or the new one
        click.echo(f"interrupted while verifying {run}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _print_report(str(onnx_dir), report, read_manifest(onnx_dir))
    sys.exit(0 if report.passed else EXIT_FAILED)
