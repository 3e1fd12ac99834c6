"""The Python API (`import vae_dist`): load, sample, encode, decode, reconstruct, neg_elbo and train,
with clear exceptions for what cannot be done."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vae_dist
from helpers import ROOT, make_run
from vae_dist.errors import UserError
from vae_dist.record import ModelFileError
from vae_dist.runs import MODEL_FILE

TINY = {"train.epochs": 1, "data.train_subset": 512, "data.test_subset": 200, "train.batch_size": 64,
        "model.hidden_dims": [32], "model.latent_dim": 4, "run.log_with": []}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through the API, on the first real Fashion-MNIST images."""
    out = tmp_path_factory.mktemp("api")
    return vae_dist.train("linear", {**TINY, "run.output_dir": str(out), "run.name": "tiny"}, cpu=True)


def test_train_makes_the_run_the_command_makes(trained):
    assert trained.name == "tiny" and (trained / MODEL_FILE).is_file() and (trained / "config.yaml").is_file()
    assert (trained / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(UserError, match="already holds a run"):  # a finished run is never replaced
        vae_dist.train("linear", TINY, **{"run.output_dir": str(trained.parent), "run.name": "tiny"})


def test_a_loaded_model_describes_itself(trained):
    model = vae_dist.load(trained)
    assert (model.kind, model.latent_dim, model.image_shape) == ("linear", 4, (1, 28, 28))
    assert model.record.test_images == 200 and model.record.dataset == "fashion-mnist"
    assert vae_dist.load(trained / MODEL_FILE).record == model.record  # the model file itself
    assert vae_dist.load("tiny", output_dir=trained.parent).record == model.record  # a run name
    assert re.fullmatch(r"<vae_dist.Model linear 1x28x28, 4 latents, from .*model.safetensors>", repr(model))


def test_samples_are_images_and_a_seed_repeats_them(trained):
    model = vae_dist.load(trained, device="cpu")
    a, b = model.sample(5, seed=3), model.sample(5, seed=3)
    assert a.shape == (5, 1, 28, 28) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, model.sample(5, seed=4))
    flat = model.sample(3, seed=3, temperature=1e-6)
    assert np.allclose(flat, flat[0], atol=1e-5)  # near zero every sample is the decoded prior mean
    assert model.sample(0).shape == (0, 1, 28, 28)


def test_every_input_form_gives_the_same_figures(trained, test_images):
    model = vae_dist.load(trained)
    as_float = test_images.astype(np.float32) / 255
    forms = [test_images, as_float, torch.from_numpy(test_images), [Image.fromarray(i[0]) for i in test_images]]
    codes = [model.encode(x) for x in forms]
    assert codes[0].shape == (10, 4) and all(np.allclose(codes[0], c, atol=1e-6) for c in codes)
    recon = model.reconstruct(test_images)
    assert recon.shape == (10, 1, 28, 28) and np.allclose(recon, model.decode(codes[0]), atol=1e-6)
    assert model.encode(test_images[0]).shape == (1, 4)  # one image [C, H, W]


def test_neg_elbo_of_the_test_split_is_what_training_measured(trained, fashion_root):
    from vae_dist.data import splits

    model = vae_dist.load(trained)
    test = splits.load_split("fashion-mnist", False, fashion_root, subset=200).images.numpy()
    figures = model.neg_elbo(test)
    assert figures.shape == (200,) and figures.dtype == np.float64
    assert figures.mean() == pytest.approx(model.record.test_neg_elbo, rel=1e-5)
    assert not np.allclose(figures, model.neg_elbo(test, seed=1))  # another draw of the noise


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda m: m.encode(np.zeros((2, 3, 28, 28), np.uint8)), r"must be \[n, 1, 28, 28\], got \[2, 3, 28, 28\]"),
        (lambda m: m.encode(np.full((1, 1, 28, 28), 2.0)), r"float images must lie in \[0, 1\]"),
        (lambda m: m.encode(np.zeros((1, 1, 28, 28), np.int64)), "must be uint8 .0-255. or float"),
        (lambda m: m.decode(np.zeros((2, 5))), r"latents must be \[n, 4\], got \[2, 5\]"),
        (lambda m: m.sample(-1), "n must be a count of images"),
        (lambda m: m.sample(2, temperature=0), r"temperature must be a number > 0 \(1.0 samples the prior .*got 0"),
        (lambda m: m.sample(2, temperature=-1.0), "temperature must be a number > 0"),
    ],
)
def test_inputs_that_do_not_fit_are_refused_in_words(trained, call, says):
    with pytest.raises(vae_dist.InputError, match=says):
        call(vae_dist.load(trained))


def test_a_wrong_path_or_a_damaged_file_raises_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="not found; train a model first"):
        vae_dist.load(tmp_path / "nothing" / MODEL_FILE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model.safetensors; train the run to its end first"):
        vae_dist.load(tmp_path / "empty")
    run = make_run(tmp_path, "r", "conv")
    (run / MODEL_FILE).write_bytes((run / MODEL_FILE).read_bytes()[:-50])
    with pytest.raises(ModelFileError, match="cannot be read as a safetensors file"):
        vae_dist.load(run)
    with pytest.raises(UserError, match="unknown config key 'train.epoch'"):
        vae_dist.train("linear", {"train.epoch": 1})


def test_importing_the_package_loads_neither_torch_nor_the_trainer():
    code = "import sys, vae_dist; print(sorted(m for m in ('torch', 'accelerate', 'vae_dist.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr
