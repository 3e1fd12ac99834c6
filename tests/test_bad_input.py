"""Bad input to every command, one table row per mistake: the real command, in its own tmp folder
(VAE_DIST_RUNS=tmp/runs, VAE_DIST_DATA the real data), refuses it with one line and no traceback,
leaves the files it was given as they were, and creates nothing it should not.

To add a case, append a `Case` to CASES: an id, the command (`sh("vae-dist ...")` or
`sh("python -m ...")`), its exit status and a phrase of its error line are required; the fields
below them (commented in `Case`) say what to set up and what must not change. What is promised:
docs/guarantees.md.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    VAE_DIST,
    env,
    file_hashes,
    full_disk,
    make_run,
    set_options,
    shift_initializer,
    tiny_overrides,
    write_idx_set,
)
from helpers import run as run_command

# A tiny real run: 4 steps of 64 images, checkpoints at steps 2 and 4, a few seconds.
TINY = shlex.join(
    set_options(
        tiny_overrides(
            hidden_dims=[32], latent_dim=4, checkpoint_every=2, eval_batch_size=64, grid_images=2, grid_samples=4
        )
    )
)
TRAINED, EXPORTED = "runs/tiny", "runs/exp"  # where `start` puts the module's runs
NEWEST = f"{TRAINED}/checkpoints/step-00000004"  # the trained run's latest checkpoint
RESUME = f"vae-dist train --config linear --name tiny --resume auto {TINY} --set train.epochs=2"

# How each tool's one error line starts.
ERROR = r"error: "  # vae-dist's own errors
ARGPARSE = r"sample\.py( \w+)?: error: "  # the sampler: argparse names the program (and mode) first
CLICK = r"Error: "  # click's option checks, after its "Usage:" lines
VERDICT = r"\S+: verification FAILED$"  # verify's last stdout line; the FAIL lines above it say why

def sh(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def nothing(tmp: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # run with cwd = the case's tmp folder; "vae-dist" and "python" are this venv's
    status: int  # the expected exit status
    phrase: str  # in the error line (for status 0: in exactly one line of the output)
    start: str = ""  # "trained" (a 1-epoch run with checkpoints, TRAINED) or "exported" (EXPORTED): copied in
    setup: Callable[[Path], object] = nothing  # then writes or damages files under tmp
    unchanged: tuple[str, ...] = ()  # globs under tmp; each matches a file, and the matches keep their sha256
    absent: tuple[str, ...] = ()  # globs under tmp that match nothing, before and after
    line: str = ERROR  # what the error line starts with (a regex); it is the last line of `stream`
    stream: str = "stderr"
    detail: str = ""  # also in exactly one line of the output, e.g. one of verify's FAIL lines
    then: Callable[[Path], object] | None = None  # further checks of tmp afterwards
    slow: bool = True  # False for a handful of quick rows that `make test-fast` keeps
    disk: int = 0  # > 0: runs/ has only about this many bytes of room left (helpers.full_disk)


# ---------------------------------------------------------------- what the rows set up


def writes(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def removes(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return setup


def tiny_model(
    name: str, damage: Callable[[Path], None] = lambda path: None, kind: str = "linear", **run
) -> Callable[[Path], None]:
    """A finished run holding only a tiny model file (helpers.make_run with `run`), then `damage`d."""

    def setup(tmp: Path) -> None:
        damage(make_run(tmp / "runs", name, kind, **run) / "model.safetensors")

    return setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unknown_kind(path: Path) -> None:
    """The same weights, with metadata that names a model kind vae-dist does not know."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = json.loads(meta["model"])
    meta["model"] = json.dumps({**model, "kind": "rnn"}, sort_keys=True)
    save_file(load_file(str(path)), str(path), metadata=meta)


def swap_roles(tmp: Path) -> None:
    onnx_dir = tmp / EXPORTED / "onnx"
    enc, dec = onnx_dir / "encoder.onnx", onnx_dir / "decoder.onnx"
    held = enc.read_bytes()
    enc.write_bytes(dec.read_bytes())
    dec.write_bytes(held)


def tamper_decoder(tmp: Path) -> None:
    """A valid decoder that computes something else: its first bias shifted by 0.5."""
    path = tmp / EXPORTED / "onnx" / "decoder.onnx"
    shift_initializer(path, lambda model: next(t for t in model.graph.initializer if len(t.dims) == 1), 0.5)


def png(name: str, height: int, width: int) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from PIL import Image

        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((height, width), np.uint8)).save(tmp / name)

    return setup


def idx_set(folder: str, train_shape=(6, 28, 28), test_shape=(4, 28, 28)) -> Callable[[Path], None]:
    """The four Fashion-MNIST IDX files, flat in `folder`, with black images of the shapes given."""

    def setup(tmp: Path) -> None:
        write_idx_set(tmp / folder, np.zeros(train_shape, np.uint8), np.zeros(test_shape, np.uint8))

    return setup


