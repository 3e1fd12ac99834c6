"""Edge variants of an export: what each one is, and how it is made.

A variant is another encoder/decoder pair beside the fp32 files, with the same inputs and outputs
(float32 in, float32 out), made from the verified fp32 files:

    name               files                                   made by
    fp16               encoder.fp16.onnx, decoder.fp16.onnx    float16 weights and arithmetic, float32 I/O
    int8-dynamic       encoder.int8-dynamic.onnx, ...          int8 weights, activations quantised per call
    int8-static        encoder.int8-static.onnx, ...           int8 QDQ, activation ranges calibrated on
                                                               training images (CNN VAE only)
    fp32-ort           encoder.ort, decoder.ort                ORT format (mobile and minimal onnxruntime
    int8-dynamic-ort, int8-static-ort                          builds) of fp32 and the int8 variants

Only onnxruntime's own tools make them: `onnxruntime.transformers.float16` for fp16,
`onnxruntime.quantization` for int8, and SessionOptions.optimized_model_filepath with
"session.save_model_format" = "ORT" for the ORT format (what
`python -m onnxruntime.tools.convert_onnx_models_to_ort` does). Every producer takes a `Job` (one
source file, one target file) and returns a JSON-friendly record of what it did: the tool and
options, the operator census before and after, for quantised graphs what was and was not
quantised, and the operators onnxruntime actually runs after its own graph optimisations.

How a variant is judged (its own tolerance, its quality cost against the QUALITY_BUDGET) is
export.verify's; what the manifest says of it, export.manifest's. See docs/export.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.spec import DEFAULT_ATOL, VARIANT_KEY
from vae_dist import files
from vae_dist.data import splits
from vae_dist.kinds import MODEL_KINDS
from vae_dist.models import VAE
from vae_dist.record import ModelRecord
from vae_dist.rng import Stream, generator

log = logging.getLogger(__name__)

# Operators that carry weights, and the integer operators quantisation turns them into.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
INTEGER_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    }
)
QUANT_DTYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})
CALIBRATION_BATCH = 100
# Hardware-specific blocked layouts (x86 NCHWc) must not be baked into a file meant for other
# devices; convert_onnx_models_to_ort leaves this optimiser out for the same reason.
PORTABLE_DISABLED_OPTIMIZERS = ["NchwcTransformer"]


@dataclass
class Job:
    source: Path
    target: Path
    role: str  # "encoder" | "decoder"
    variant: str  # written into the file's metadata as "variant"
    options: Mapping[str, Any] = field(default_factory=dict)
    calibration: np.ndarray | None = None  # inputs of the graph's single input, for static quantisation


# ---------------------------------------------------------------- how they are made


def to_fp16(job: Job) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    source = onnx.load(str(job.source))
    # keep_io_types: the contract stays float32 in and out; Cast nodes at the edges convert.
    converted = convert_float_to_float16(source, keep_io_types=True)
    # The converter appends the output casts at the end of the node list; ONNX wants topological order.
    OnnxModel(converted).topological_sort(is_deterministic=True)
    _save(converted, job.target, job.variant)
    fp16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "options": {"keep_io_types": True},
        "float16_initializers": fp16,
        "ops_before": census(source),
        "ops_after": census(converted),
        "runtime_ops": runtime_census(job.target),
    }


def to_int8_dynamic(job: Job) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    opts = dict(job.options)
    with _preprocessed(job.source) as pre:
        quantize_dynamic(
            pre,
            job.target,
            weight_type=QuantType[opts["weight_type"]],
            per_channel=opts["per_channel"],
            reduce_range=opts["reduce_range"],
        )
    _set_variant(job.target, job.variant)
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "options": opts,
        **quantization_report(onnx.load(str(job.source)), onnx.load(str(job.target))),
        "runtime_ops": runtime_census(job.target),
    }


def to_int8_static(job: Job) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if job.calibration is None or len(job.calibration) == 0:
        raise ValueError("static quantisation needs calibration inputs")
    opts = dict(job.options)
    source = onnx.load(str(job.source))
    exclude = output_layers(source, WEIGHT_OPS) if job.role in opts.get("float_output_layer", ()) else []
    input_name = source.graph.input[0].name
    with _preprocessed(job.source) as pre:
        quantize_static(
            pre,
            job.target,
            _Calibration(input_name, job.calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(opts["op_types"]),
            nodes_to_exclude=exclude,
            per_channel=opts["per_channel"],
            reduce_range=opts["reduce_range"],
            activation_type=QuantType[opts["activation_type"]],
            weight_type=QuantType[opts["weight_type"]],
            calibrate_method=CalibrationMethod[opts["calibrate_method"]],
        )
    _set_variant(job.target, job.variant)
    return {
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "options": opts,
        "calibration_inputs": int(len(job.calibration)),
        "kept_float": exclude,
        **quantization_report(source, onnx.load(str(job.target))),
        "runtime_ops": runtime_census(job.target),
    }


def to_ort_format(job: Job) -> dict[str, Any]:
    """An ORT-format copy, with onnxruntime's graph optimisations applied and saved."""
    source = onnx.load(str(job.source))
    with tempfile.TemporaryDirectory(dir=job.target.parent, prefix=".ort-") as tmp:
        # Converted from a copy that names this variant, so that the .ort file says what it is.
        named = Path(tmp) / job.source.name
        _save(source, named, job.variant)
        options = _session_options(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.optimized_model_filepath = str(job.target)
        options.add_session_config_entry("session.save_model_format", "ORT")
        # As convert_onnx_models_to_ort for any target but ARM: no int8-activation QDQ fusions.
        options.add_session_config_entry("session.qdqisint8allowed", "0")
        ort.InferenceSession(
            str(named), options, providers=["CPUExecutionProvider"], disabled_optimizers=PORTABLE_DISABLED_OPTIMIZERS
        )
    return {
        "tool": "onnxruntime.InferenceSession with session.save_model_format=ORT",
        "options": {"graph_optimization_level": "ORT_ENABLE_ALL", "disabled_optimizers": PORTABLE_DISABLED_OPTIMIZERS},
    }


REQUIRED_OPERATORS_FILE = "required_operators.config"


def write_required_operators(ort_files: list[Path], path: Path) -> Path:
    """The operator list a minimal onnxruntime build needs for `ort_files`
    (build.sh --minimal_build --include_ops_by_config PATH)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    # The tool logs the path it wrote at INFO on a logger of its own set to DEBUG: a temporary
    # path, of no use to the user.
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    def write(tmp: Path) -> None:
        create_config_from_models([f.resolve() for f in ort_files], tmp, False)
        # The tool lists the models by absolute path; keep only their names, which stay true when
        # the export folder is moved.
        lines = [
            f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in tmp.read_text().splitlines()
        ]
        tmp.write_text("\n".join(lines) + "\n")

    files.atomic_write(path, write)  # `vae-dist verify` rewrites it in a live export folder
    return path


# ---------------------------------------------------------------- what a graph holds


def census(model: onnx.ModelProto) -> dict[str, int]:
    """Operator type -> count ("domain:Op" outside the default domain)."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items()))


def runtime_census(path: Path) -> dict[str, int]:
    """The operators onnxruntime's CPU provider runs for `path` after its portable optimisations."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ort-") as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        options = _session_options(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.optimized_model_filepath = str(optimised)
        ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=PORTABLE_DISABLED_OPTIMIZERS
        )
        return census(onnx.load(str(optimised)))


def quantization_report(source: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, Any]:
    """Which weight operators ended up int8 and which stayed float.

    An operator is quantised when it is an integer operator (MatMulInteger, QLinearConv...) or,
    in QDQ form, when its weight comes from a DequantizeLinear of an 8-bit initializer and its
    activation from a DequantizeLinear too.
    """
    producers = {out: node for node in quantized.graph.node for out in node.output}
    int8 = {t.name for t in quantized.graph.initializer if t.data_type in QUANT_DTYPES}

    def dequantized(name: str, from_initializer: bool) -> bool:
        node = producers.get(name)
        return (
            node is not None and node.op_type == "DequantizeLinear" and (not from_initializer or node.input[0] in int8)
        )

    done, kept = Counter(), Counter()
    for node in quantized.graph.node:
        if node.op_type in INTEGER_OPS:
            done[node.op_type] += 1
        elif node.op_type in WEIGHT_OPS:
            qdq = len(node.input) > 1 and dequantized(node.input[1], True) and dequantized(node.input[0], False)
            (done if qdq else kept)[node.op_type] += 1
    return {
        "ops_before": census(source),
        "ops_after": census(quantized),
        "quantized": dict(sorted(done.items())),
        "float": dict(sorted(kept.items())),
        "quantized_op_types": sorted(done),
        "float_op_types": sorted(kept),
    }


def output_layers(model: onnx.ModelProto, op_types: frozenset[str]) -> list[str]:
    """Names of the `op_types` nodes nearest the graph outputs (walking back through the others)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found, seen = [], set()
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in op_types:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return sorted(found)


# ---------------------------------------------------------------- helpers


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array of inputs, in batches."""

    def __init__(self, input_name: str, inputs: np.ndarray):
        self._batches = iter(
            {input_name: np.ascontiguousarray(inputs[i : i + CALIBRATION_BATCH], dtype=np.float32)}
            for i in range(0, len(inputs), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextmanager
def _preprocessed(source: Path) -> Iterator[Path]:
    """A temporary copy of `source` after onnxruntime's pre-quantisation pass (shape inference
    and basic graph optimisation), the recommended input of both quantisers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=source.parent, prefix=".quant-") as tmp:
        path = Path(tmp) / source.name
        # Symbolic shape inference is for graphs with symbolic arithmetic on shapes (transformers);
        # ONNX's own shape inference covers these graphs, without needing sympy.
        quant_pre_process(str(source), str(path), skip_symbolic_shape=True)
        yield path


