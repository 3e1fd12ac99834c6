"""Experiment tracking: TensorBoard event files read back with tensorboard's own reader (tags,
steps, no step twice after a resume), curves.png, and the tracker names refused in one line."""

from __future__ import annotations

import io
import math
import shutil
import signal
import time

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import metrics, tiny_overrides
from vae_dist import artifacts, tracking
from vae_dist.config import ConfigError, load_config
from vae_dist.stopping import Stopped, StopRequest
from vae_dist.training import train

STEP_TAGS = ("train/loss", "train/kl_weight", "train/images_per_s")
EPOCH_TAGS = ("test/neg_elbo", "test/recon", "test/kl", "train/epoch_loss", "epoch")


def config(tmp_path, *extra: str):
    # 512 images, batch 64: 8 steps per epoch, logged every 2, checkpoints every 3 steps (all kept)
    overrides = tiny_overrides(
        train_subset=512, test_subset=128, epochs=2, log_every=2, checkpoint_every=3, keep_checkpoints=20,
        hidden_dims=[32], grid_samples=4,
    )
    return load_config("linear", [*overrides, f"run.output_dir={tmp_path / 'runs'}", "run.name=r", *extra])


def events(run_dir):
    folder = run_dir / tracking.LOGS_DIR / tracking.PROJECT
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def test_the_trackers_get_the_step_and_epoch_figures_and_the_grids(tmp_path, fashion_root):
    result = train(config(tmp_path), cpu=True)
    reader = events(result.run_dir)
    tags = reader.Tags()
    assert set(tags["scalars"]) == {*STEP_TAGS, *EPOCH_TAGS}
    assert set(tags["images"]) == {"reconstruction", "samples"}
    for tag in STEP_TAGS:
        assert [e.step for e in reader.Scalars(tag)] == list(range(2, 17, 2))
    for tag in EPOCH_TAGS:
        assert [e.step for e in reader.Scalars(tag)] == [8, 16]
    elbo = [e.value for e in reader.Scalars("test/neg_elbo")]
    assert elbo == pytest.approx([r["test_neg_elbo"] for r in metrics(result.run_dir)], rel=1e-6)
    assert [e.value for e in reader.Scalars("train/kl_weight")] == [1.0] * 8
    grid = reader.Images("reconstruction")[-1]  # the grid as drawn, not upscaled as the PNG is
    png = Image.open(result.run_dir / "images" / "reconstruction_epoch001.png")
    scale = artifacts.grid_scale(28)
    assert (grid.width * scale, grid.height * scale) == png.size
    shown = Image.open(io.BytesIO(grid.encoded_image_string)).convert("L")
    assert np.array_equal(np.asarray(shown).repeat(scale, 0).repeat(scale, 1), np.asarray(png))
    # the resolved config, as hyperparameters of the run itself (no second run in TensorBoard's list)
    assert reader.PluginTagToContent("hparams")  # the hyperparameters plugin finds them in this run
    folder = result.run_dir / tracking.LOGS_DIR / tracking.PROJECT
    assert [p for p in folder.iterdir() if p.is_dir()] == []
    hparams = yaml.safe_load((folder / tracking.HPARAMS_FILE).read_text())
    assert hparams["model.hidden_dims"] == "[32]" and hparams["train.log_every"] == 2


