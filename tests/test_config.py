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


def test_the_shipped_hierarchical_configs_build_the_models_their_comments_describe():
    from vae_dist.likelihoods import PixelLikelihood
    from vae_dist.models import build_model

    for name, shape, weights, latents in (("hierarchical", (1, 28, 28), 261729, 12160),
                                          ("hierarchical64", (3, 64, 64), 765380, 119568)):
        cfg = load_config(name)
        pixel = PixelLikelihood(cfg.loss.likelihood, shape[0], cfg.loss.mixtures)
        model = build_model(cfg.model, shape, pixel.out_channels)
        assert (sum(p.numel() for p in model.parameters()), model.latent_dim) == (weights, latents)
        assert cfg.train.ema > 0 and cfg.train.grad_clip > 0 and cfg.train.warmup_steps > 0
        assert cfg.train.grid_temperatures[0] == 1.0 and len(cfg.train.grid_temperatures) == 3


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
        ("loss.likelihood=poisson", "loss.likelihood: 'poisson' is not one of bernoulli, gaussian, dlm"),
        ("loss.mixtures=0", "loss.mixtures must be a finite number > 0"),
        ("train.grid_temperatures=[]", "train.grid_temperatures: every temperature must be a number > 0"),
        ("train.grid_temperatures=[1, -0.5]", "train.grid_temperatures: every temperature must be a number > 0"),
        ("train.grid_temperatures=[0.7, 0.70]", "train.grid_temperatures: each temperature once"),
        ("model.width=0", "model.width"),
        ("model.bottleneck=0", "model.bottleneck"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[")):
        load_config(ROOT / "configs/linear.yaml", [override])


@pytest.mark.parametrize(
    "encoder,decoder,says",
    [
        ("28x2,14x2,7x2,1x1", "", "model.decoder_blocks is empty"),
        ("28x2;14x2", "1x1,28x1", "'28x2;14x2' in '28x2;14x2' is not RESOLUTIONxBLOCKS"),
        ("28x2,14x0,1x1", "1x1,28x1", "14x0 needs a resolution and a block count of at least 1"),
        ("28x2,14x2,1x1", "1x1,7x1,28x1", "resolution 7 has no encoder blocks to condition its latents on"),
        ("14x2,28x2,1x1", "1x1,28x1", "model.encoder_blocks: resolutions must go down"),
        ("28x2,14x2,1x1", "1x1,28x1,14x1", "model.decoder_blocks: resolutions must go up"),
        ("28x2,8x2,1x1", "1x1,28x1", "resolution 8 does not divide resolution 28 above it"),
        ("28x2,14x2,7x1,1x1", "7x1,14x1,28x1", "model.decoder_blocks starts at resolution 7, but model.encoder"),
    ],
)
def test_bad_block_layouts_are_refused_in_words(encoder, decoder, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        load_config("hierarchical", {"model.encoder_blocks": encoder, "model.decoder_blocks": decoder})


def test_block_layouts_that_do_not_fit_the_images_are_refused_when_built():
    from vae_dist.layout import LayoutError
    from vae_dist.models import build_model

    cfg = load_config("hierarchical", {"model.encoder_blocks": "32x1,16x1,1x1", "model.decoder_blocks": "1x1,32x1"})
    with pytest.raises(LayoutError, match="starts at resolution 32, but the images are 28 pixels high: make it 28"):
        build_model(cfg.model, (1, 28, 28))
    cfg = load_config("hierarchical", {"model.encoder_blocks": "48x1,24x1,3x1", "model.decoder_blocks": "3x1,48x1"})
    assert build_model(cfg.model, (3, 48, 64)).sizes == {48: (48, 64), 24: (24, 32), 3: (3, 4)}  # the aspect kept
    with pytest.raises(LayoutError, match="resolution 3 does not divide the 48x60 images"):
        build_model(cfg.model, (3, 48, 60))


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