def _session_options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3  # errors only; the saved graph is checked afterwards
    return options


def _save(model: onnx.ModelProto, path: Path, variant: str) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[VARIANT_KEY] = variant
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path), save_as_external_data=False)


def _set_variant(path: Path, variant: str) -> None:
    _save(onnx.load(str(path)), path, variant)
    log.debug("wrote %s (%d bytes)", path, os.path.getsize(path))


# ---------------------------------------------------------------- the variants

# nats per 784 pixels (spec.nats_for_image): largest allowed |mean test -ELBO of the variant - fp32 torch's|
QUALITY_BUDGET = 0.5
FP32 = "fp32"  # the export itself; not a variant, but the source of every variant
ORT_SUFFIX = "-ort"
STATUSES = ("verified", "rejected", "failed")


@dataclass(frozen=True)
class VariantSpec:
    name: str  # manifest key, and the sampler's --variant (plus --format ort for the "-ort" ones)
    suffix: str  # file name = role + suffix
    description: str
    # produce(job) writes job.target from job.source and returns what it did, for the manifest
    produce: Callable[[Job], dict[str, Any]]
    # Largest |variant - torch fp32| per sub-model role, for every output, at every batch size.
    # Looser than fp32's 1e-4: these are the rounding errors the conversion itself brings.
    atol: Mapping[str, float]
    only_for: str | None = None  # a vae_dist.kinds.ModelKind flag a model kind must have for it to be made
    source: str = FP32  # the variant whose files it is made from
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to `produce`, recorded
    calibrated: bool = False  # needs calibration inputs (training images, and latents from them)

    @property
    def format(self) -> str:
        return "ort" if self.suffix.endswith(".ort") else "onnx"

    def filename(self, role: str) -> str:
        return f"{role}{self.suffix}"

    def applies_to(self, kind: str) -> bool:
        return self.only_for is None or getattr(MODEL_KINDS[kind], self.only_for)