def prepared(folder: str, shape=(1, 28, 28), damage: Callable[[Path], object] = lambda folder: None):
    """A prepared dataset of random images of `shape` (8 train, 4 test) at `folder`, then `damage`d."""

    def setup(tmp: Path) -> None:
        from vae_dist.data import prepare

        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
        prepare.from_arrays(tmp / folder, images[:8], images[8:])
        damage(tmp / folder)

    return setup


def colour_model_and_grey_data(tmp: Path) -> None:
    """A 3x64x64 model at runs/colour, and a prepared dataset of 1x28x28 images at grey."""
    tiny_model("colour", shape=(3, 64, 64), kind="conv", dataset="emoji")(tmp)
    prepared("grey")(tmp)


def distinct_pngs(folder: str, count: int) -> Callable[[Path], None]:
    """`count` 4x4 grey PNGs, each of its own shade, in `folder`."""

    def setup(tmp: Path) -> None:
        from PIL import Image

        (tmp / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp / folder / f"{i}.png")

    return setup


def rewrite_record(path: Path, **changes) -> None:
    """The model file's record with `changes`, written as a damaged or foreign file would hold them."""
    from safetensors.torch import load_file, save_file

    from vae_dist import record

    meta = record.read(path).to_metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, **{k: json.dumps(v) for k, v in changes.items()}})


def edit_info(folder: Path, **changes) -> None:
    """dataset.json with `changes`."""
    info = json.loads((folder / "dataset.json").read_text())
    info.update(changes)
    (folder / "dataset.json").write_text(json.dumps(info))


def edit_counts(folder: Path) -> None:
    """dataset.json says the training split has one image more than train.npy holds."""
    info = json.loads((folder / "dataset.json").read_text())
    info["counts"]["train"] += 1
    (folder / "dataset.json").write_text(json.dumps(info))


def edits_state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """The newest checkpoint's trainer_state.json, changed by `change`."""

    def setup(tmp: Path) -> None:
        path = tmp / NEWEST / "trainer_state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))

    return setup


def moves_run_elsewhere(tmp: Path) -> None:
    """The run's config.yaml names the folder it was first written in, not where it is now."""
    path = tmp / TRAINED / "config.yaml"
    path.write_text(re.sub(r"output_dir: .*", "output_dir: elsewhere/runs", path.read_text()))


def continued(tmp: Path, checkpoint: str) -> None:
    assert (tmp / TRAINED / "checkpoints" / checkpoint).is_dir(), "the run was not continued where it is"


def _data_folder_listing() -> dict[str, list[int]]:
    from vae_dist import paths

    folder = paths.data_dir().resolve()
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*")) if p.is_file()}


def with_data_folder_listed(setup: Callable[[Path], None]) -> Callable[[Path], None]:
    """`setup`, then a listing of the shared data folder for `data_folder_unchanged`."""

    def both(tmp: Path) -> None:
        setup(tmp)
        (tmp / "data-folder.json").write_text(json.dumps(_data_folder_listing()))

    return both


def data_folder_unchanged(tmp: Path) -> None:
    """Nothing of a user's root was copied into the shared data folder, nor anything changed there."""
    assert _data_folder_listing() == json.loads((tmp / "data-folder.json").read_text())


def absent_outside(path: Path) -> None:
    assert not path.exists(), f"{path} was created"


def manifest_says_verified(value: bool) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        manifest = json.loads((tmp / EXPORTED / "onnx" / "manifest.json").read_text())
        assert isinstance(manifest, dict) and manifest["verified"] is value

    return check


# The named files must exist; "**/*" also catches any file added, removed or changed in the run.
RUN_FILES = (f"{TRAINED}/config.yaml", f"{TRAINED}/metrics.jsonl", f"{TRAINED}/images/*", f"{TRAINED}/**/*")
TRAINED_RUN = (f"{TRAINED}/model.safetensors", *RUN_FILES)
EXPORT_FILES = (f"{EXPORTED}/model.safetensors", f"{EXPORTED}/onnx/*.onnx")
NO_EXPORT = ("runs/*/onnx", "runs/*/onnx-failed", "runs/*/.onnx.partial-*")

# ---------------------------------------------------------------- the table

