import sys

import pytest
from click.testing import CliRunner

from helpers import ROOT, run
from vae_dist.cli import main
from vae_dist.config import ConfigError, load_config, parse_override


@pytest.mark.parametrize("name,kind", [("linear", "linear"), ("conv", "conv")])
def test_shipped_configs_load(name, kind):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.model.kind == kind and cfg.train.lr == 1e-3 and cfg.data.name == "fashion-mnist"


def test_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs/linear.yaml",
        ["train.epochs=5", "train.lr=3e-4", "model.hidden_dims=[64, 32]", "data.root=null"],
    )
    assert cfg.train.epochs == 5 and cfg.train.lr == 3e-4 and cfg.model.hidden_dims == [64, 32]
    assert cfg.data.root is None
    assert parse_override("loss.beta=2") == ("loss.beta", 2)
    assert load_config(None, ["loss.beta=2"]).loss.beta == 2.0  # int accepted for float


@pytest.mark.parametrize(
    "override,names",
    [
        ("train.epoch=5", "train.epoch"),
        ("nope.x=1", "nope.x"),
        ("train.epochs=five", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("loss.beta=.inf", "loss.beta"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.kind=rnn", "model.kind"),
        ("model.hidden_dims=[0]", "model.hidden_dims"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.binarize=static", "data.binarize"),
        ("train.grad_accum_steps=3", "train.grad_accum_steps"),
        ("train.ema=1", "train.ema must be below 1"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.skip_threshold=nan", "train.skip_threshold"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("epochs", "epochs"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[")):
        load_config(ROOT / "configs/linear.yaml", [override])


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(bad)


def test_cli_reports_one_line_and_exits_nonzero(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--config", "configs/linear.yaml", "--set", "train.lr=-1", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["error: train.lr must be a finite number > 0, got -1.0"]
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_script_is_importable_and_runnable():
    import vae_dist.training as t

    assert callable(t.train)
    out = run([sys.executable, str(ROOT / "vae_dist/train.py"), "--help"], check=False)
    assert out.returncode == 0 and "--config" in out.stdout


def test_fp16_on_the_cpu_is_refused(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            "configs/linear.yaml",
            "--cpu",
            "--set",
            "train.mixed_precision=fp16",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "fp16 needs a GPU" in result.output
    assert not any(tmp_path.iterdir())


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    from vae_dist.files import read_jsonl

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"epoch": 0}\n{"epoch": 1, "te')
    assert read_jsonl(f) == [{"epoch": 0}]


def test_every_config_key_is_documented():
    """docs/training.md#configuration has a row for each key the config accepts (and no other)."""
    import dataclasses
    import re

    from vae_dist.config import Config

    keys = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory())
    }
    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("## Configuration") :]
    table = table[: table.index("\n## ")]
    rows = {key for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.M) for key in re.findall(r"`([a-z_.]+)`", cell)}
    assert rows == keys


def test_yes_and_no_are_words_in_a_config_and_in_overrides(tmp_path):
    # YAML 1.1 reads no/yes/on/off as booleans; train.mixed_precision's choices include "no".
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config("linear", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_override("run.name=off") == ("run.name", "off")
    assert parse_override("run.name=true") == ("run.name", True)  # true and false stay booleans