def test_a_resumed_run_continues_the_curves_without_a_step_twice(tmp_path, fashion_root):
    """The run is cut back to its checkpoint at step 9 (its later checkpoints and model removed,
    as after a kill), then resumed: what was logged after step 9 is purged and logged again."""
    first = train(config(tmp_path), cpu=True).run_dir
    for checkpoint in (first / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > 9:
            shutil.rmtree(checkpoint)
    (first / "model.safetensors").unlink()
    again = train(config(tmp_path), resume="auto", cpu=True).run_dir
    assert again == first
    reader = events(again)
    for tag in STEP_TAGS:
        assert [e.step for e in reader.Scalars(tag)] == list(range(2, 17, 2)), tag
    for tag in EPOCH_TAGS:
        assert [e.step for e in reader.Scalars(tag)] == [8, 16], tag
    assert len(list((again / tracking.LOGS_DIR / tracking.PROJECT).glob(f"{tracking.EVENT_FILE_PREFIX}*"))) == 2


def test_a_resumed_runs_event_file_is_read_after_the_earlier_ones(tmp_path):
    """TensorBoard reads event files in name order, and a name starts with the second it was made
    in: an earlier file made in this second, whose host name sorts after this machine's, must still
    come first, or the resumed run's purge is read before the steps it should drop."""
    from accelerate import Accelerator

    cfg = config(tmp_path)
    folder = tmp_path / "r" / tracking.LOGS_DIR / tracking.PROJECT
    folder.mkdir(parents=True)
    earlier = folder / f"{tracking.EVENT_FILE_PREFIX}{int(time.time()):010d}.~other-host.1.9"
    earlier.write_bytes(b"")
    accelerator = Accelerator(cpu=True)
    tracking.start(accelerator, cfg, tmp_path / "r", resumed_at=9)
    tracking.end(accelerator)
    names = sorted(p.name for p in folder.glob(f"{tracking.EVENT_FILE_PREFIX}*"))
    assert len(names) == 2 and names[0] == earlier.name


@pytest.fixture
def drawn(monkeypatch) -> list[int]:
    """The epochs each drawing of curves.png showed, in order."""
    shown: list[int] = []
    draw = tracking.write_curves
    monkeypatch.setattr(tracking, "write_curves", lambda d, records: shown.append(len(records)) or draw(d, records))
    return shown


def test_curves_png_is_redrawn_at_most_every_curves_every_seconds_and_after_the_last_epoch(
    tmp_path, fashion_root, monkeypatch, drawn
):
    monkeypatch.setattr(tracking, "CURVES_EVERY", 1e9)  # a short run: drawn once, after its last epoch
    result = train(config(tmp_path, "train.epochs=2"), cpu=True)
    curves = result.run_dir / tracking.CURVES_FILE
    assert drawn == [2] and Image.open(curves).size == (1000, 380)
    first = curves.read_bytes()
    monkeypatch.setattr(tracking, "CURVES_EVERY", 0.0)  # epochs longer than it: drawn after each
    train(config(tmp_path, "train.epochs=4"), resume="auto", cpu=True)
    assert drawn == [2, 3, 4] and curves.read_bytes() != first


def test_curves_are_drawn_when_a_run_stops_early(tmp_path, fashion_root, monkeypatch, drawn):
    monkeypatch.setattr(tracking, "CURVES_EVERY", 1e9)  # not redrawn at the first epoch's end
    asked = []  # a SIGTERM seen at the tenth step: in the second epoch, after the first ended (8 steps each)
    monkeypatch.setattr(
        StopRequest, "requested", lambda self: asked.append(1) or (signal.SIGTERM if len(asked) == 10 else 0)
    )
    with pytest.raises(Stopped):
        train(config(tmp_path), cpu=True)
    assert drawn == [1] and (tmp_path / "runs" / "r" / tracking.CURVES_FILE).is_file()


def test_no_trackers(tmp_path, fashion_root):
    result = train(config(tmp_path, "run.log_with=[]", "train.epochs=1"), cpu=True)
    assert not (result.run_dir / tracking.LOGS_DIR).exists() and (result.run_dir / tracking.CURVES_FILE).is_file()


@pytest.mark.parametrize(
    "names, message",
    [(["tensorbored"], "'tensorbored' is not a tracker Accelerate knows"),
     (["wandb"], "wandb needs the wandb package (pip install wandb), or remove it")],
)
def test_trackers_that_cannot_run_are_refused_before_anything_is_written(tmp_path, monkeypatch, names, message):
    import importlib.util

    find_spec = importlib.util.find_spec  # wandb counts as not installed, whether it is here or not
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = config(tmp_path, f"run.log_with={names}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(cfg, cpu=True)
    assert not (tmp_path / "runs").exists()


def test_a_binarised_run_reports_its_test_elbo_in_bits_per_dim_too(tmp_path, fashion_root, caplog):
    caplog.set_level("INFO")
    result = train(config(tmp_path, "data.binarize=dynamic", "train.epochs=1"), cpu=True)
    (line,) = metrics(result.run_dir)
    assert line["test_bits_per_dim"] == pytest.approx(line["test_neg_elbo"] / (784 * math.log(2)), rel=1e-12)
    assert f"= {line['test_bits_per_dim']:.4f} bits/dim" in caplog.text
    assert [e.value for e in events(result.run_dir).Scalars("test/bits_per_dim")] == pytest.approx(
        [line["test_bits_per_dim"]], rel=1e-6
    )
    grey = train(config(tmp_path, "train.epochs=1", "run.name=grey"), cpu=True)  # Bernoulli on grey levels
    assert "test_bits_per_dim" not in metrics(grey.run_dir)[0]  # not a likelihood of the data: no bits/dim