CASES = [
    # -- configuration: refused before anything is written
    Case(
        "unknown-config-key",
        sh("vae-dist train --config linear --name x --set train.learning_rate=0.1"),
        2,
        "unknown config key 'train.learning_rate'",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "wrong-value-type",
        sh("vae-dist train --config bad.yaml --name x"),
        2,
        "train.epochs: expected int, got 'five'",
        setup=writes("bad.yaml", "model:\n  kind: linear\ntrain:\n  epochs: five\n"),
        unchanged=("bad.yaml",),
        absent=("runs",),
    ),
    Case(
        "nan-value",
        sh("vae-dist train --config linear --name x --set train.lr=nan"),
        2,
        "train.lr must be a finite number > 0, got nan",
        absent=("runs",),
    ),
    Case(
        "config-not-text",
        sh("vae-dist train --config bin.yaml --name x"),
        2,
        "config file 'bin.yaml' is not text",
        setup=writes("bin.yaml", bytes(range(256)) * 4),
        unchanged=("bin.yaml",),
        absent=("runs",),
    ),
    Case(
        "empty-config",
        sh("vae-dist train --config empty.yaml --name x"),
        2,
        "config file 'empty.yaml' is empty",
        setup=writes("empty.yaml", ""),
        unchanged=("empty.yaml",),
        absent=("runs",),
        slow=False,
    ),
    Case(
        "missing-config",
        sh("vae-dist train --config nope.yaml --name x"),
        2,
        "config file 'nope.yaml' not found",
        absent=("runs", "nope.yaml"),
    ),
    Case(
        "name-parent",
        sh("vae-dist train --config linear --name ../x"),
        2,
        "run name '../x' is not a plain folder name",
        absent=("runs", "x"),
        slow=False,
    ),
    Case(
        "unknown-likelihood",
        sh("vae-dist train --config linear --name x --set loss.likelihood=poisson"),
        2,
        "loss.likelihood: 'poisson' is not one of bernoulli, gaussian, dlm",
        absent=("runs",),
    ),
    Case(
        "dlm-no-mixture",
        sh("vae-dist train --config linear --name x --set loss.likelihood=dlm --set loss.mixtures=0"),
        2,
        "loss.mixtures must be a finite number > 0, got 0",
        absent=("runs",),
    ),
    Case(
        "layout-does-not-parse",
        sh("vae-dist train --config hierarchical --name x --set model.encoder_blocks=28x2,14y2"),
        2,
        "model.encoder_blocks: '14y2' in '28x2,14y2' is not RESOLUTIONxBLOCKS",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "layout-no-latent-group",
        sh("vae-dist train --config hierarchical --name x --set model.decoder_blocks="),
        2,
        "model.decoder_blocks is empty: give at least one RESOLUTIONxBLOCKS entry",
        absent=("runs",),
    ),
    Case(
        "layout-resolutions-do-not-divide",
        sh("vae-dist train --config hierarchical --name x --set model.encoder_blocks=28x1,8x1,1x1"),
        2,
        "model.encoder_blocks: resolution 8 does not divide resolution 28 above it",
        absent=("runs",),
    ),
    Case(
        "layout-not-the-image-size",
        sh(f"vae-dist train --config hierarchical --name x {TINY} --set model.encoder_blocks=32x1,16x1,1x1 "
           "--set model.decoder_blocks=1x1,16x1,32x1"),
        2,
        "model.encoder_blocks starts at resolution 32, but the images are 28 pixels high: make it 28",
        absent=("runs/x",),
    ),
    Case(
        "temperature-0",
        sh("vae-dist train --config hierarchical --name x --set train.grid_temperatures=[1.0,0]"),
        2,
        "train.grid_temperatures: every temperature must be a number > 0",
        absent=("runs",),
    ),
    Case(
        "name-absolute",
        sh("vae-dist train --config linear --name /abs"),
        2,
        "run name '/abs' is not a plain folder name",
        absent=("runs",),
        then=lambda tmp: absent_outside(Path("/abs")),
    ),
    Case(
        "name-dot",
        sh("vae-dist train --config linear --name ."),
        2,
        "run name '.' is not a plain folder name",
        absent=("runs",),
    ),
    Case(
        "resume-auto-without-name",
        sh("vae-dist train --config linear --resume auto"),
        2,
        "--resume auto needs --name",
        absent=("runs",),
    ),
    # -- an existing run: never started again, never continued with another configuration
    Case(
        "resume-without-checkpoints",
        sh(f"vae-dist train --config linear --name tiny --resume auto {TINY}"),
        2,
        "no checkpoint to resume from",
        start="trained",
        setup=removes(f"{TRAINED}/checkpoints"),
        unchanged=TRAINED_RUN,
        absent=(f"{TRAINED}/checkpoints",),
    ),
    Case(
        "new-run-into-existing-run",
        sh(f"vae-dist train --config linear --name tiny {TINY}"),
        2,
        f"{TRAINED} already holds a run; pass --resume auto",
        start="trained",
        unchanged=TRAINED_RUN,
    ),
    Case(
        "resume-with-other-config",
        sh(f"vae-dist train --config linear --name tiny --resume auto {TINY} --set train.lr=0.01"),
        2,
        "with a different configuration: train.lr (0.001 -> 0.01)",
        start="trained",
        unchanged=TRAINED_RUN,
    ),
    Case(
        "finished-run-resumed",
        sh("vae-dist train --name tiny --resume auto"),
        0,
        "is finished (1 epochs); nothing to do",
        start="trained",
        unchanged=("runs/**/*",),
    ),
    Case(
        "resume-run-config-not-yaml",
        sh(f"vae-dist train --config linear --name tiny --resume auto {TINY} --set train.epochs=2"),
        2,
        f"{TRAINED}/config.yaml cannot be read",
        start="trained",
        setup=writes(f"{TRAINED}/config.yaml", "model: [kind: linear\n"),
        unchanged=TRAINED_RUN,
    ),
    Case(
        "resume-run-config-not-text",
        sh("vae-dist train --name tiny --resume auto --set train.epochs=2"),
        2,
        f"{TRAINED}/config.yaml' is not text",
        start="trained",
        setup=writes(f"{TRAINED}/config.yaml", bytes(range(256))),
        unchanged=TRAINED_RUN,
    ),
    Case(  # resumed where it is now, not where its config.yaml says it was first written
        "resume-moved-run",
        sh("vae-dist train --name tiny --resume auto --set train.epochs=2"),
        0,
        "resumed from",
        start="trained",
        setup=moves_run_elsewhere,
        absent=("elsewhere",),
        then=lambda tmp: continued(tmp, "step-00000008"),
    ),
    # -- a damaged checkpoint: refused, with the way to the earlier one
    Case(
        "checkpoint-state-not-json",
        sh(RESUME),
        2,
        "trainer_state.json cannot be read",
        start="trained",
        setup=writes(f"{NEWEST}/trainer_state.json", "{broken"),
        unchanged=TRAINED_RUN,
        detail="to resume from step-00000002",
    ),
    Case(
        "checkpoint-state-extra-key",
        sh(RESUME),
        2,
        "trainer_state.json has unknown field(s) lr",
        start="trained",
        setup=edits_state(lambda state: state.update(lr=0.1)),
        unchanged=TRAINED_RUN,
    ),
    Case(
        "checkpoint-state-negative",
        sh(RESUME),
        2,
        "trainer_state.json has global_step=-4",
        start="trained",
        setup=edits_state(lambda state: state.update(global_step=-4)),
        unchanged=TRAINED_RUN,
    ),
    Case(
        "checkpoint-model-truncated",
        sh(RESUME),
        2,
        "model.safetensors cannot be read",
        start="trained",
        setup=lambda tmp: truncate(tmp / NEWEST / "model.safetensors"),
        unchanged=TRAINED_RUN,
    ),
    Case(
        "checkpoint-model-missing",
        sh(RESUME),
        2,
        "damaged: model.safetensors is missing",
        start="trained",
        setup=removes(f"{NEWEST}/model.safetensors"),
        unchanged=TRAINED_RUN,
    ),
    Case(
        "checkpoint-optimizer-truncated",
        sh(RESUME),
        2,
        "damaged: it cannot be loaded (PytorchStreamReader failed reading zip archive",
        start="trained",
        setup=lambda tmp: truncate(tmp / NEWEST / "optimizer.bin"),
        unchanged=TRAINED_RUN,
    ),
    # -- a full disk while training: one line, the partial checkpoint removed, the rest kept
    Case(
        "train-disk-full",
        sh(RESUME),
        2,
        "nothing the run wrote before is lost (the run's latest checkpoint is step-00000004)",
        start="trained",
        unchanged=(f"{NEWEST}/*", f"{TRAINED}/model.safetensors", f"{TRAINED}/checkpoints/step-00000002/*"),
        absent=(f"{TRAINED}/checkpoints/.tmp-*", f"{TRAINED}/**/*.tmp"),
        detail="--resume auto",
        disk=100_000,
    ),
    # -- data: a root given is used or refused; the shared data folder is never changed
    Case(
        "data-root-without-files",
        sh("vae-dist train --config linear --name x --set data.root=mine"),
        2,
        "data.root mine does not hold the Fashion-MNIST IDX files",
        setup=with_data_folder_listed(lambda tmp: (tmp / "mine").mkdir()),
        absent=("runs",),
        then=data_folder_unchanged,
    ),
    Case(
        "data-root-shapes-differ",
        sh("vae-dist train --config linear --name x --set data.root=mine"),
        2,
        "the training images are (1, 28, 28) but the test images are (1, 32, 32)",
        setup=idx_set("mine", test_shape=(4, 32, 32)),
        unchanged=("mine/*",),
        absent=("runs",),
    ),
    Case(
        "data-root-one-dimensional",
        sh("vae-dist train --config linear --name x --set data.root=mine"),
        2,
        "holds an array of shape (6,), not images",
        setup=idx_set("mine", train_shape=(6,)),
        unchanged=("mine/*",),
        absent=("runs",),
    ),
    Case(
        "data-command-root-without-files",
        sh("vae-dist data --root mine"),
        2,
        "--root mine does not hold the Fashion-MNIST IDX files",
        setup=with_data_folder_listed(lambda tmp: (tmp / "mine").mkdir()),
        then=data_folder_unchanged,
        slow=False,
    ),
    Case(
        "data-root-used-in-place",
        sh("vae-dist data --root mine"),
        0,
        "fashion-mnist test: 4 images of (1, 28, 28)",
        setup=with_data_folder_listed(idx_set("mine")),
        unchanged=("mine/*",),
        then=data_folder_unchanged,
    ),
    # -- data.path: a prepared dataset is checked against its dataset.json before anything is written
    Case(
        "data-path-not-prepared",
        sh("vae-dist train --config linear --name x --set data.path=pictures"),
        2,
        "pictures is not a prepared dataset (no dataset.json); make one with `vae-dist prepare`",
        setup=png("pictures/a.png", 28, 28),
        unchanged=("pictures/a.png",),
        absent=("runs",),
        slow=False,
    ),
    Case(
        "data-path-truncated-array",
        sh("vae-dist train --config linear --name x --set data.path=set"),
        2,
        "set/train.npy cannot be read",
        setup=prepared("set", damage=lambda folder: truncate(folder / "train.npy")),
        unchanged=("set/*",),
        absent=("runs",),
    ),
    Case(
        "data-path-description-disagrees",
        sh("vae-dist train --config linear --name x --set data.path=set"),
        2,
        "set/train.npy holds uint8 (8, 1, 28, 28) but dataset.json says uint8 (9, 1, 28, 28)",
        setup=prepared("set", damage=edit_counts),
        unchanged=("set/*",),
        absent=("runs",),
    ),
    Case(
        "export-data-of-another-shape",
        sh("vae-dist export runs/colour --data grey --variants none"),
        2,
        "test images are (1, 28, 28), the model expects (3, 64, 64)",
        setup=colour_model_and_grey_data,
        unchanged=("runs/colour/model.safetensors", "grey/*"),
        absent=NO_EXPORT,
    ),
    Case(
        "export-data-without-files",
        sh("vae-dist export runs/tiny --data mine --variants none"),
        2,
        "--data mine does not hold the Fashion-MNIST IDX files",
        setup=lambda tmp: (tiny_model("tiny")(tmp), (tmp / "mine").mkdir()),
        unchanged=("runs/tiny/model.safetensors",),
        absent=NO_EXPORT,
    ),
    # -- vae-dist evaluate: refused before any work (a failed append: tests/test_evaluate.py)
    Case(
        "evaluate-without-model",
        sh("vae-dist evaluate runs/empty --k 2"),
        2,
        "runs/empty holds no model.safetensors; train the run to its end first",
        setup=lambda tmp: (tmp / "runs" / "empty").mkdir(parents=True),
        absent=("runs/empty/*",),
        slow=False,
    ),
    Case(
        "evaluate-k-0",
        sh("vae-dist evaluate runs/tiny --k 0"),
        2,
        "Invalid value for '--k': 0 is not in the range x>=1",
        setup=tiny_model("tiny"),
        unchanged=("runs/tiny/**/*",),
        absent=("runs/tiny/eval.jsonl",),
        line=CLICK,
        slow=False,
    ),
    Case(
        "evaluate-data-of-another-shape",
        sh("vae-dist evaluate runs/colour --data grey --k 2"),
        2,
        "grey test images are (1, 28, 28), the model expects (3, 64, 64)",
        setup=colour_model_and_grey_data,
        unchanged=("runs/colour/model.safetensors", "grey/*"),
        absent=("runs/colour/eval.jsonl",),
    ),
    Case(
        "evaluate-dataset-gone",
        sh("vae-dist evaluate runs/moved --k 2"),
        2,
        "is not one (no dataset.json); give the dataset's folder with --data DIR",
        setup=tiny_model("moved", dataset="gone/emoji"),
        unchanged=("runs/moved/model.safetensors",),
        absent=("runs/moved/eval.jsonl", "gone"),
    ),
    # -- the training benchmark's options
    Case(
        "bench-batch-size-0",
        sh("python -m vae_dist.bench --batch-size 0"),
        2,
        "Invalid value for '--batch-size': 0 is not in the range x>=1",
        setup=writes("bench/train.json", '{"models": []}\n'),
        unchanged=("bench/train.json",),
        line=CLICK,
    ),
    Case(
        "bench-seconds-0",
        sh("python -m vae_dist.bench --seconds 0"),
        2,
        "Invalid value for '--seconds': 0.0 is not in the range x>0",
        setup=writes("bench/train.json", '{"models": []}\n'),
        unchanged=("bench/train.json",),
        line=CLICK,
    ),
    # -- export of a run whose model file is missing or damaged: nothing exported
    Case(
        "export-without-model-file",
        sh(f"vae-dist export {TRAINED} --variants none"),
        2,
        f"{TRAINED} holds no model.safetensors",
        start="trained",
        setup=removes(f"{TRAINED}/model.safetensors"),
        unchanged=RUN_FILES,
        absent=(f"{TRAINED}/model.safetensors", *NO_EXPORT),
    ),
    Case(
        "export-truncated-model",
        sh("vae-dist export runs/m --variants none"),
        2,
        "runs/m/model.safetensors cannot be read as a safetensors file",
        setup=tiny_model("m", truncate),
        unchanged=("runs/m/**/*",),
        absent=NO_EXPORT,
    ),
    Case(
        "export-unknown-model-kind",
        sh("vae-dist export runs/m --variants none"),
        2,
        "describes a model of kind 'rnn'; this vae-dist knows linear, conv, hierarchical",
        setup=tiny_model("m", unknown_kind),
        unchanged=("runs/m/**/*",),
        absent=NO_EXPORT,
    ),
    Case(
        "export-hierarchical",
        sh("vae-dist export runs/deep --variants none"),
        2,
        "runs/deep/model.safetensors is a model.kind hierarchical model, which the ONNX export does not carry yet",
        setup=tiny_model("deep", kind="hierarchical"),
        unchanged=("runs/deep/**/*",),
        absent=NO_EXPORT,
        slow=False,
    ),
    Case(
        "export-dlm",
        sh("vae-dist export runs/m --variants none"),
        2,
        "is a loss.likelihood dlm model, which the ONNX export does not carry yet",
        setup=tiny_model("m", likelihood="dlm"),
        unchanged=("runs/m/**/*",),
        absent=NO_EXPORT,
    ),
    # -- an export folder that is not what was verified: verify fails it (exit 1, the manifest says
    #    so), the sampler refuses it (exit 1: the export is there, its manifest does not vouch for it)
    Case(
        "verify-swapped-roles",
        sh(f"vae-dist verify {EXPORTED}"),
        1,
        "verification FAILED",
        start="exported",
        setup=swap_roles,
        unchanged=EXPORT_FILES,
        line=VERDICT,
        stream="stdout",
        detail="encoder.onnx: metadata: role='decoder' (expected 'encoder')",
        then=manifest_says_verified(False),
    ),
    Case(
        "sample-swapped-roles",
        sh(f"python -m export.sample sample --model-dir {EXPORTED} -n 4 --out out.png"),
        1,
        "decoder.onnx is not the file that was verified",
        start="exported",
        setup=swap_roles,
        unchanged=(f"{EXPORTED}/**/*",),
        absent=("out.png",),
        line=ARGPARSE,
    ),
    Case(
        "verify-tampered-onnx",
        sh(f"vae-dist verify {EXPORTED}"),
        1,
        "verification FAILED",
        start="exported",
        setup=tamper_decoder,
        unchanged=EXPORT_FILES,
        line=VERDICT,
        stream="stdout",
        detail="FAIL decoder.onnx: output 'x_mean' max abs diff",
        then=manifest_says_verified(False),
    ),
    Case(
        "sample-tampered-onnx",
        sh(f"python -m export.sample sample --model-dir {EXPORTED} -n 4 --out out.png"),
        1,
        "decoder.onnx is not the file that was verified",
        start="exported",
        setup=tamper_decoder,
        unchanged=(f"{EXPORTED}/**/*",),
        absent=("out.png",),
        line=ARGPARSE,
    ),
    Case(  # verify writes a new manifest, after one warning line
        "verify-manifest-not-an-object",
        sh(f"vae-dist verify {EXPORTED}"),
        0,
        "manifest.json is not a manifest (a JSON object)",
        start="exported",
        setup=writes(f"{EXPORTED}/onnx/manifest.json", "[1, 2, 3]\n"),
        unchanged=EXPORT_FILES,
        then=manifest_says_verified(True),
    ),
    Case(
        "sample-manifest-not-an-object",
        sh(f"python -m export.sample sample --model-dir {EXPORTED} -n 4 --out out.png"),
        1,
        "manifest.json is not a manifest (a JSON object)",
        start="exported",
        setup=writes(f"{EXPORTED}/onnx/manifest.json", "[1, 2, 3]\n"),
        unchanged=(f"{EXPORTED}/**/*",),
        absent=("out.png",),
        line=ARGPARSE,
    ),
    # -- the sampler's usage mistakes: exit 2, as vae-dist's
    Case(
        "sample-n-0",
        sh("python -m export.sample sample -n 0 --out out.png"),
        2,
        "argument -n/--num: must be at least 1, got 0",
        absent=("out.png",),
        line=ARGPARSE,
        slow=False,
    ),
    Case(
        "sample-png-wrong-size",
        sh(f"python -m export.sample reconstruct --model-dir {EXPORTED} big.png --out out.png"),
        2,
        "big.png is 32x32 pixels; the model takes 28x28",
        start="exported",
        setup=png("big.png", 32, 32),
        unchanged=("big.png", f"{EXPORTED}/**/*"),
        absent=("out.png",),
        line=ARGPARSE,
    ),
    Case(
        "reconstruct-undecodable-file",
        sh(f"python -m export.sample reconstruct --model-dir {EXPORTED} broken.png --out out.png"),
        2,
        "broken.png is not a readable image",
        start="exported",
        setup=writes("broken.png", "not an image\n"),
        unchanged=("broken.png", f"{EXPORTED}/**/*"),
        absent=("out.png",),
        line=ARGPARSE,
    ),
    Case(
        "sample-missing-file",
        sh("python -m export.sample sample --decoder nope.onnx --out out.png"),
        2,
        "nope.onnx: no such file",
        absent=("out.png", "nope.onnx"),
        line=ARGPARSE,
        slow=False,
    ),
    Case(
        "sample-run-without-export",
        sh("python -m export.sample sample --model-dir runs/plain --out out.png"),
        2,
        "runs/plain holds no verified export (no manifest.json); export the run first",
        setup=tiny_model("plain"),
        unchanged=("runs/plain/**/*",),
        absent=("out.png", "runs/plain/onnx"),
        line=ARGPARSE,
        slow=False,
    ),
    # -- an output replaces only what its command wrote
    Case(
        "sample-out-over-a-model-file",
        sh("python -m export.sample sample --model-dir runs/m --out runs/m/model.safetensors"),
        2,
        "--out runs/m/model.safetensors exists and is not a PNG",
        setup=tiny_model("m"),
        unchanged=("runs/m/**/*",),
        line=ARGPARSE,
        slow=False,
    ),
    Case(
        "sample-out-a-folder",
        sh("python -m export.sample sample --model-dir runs/m --out runs/m"),
        2,
        "--out runs/m is a folder",
        setup=tiny_model("m"),
        unchanged=("runs/m/**/*",),
        line=ARGPARSE,
        slow=False,
    ),
    Case(
        "bench-json-over-a-model-file",
        sh("python -m vae_dist.bench --runs 0 --json runs/m/model.safetensors"),
        2,
        "runs/m/model.safetensors exists and is not a vae-dist-bench-train/2 result",
        setup=tiny_model("m"),
        unchanged=("runs/m/**/*",),
        slow=False,
    ),
    Case(
        "export-over-a-folder-that-is-not-an-export",
        sh("vae-dist export runs/m --variants none"),
        2,
        "runs/m/onnx exists and is not an export (no manifest.json); move it away first",
        setup=lambda tmp: (tiny_model("m")(tmp), writes("runs/m/onnx/notes.txt", "mine\n")(tmp)),
        unchanged=("runs/m/**/*",),
    ),
    # -- values that would fail late or not at all, refused before anything runs
    Case(
        "seed-too-large",
        sh("vae-dist train --config linear --name x --set train.seed=4294967296"),
        2,
        "train.seed must be at most 4294967295, got 4294967296",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "grid-samples-too-many",
        sh("vae-dist train --config linear --name x --set train.grid_samples=100000000"),
        2,
        "train.grid_samples must be at most 4096, got 100000000",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "model-file-test-images-negative",
        sh("vae-dist export runs/m --variants none"),
        2,
        "has damaged metadata (test_images=-3)",
        setup=tiny_model("m", lambda path: rewrite_record(path, test_images=-3)),
        unchanged=("runs/m/**/*",),
        absent=NO_EXPORT,
    ),
    Case(
        "dataset-fit-size-zero",
        sh("vae-dist train --config linear --name x --set data.path=ds"),
        2,
        "ds/dataset.json has a damaged fit (size [0, 0] is not two whole numbers from 1 to 65535)",
        setup=prepared("ds", damage=lambda folder: edit_info(folder, fit={"size": [0, 0], "channels": 1,
                                                                           "fit": "crop", "background": 255})),
        unchanged=("ds/*",),
        absent=("runs/x",),
    ),
    Case(
        "train-array-is-dev-zero",
        sh("vae-dist train --config linear --name x --set data.path=ds"),
        2,
        "ds/train.npy is not a regular file; prepare the dataset again",
        setup=prepared("ds", damage=lambda folder: ((folder / "train.npy").unlink(),
                                                    (folder / "train.npy").symlink_to("/dev/zero"))),
        absent=("runs/x",),
    ),
    Case(
        "train-array-outside-the-dataset",
        sh("vae-dist train --config linear --name x --set data.path=ds"),
        2,
        "ds/train.npy leads outside ds",
        setup=prepared("ds", damage=lambda folder: (
            (folder / "train.npy").rename(folder.parent / "elsewhere.npy"),
            (folder / "train.npy").symlink_to(folder.parent / "elsewhere.npy"),
        )),
        absent=("runs/x",),
    ),
    # -- run names
    Case(
        "name-too-long",
        sh(f"vae-dist train --config linear --name {'a' * 300}"),
        2,
        "run name of 300 bytes is too long; use at most 200",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "name-with-a-newline",
        ("vae-dist", "train", "--config", "linear", "--name", "a\nb"),
        2,
        "run name 'a\\nb' is not a plain folder name",
        absent=("runs",),
        slow=False,
    ),
    Case(
        "name-starting-with-a-dash",
        sh("vae-dist train --config linear --name=-x"),
        2,
        "run name '-x' is not a plain folder name",
        absent=("runs",),
        slow=False,
    ),
    # -- the sampler's bounds
    *(
        Case(
            f"sample-{option.strip('-')}-out-of-bounds",
            sh(f"python -m export.sample sample {option} {value} --out o.png"),
            2,
            says,
            absent=("o.png",),
            line=ARGPARSE,
            slow=False,
        )
        for option, value, says in (
            ("--seed", "-1", "argument --seed: must be at least 0, got -1"),
            ("--scale", "100000", "argument --scale: must be at most 16, got 100000"),
            ("-n", "1000000", "argument -n/--num: must be at most 4096, got 1000000"),
            ("--threads", "100000", "argument --threads: must be at most 256, got 100000"),
        )
    ),
    # -- a file name can not forge a line of prepare's report
    Case(
        "prepare-file-name-with-a-newline",
        sh("vae-dist prepare src --out ds --test-fraction 0.25"),
        0,
        "prepared ds: 3 train + 1 test images",
        setup=lambda tmp: (distinct_pngs("src", 4)(tmp), writes("src/x\nerror: forged.txt", "not an image\n")(tmp)),
        detail="skipped 'x\\nerror: forged.txt': not a PNG",
    ),
]