# Per role: encoder outputs mu and logvar (values of a few units), decoder outputs x_mean in [0, 1].
FP16_ATOL = {"encoder": 2e-2, "decoder": 1e-2}
# int8 tolerances only catch a broken conversion (which moves pixels by ~0.5 or more); single
# pixels of a well-quantised 20-epoch CNN decoder already move by 0.15, so the quality budget,
# not this bound, judges the model.
INT8_ATOL = {"encoder": 0.5, "decoder": 0.25}

FP16 = VariantSpec(
    name="fp16",
    suffix=".fp16.onnx",
    description="float16 weights and arithmetic, float32 inputs and outputs (casts at the edges)",
    produce=to_fp16,
    atol=FP16_ATOL,
)
INT8_DYNAMIC = VariantSpec(
    name="int8-dynamic",
    suffix=".int8-dynamic.onnx",
    description="int8 weights of every Gemm/MatMul and Conv; activations quantised to uint8 on each call",
    produce=to_int8_dynamic,
    atol=INT8_ATOL,
    options={"weight_type": "QInt8", "per_channel": False, "reduce_range": False},
)
INT8_STATIC = VariantSpec(
    name="int8-static",
    suffix=".int8-static.onnx",
    description="int8 QDQ: weights and activations, activation ranges calibrated on training images",
    produce=to_int8_static,
    atol=INT8_ATOL,
    only_for="static_int8",
    calibrated=True,
    options={
        "calibration_images": 1000,
        # uint8 activations, int8 weights with 7-bit range: onnxruntime's advice for x86 CPUs
        # without VNNI, whose u8 x s8 dot products can saturate at the full 8 bits.
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": True,
        "calibrate_method": "MinMax",
        # ConvTranspose is left out: onnxruntime's CPU provider has no int8 kernel for it, so
        # QDQ around it only adds rounding and two extra ops (it would run in float anyway).
        "op_types": ["Conv", "Gemm", "MatMul"],
        # The encoder's output layer (mu and logvar, about 1% of its weights) stays float:
        # the KL term and the reparameterisation are sensitive to logvar's 8-bit steps.
        "float_output_layer": ["encoder"],
    },
)
ONNX_VARIANTS = (FP16, INT8_DYNAMIC, INT8_STATIC)


