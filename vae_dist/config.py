"""Typed configuration: dataclasses filled from YAML, then from `section.key=value` overrides.

Unknown keys, values of the wrong type and impossible values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae_dist import layout, paths
from vae_dist.data.builtin import NAMES as DATASET_NAMES
from vae_dist.errors import UserError
from vae_dist.kinds import LIKELIHOODS, MODEL_KINDS


class ConfigError(UserError, ValueError):
    """A problem with the configuration, phrased for the user."""


@dataclass
class ModelConfig:
    kind: str = "linear"  # vae_dist.kinds.MODEL_KINDS; every kind shares one interface and one training loop
    latent_dim: int = 20  # 20 as in Kingma & Welling's MNIST experiments
    hidden_dims: list[int] = field(default_factory=lambda: [400])  # MLP widths (conv: after the convs)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # conv only: one stride-2 stage each
    upsample: str = "transposed"  # conv only: transposed (3x3 stride-2) | nearest (resize, then a 3x3 conv)
    encoder_blocks: str = "28x2,14x2,7x2,1x1"  # hierarchical only: RESOLUTIONxBLOCKS, down from the image's height
    decoder_blocks: str = "1x1,7x2,14x2,28x1"  # hierarchical only: one latent group per block, up to the image's height
    width: int = 32  # hierarchical only: channels of every block's input and output
    latent_channels: int = 8  # hierarchical only: channels of each latent group (its maps are the resolution's)
    bottleneck: float = 0.25  # hierarchical only: a block's inner channels, as a fraction of the width


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # a built-in data set (vae_dist.data.builtin): fashion-mnist | mnist
    path: str | None = None  # a prepared dataset (vae-dist prepare): your own images; replaces `name`
    in_memory: str = "auto"  # auto | always | never: hold a split in memory, or read its rows from disk
    memory_limit_mb: float = 2048  # auto: a split larger than this is read from disk, batch by batch
    root: str | None = None  # your own IDX folder, read in place; unset: ./data, the Debian package, a download
    download: bool = True  # last resort, needs internet
    binarize: str = "none"  # none | dynamic (resample x ~ Bernoulli(pixel) every step)
    train_subset: int = 0  # use only the first N training images (0 = all); for smoke runs
    test_subset: int = 0  # same for the test split


@dataclass
class LossConfig:
    likelihood: str = "bernoulli"  # vae_dist.kinds.LIKELIHOODS: bernoulli (BCE with logits) | gaussian | dlm
    mixtures: int = 10  # dlm only: logistic components per pixel
    compile: bool = False  # dlm only: training's -log p(x|z) through torch.compile (fused kernels)
    beta: float = 1.0  # weight of the KL term; 1 is the true ELBO
    kl_warmup_steps: int = 0  # ramp beta linearly from 0 over this many optimizer steps


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # global: images per optimizer step, summed over processes
    lr: float = 1e-3  # Adam, as in the reference
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0: plain Adam
    warmup_steps: int = 0  # the learning rate rises linearly to train.lr over this many optimizer steps
    grad_clip: float = 0.0  # clip the gradient's global norm to this (0: no clipping)
    skip_threshold: float = 0.0  # skip an update whose gradient norm exceeds this (0: only non-finite ones)
    ema: float = 0.0  # decay of the weights' moving average that is evaluated and saved (0: none; e.g. 0.9999)
    seed: int = 1  # data order, initialisation and all noise derive from it
    mixed_precision: str = "no"  # no | fp16 | bf16
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size is split)
    eval_batch_size: int = 1000
    eval_seed: int = 0  # fixed noise for the test -ELBO, so it is comparable across runs
    grid_images: int = 8  # originals in the reconstruction grid (one row each)
    grid_samples: int = 64  # images in the prior-sample grid
    grid_temperatures: list[float] = field(default_factory=lambda: [1.0])  # a prior-sample grid at each
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = only at epoch ends)
    keep_checkpoints: int = 2  # how many checkpoints to keep
    log_every: int = 50  # optimizer steps between the trackers' training loss, KL weight and images/s


@dataclass
class RunConfig:
    output_dir: str = field(default_factory=lambda: str(paths.runs_dir()))  # $VAE_DIST_RUNS or ./runs
    name: str | None = None  # default: <model.kind>-<date>-<time>; the run's config.yaml records the name used
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # Accelerate trackers; [] for none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.kind": tuple(MODEL_KINDS),
    "model.upsample": ("transposed", "transposed4", "nearest"),
    "data.name": DATASET_NAMES,
    "data.binarize": ("none", "dynamic"),
    "data.in_memory": ("auto", "always", "never"),
    "loss.likelihood": tuple(LIKELIHOODS),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}
POSITIVE = (
    "model.latent_dim",
    "model.width",
    "model.latent_channels",
    "model.bottleneck",
    "loss.mixtures",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.grad_accum_steps",
    "train.eval_batch_size",
    "train.grid_images",
    "train.grid_samples",
    "train.keep_checkpoints",
    "train.log_every",
    "data.memory_limit_mb",
)
NON_NEGATIVE = (
    "loss.beta",
    "loss.kl_warmup_steps",
    "data.train_subset",
    "data.test_subset",
    "train.checkpoint_every",
    "train.weight_decay",
    "train.warmup_steps",
    "train.grad_clip",
    "train.skip_threshold",
    "train.ema",
    "train.seed",
    "train.eval_seed",
)
AT_MOST = {  # largest values that work, checked before anything runs
    "train.seed": 2**32 - 1,  # numpy's seed, which set_seed sets, is 32-bit
    "train.eval_seed": 2**32 - 1,
    "train.grid_images": 256,  # images a grid can hold in one PNG
    "train.grid_samples": 4096,
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` checked against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a run named 2024
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections or not name:
        raise ConfigError(f"unknown config key {key!r}; sections are {sorted(sections)}")
    part = getattr(cfg, section)
    hints = typing.get_type_hints(type(part))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}; {section} has {sorted(hints)}")
    setattr(part, name, _coerce(key, value, hints[name]))


def validate(cfg: Config) -> Config:
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not get(cfg, key) > 0 or not math.isfinite(get(cfg, key)):
            raise ConfigError(f"{key} must be a finite number > 0, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if not get(cfg, key) >= 0 or not math.isfinite(get(cfg, key)):
            raise ConfigError(f"{key} must be a finite number >= 0, got {get(cfg, key)!r}")
    for key, most in AT_MOST.items():
        if get(cfg, key) > most:
            raise ConfigError(f"{key} must be at most {most}, got {get(cfg, key)!r}")
    for key in ("model.hidden_dims", "model.channels"):
        if any(v < 1 for v in get(cfg, key)):
            raise ConfigError(f"{key}: every width must be >= 1, got {get(cfg, key)!r}")
    if not cfg.train.grid_temperatures or not all(0 < t < math.inf for t in cfg.train.grid_temperatures):
        raise ConfigError(
            f"train.grid_temperatures: every temperature must be a number > 0 (1.0 is the prior itself), "
            f"got {cfg.train.grid_temperatures!r}"
        )
    names = [f"{t:g}" for t in cfg.train.grid_temperatures]
    if len(set(names)) < len(names):
        raise ConfigError(f"train.grid_temperatures: each temperature once, got {cfg.train.grid_temperatures!r}")
    if cfg.model.kind == "hierarchical":
        try:
            layout.check(
                *(layout.parse(f"model.{k}", get(cfg, f"model.{k}")) for k in ("encoder_blocks", "decoder_blocks"))
            )
        except layout.LayoutError as e:
            raise ConfigError(str(e)) from None
    if cfg.train.ema >= 1:
        raise ConfigError(f"train.ema must be below 1 (a decay such as 0.9999), got {cfg.train.ema!r}")
    if cfg.data.path is not None and cfg.data.root is not None:
        raise ConfigError("data.path (a prepared dataset) and data.root (a folder of IDX files) exclude each other")
    if cfg.model.kind == "conv" and not cfg.model.channels:
        raise ConfigError("model.channels: the conv VAE needs at least one stage")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"train.grad_accum_steps ({cfg.train.grad_accum_steps})"
        )
    return cfg


def get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class _Loader(yaml.SafeLoader):
    """YAML as configs mean it: only true and false are booleans (as in YAML 1.2), so that
    `train.mixed_precision: no` is the word no, not False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as YAML (so 1e-3, [64, 32], null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads '1e-3' as a string
    return key.strip(), value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


Overrides = Iterable[str] | Mapping[str, Any]  # "section.key=value" texts, or {"section.key": value}


def from_dict(data: dict[str, Any], overrides: Overrides = ()) -> Config:
    cfg = Config()
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", _yaml_float(value))
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            _set(cfg, key, value)
    else:
        for text in overrides:
            _set(cfg, *parse_override(text))
    return validate(cfg)


def _yaml_float(value: Any) -> Any:
    if isinstance(value, str) and _looks_like_float(value) and not value.strip().isdigit():
        return float(value)
    return value


def shipped_config(name: str) -> Path:
    """One of the configs that come with the package (configs/NAME.yaml), found through the package
    so that it works from any directory and in any kind of install."""
    from importlib.resources import files

    path = Path(str(files("vae_dist.configs") / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no shipped config named {name!r}; shipped: {', '.join(shipped_config_names())}")
    return path


def shipped_config_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("vae_dist.configs").iterdir() if p.name.endswith(".yaml"))


def load_config(path: str | Path | None, overrides: Overrides = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then the overrides, then validation.

    `path` may also name a shipped config (`linear`, `conv`) when no such file exists.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.suffix == "" and path.name == str(path) and path.name in shipped_config_names():
            path = shipped_config(path.name)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} not found; pass a YAML file or a shipped config "
                f"({', '.join(shipped_config_names())})"
            )
        try:
            data = read_yaml(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not text; pass a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}".splitlines()[0]) from e
        if data is None:  # an empty file most likely lost its contents: never train the defaults in its name
            raise ConfigError(
                f"config file {str(path)!r} is empty; give at least one section (e.g. `train: {{epochs: 5}}`), "
                "or leave out --config to train the built-in defaults"
            )
    return from_dict(data, overrides)