# ---------------------------------------------------------------- running a row


def launch(
    argv: tuple[str, ...], cwd: Path, data_dir: Path, timeout: float = 300, preexec_fn=None
) -> subprocess.CompletedProcess:
    program = {"vae-dist": VAE_DIST, "python": sys.executable}[argv[0]]
    environment = {**env(), "VAE_DIST_RUNS": str(cwd / "runs"), "VAE_DIST_DATA": str(data_dir)}
    return run_command([program, *argv[1:]], timeout, check=False, cwd=cwd, preexec_fn=preexec_fn, environ=environment)


@pytest.fixture(scope="module")
def data_dir(fashion_root) -> Path:
    return Path(fashion_root).resolve()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A real 1-epoch run with checkpoints, at runs/tiny under the folder returned."""
    folder = tmp_path_factory.mktemp("trained")
    # A relative --output-dir is what config.yaml records, so each copy resumes in its own folder.
    proc = launch(sh(f"vae-dist train --config linear --name tiny --output-dir runs {TINY}"), folder, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in sorted((folder / TRAINED / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir) -> Path:
    """A tiny model exported and verified (fp32 files only), at runs/exp under the folder returned."""
    folder = tmp_path_factory.mktemp("exported")
    make_run(folder / "runs", "exp", "linear")
    proc = launch(sh(f"vae-dist export {EXPORTED} --variants none"), folder, data_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])


def test_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path, data_dir, request):
    if case.start:
        source = request.getfixturevalue(case.start)
        shutil.copytree(source / "runs", tmp_path / "runs")
    case.setup(tmp_path)
    before = file_hashes(tmp_path, case.unchanged, each_matches=True)
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} exists before the command"

    if case.disk:
        with full_disk(tmp_path / "runs", case.disk) as (preexec, mechanism):
            proc = launch(case.argv, tmp_path, data_dir, preexec_fn=preexec)
    else:
        proc, mechanism = launch(case.argv, tmp_path, data_dir), ""
    output = f"$ {shlex.join(case.argv)} {mechanism}\n--- stdout\n{proc.stdout[-3000:]}"
    output += f"\n--- stderr\n{proc.stderr[-3000:]}"

    assert proc.returncode == case.status, output
    assert "Traceback" not in proc.stderr + proc.stdout, output
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.strip()]
    if case.status == 0:
        assert sum(case.phrase in line for line in lines) == 1, output
    else:
        stream = (proc.stderr if case.stream == "stderr" else proc.stdout).strip().splitlines()
        assert stream, output
        errors = [line for line in stream if re.match(case.line, line)]
        assert errors == [stream[-1]], f"the error is not one line, nor last:\n{output}"
        assert case.phrase in stream[-1], output
    if case.detail:
        assert sum(case.detail in line for line in lines) == 1, f"not said exactly once: {case.detail}\n{output}"
    assert file_hashes(tmp_path, case.unchanged, each_matches=True) == before, output
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} was created\n{output}"
    if case.then:
        case.then(tmp_path)