def _ort_copy(name: str, suffix: str, atol: Mapping[str, float], only_for: str | None) -> VariantSpec:
    return VariantSpec(
        name=f"{name}{ORT_SUFFIX}",
        suffix=suffix.removesuffix(".onnx") + ".ort",
        description=f"{name} in ORT format, optimised offline (hardware-independent optimisations only)",
        produce=to_ort_format,
        # The saved graph is onnxruntime's optimised one (fused nodes): the same tolerance as its source.
        atol=atol,
        only_for=only_for,
        source=name,
    )


# No fp16 copy: onnxruntime's CPU provider has no float16 Gemm/Conv kernels on x86, so the
# conversion inserts casts and folds the weights back to float32: the .ort file would be an fp32
# model as large as fp32-ort, specific to the converting machine. Convert fp16 on its target.
ORT_VARIANTS = (
    # onnxruntime's fused kernels only reorder float32 sums: the fp32 export's own tolerance
    _ort_copy(FP32, ".onnx", {"encoder": DEFAULT_ATOL, "decoder": DEFAULT_ATOL}, None),
    *(_ort_copy(v.name, v.suffix, v.atol, v.only_for) for v in (INT8_DYNAMIC, INT8_STATIC)),
)
VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (*ONNX_VARIANTS, *ORT_VARIANTS)}


def select(names: Iterable[str] | None, kind: str) -> list[VariantSpec]:
    """The variants to make for a model of `kind`: `names` (all when None) plus the variants
    they are made from, in dependency order; names that do not apply to `kind` are skipped."""
    wanted = set(VARIANTS) if names is None else set(names)
    unknown = wanted - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    for name in list(wanted):
        source = VARIANTS[name].source
        if source != FP32:
            wanted.add(source)
    return [v for v in VARIANTS.values() if v.name in wanted and v.applies_to(kind)]


def parse_names(text: str) -> list[str] | None:
    """The --variants option: "all" (None), "none" ([]) or a comma-separated list of names."""
    text = text.strip()
    if text == "all":
        return None
    if text in ("none", ""):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: all, none, {', '.join(VARIANTS)}")
    return names


# ---------------------------------------------------------------- calibration data


CALIBRATION_SEED = 0


def calibration_inputs(
    model: VAE, record: ModelRecord, count: int, data_root: str | Path | None = None
) -> dict[str, np.ndarray]:
    """Inputs for static quantisation, by role, drawn from Stream.CALIBRATION.

    encoder: `count` training images, drawn at random from the whole training split.
    decoder: what a decoder is fed in use: posterior samples z = mu + sigma * eps of those images
    (reconstruction) and as many draws from the prior N(0, I) (sampling).
    """
    train = splits.model_split(record.dataset, True, data_root)
    g = generator(CALIBRATION_SEED, Stream.CALIBRATION)
    x = splits.to_float(train[torch.randperm(len(train), generator=g)[:count]])
    with torch.no_grad():
        mu, logvar = model.eval().encode(x)
        posterior = model.reparameterize(mu, logvar, torch.randn(mu.shape, generator=g))
    prior = torch.randn(mu.shape, generator=g)
    return {"encoder": x.numpy(), "decoder": torch.cat([posterior, prior]).numpy()}
