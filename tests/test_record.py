"""The model record: one dataclass written into model.safetensors' header by training and read
back, checked, by everything else; its header is read without torch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_run, python_without
from vae_dist import artifacts, record
from vae_dist.config import ModelConfig
from vae_dist.runs import MODEL_FILE


def test_a_record_comes_back_as_it_was_written(tmp_path):
    path = make_run(tmp_path, "r", "conv", likelihood="gaussian", eval_seed=3) / MODEL_FILE
    got = record.read(path)
    assert got.kind == "conv" and got.latent_dim == 4 and got.image_shape == (1, 28, 28)
    assert got.likelihood == "gaussian" and got.eval_seed == 3 and got.dataset == "fashion-mnist"
    assert record.ModelRecord.from_metadata(got.to_metadata(), path) == got
    model, loaded = artifacts.load_model(path)
    assert loaded == got and model.latent_dim == 4


def test_the_header_is_read_without_torch(tmp_path):
    path = make_run(tmp_path, "r", "linear") / MODEL_FILE
    code = f"from vae_dist import record\nprint(record.read({str(path)!r}).kind)\n"
    proc = python_without(("torch", "safetensors", "accelerate"), code)
    assert proc.returncode == 0 and proc.stdout.strip() == "linear", proc.stderr


def _rewrite(path, **changes):
    meta = record.read(path).to_metadata()
    meta.update({k: json.dumps(v) for k, v in changes.items()})
    save_file(load_file(str(path)), str(path), metadata=meta)


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"dataset": 12}, "dataset=12"),
        ({"test_images": -3}, "test_images=-3"),
        ({"eval_seed": None}, "eval_seed=None"),
        ({"image_shape": [1, 28]}, "model or image_shape"),
        ({"model": {"kind": "conv", "latent_dim": "four"}}, "model: model.latent_dim: expected int"),
        ({"likelihood": "poisson"}, "names the likelihood 'poisson'"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_naming_it(tmp_path, changes, says):
    path = make_run(tmp_path, "r", "linear") / MODEL_FILE
    _rewrite(path, **changes)
    with pytest.raises(record.ModelFileError, match=says):
        record.read(path)


def test_older_files_and_newer_keys_are_read(tmp_path):
    """A key a newer vae-dist adds is left aside; keys an older one lacked take their defaults."""
    path = make_run(tmp_path, "r", "linear") / MODEL_FILE
    meta = record.read(path).to_metadata()
    for key in ("binarize", "test_images", "likelihood", "fit"):
        meta.pop(key, None)
    meta["ema"] = json.dumps(True)
    save_file(load_file(str(path)), str(path), metadata=meta)
    got = record.read(path)
    assert got.binarize is None and got.test_images is None and got.likelihood == "bernoulli"


def test_a_file_cut_short_is_refused_before_anything_is_loaded(tmp_path):
    path = make_run(tmp_path, "r", "linear") / MODEL_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(record.ModelFileError, match="cannot be read as a safetensors file"):
        record.read(path)


def test_equal_records_give_equal_metadata():
    cfg = ModelConfig(kind="linear", hidden_dims=[8])
    a = record.ModelRecord(cfg, (1, 4, 4), "fashion-mnist", versions={"b": "1", "a": "2"})
    b = dataclasses.replace(a, versions={"a": "2", "b": "1"})
    assert list(a.to_metadata().items()) == list(b.to_metadata().items())


def test_a_model_file_is_a_function_of_its_weights_and_record(tmp_path):
    """Two saves, and two identical trainings, give the same bytes; safetensors reads them back."""
    import hashlib

    from vae_dist.config import load_config
    from vae_dist.training import train

    model, got = artifacts.load_model(make_run(tmp_path, "r", "conv") / MODEL_FILE)
    digests = set()
    for i in range(2):
        artifacts.save_model(tmp_path / f"{i}.safetensors", model, got)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    state = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    runs = []
    for name in ("a", "b"):
        tiny = ["data.train_subset=256", "data.test_subset=64", "train.epochs=1", "train.batch_size=64"]
        cfg = load_config("linear", [*tiny, f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}"])
        runs.append(train(cfg, cpu=True).run_dir / MODEL_FILE)
    assert runs[0].read_bytes() == runs[1].read_bytes()


@pytest.mark.parametrize("offsets", [[], [0, "4"], [0], None])
def test_a_header_whose_offsets_are_not_two_counts_is_refused(tmp_path, offsets):
    import struct

    header = json.dumps({"__metadata__": {}, "w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}).encode()
    path = tmp_path / MODEL_FILE
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(record.ModelFileError, match="cannot be read as a safetensors file"):
        record.read(path)
