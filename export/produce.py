"""Making the edge variants (see export.variants for what each one is).

Every function takes a `Job` (one source file, one target file) and returns a JSON-friendly
record of what it did: the tool and options, the operator census before and after, for quantised
graphs what was and was not quantised, and the operators onnxruntime actually runs after its own
graph optimisations (a QDQ pair around an operator without an int8 kernel still runs in float).

Only onnxruntime's own tools are used: `onnxruntime.transformers.float16` for fp16,
`onnxruntime.quantization` for int8, and SessionOptions.optimized_model_filepath with
"session.save_model_format" = "ORT" for the ORT format (what
`python -m onnxruntime.tools.convert_onnx_models_to_ort` does).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

# Operators that carry weights, and the integer operators quantisation turns them into.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
INTEGER_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
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


# ---------------------------------------------------------------- the conversions


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
            pre, job.target,
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
            pre, job.target, _Calibration(input_name, job.calibration),
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


def write_required_operators(ort_files: list[Path], path: Path) -> Path:
    """The operator list a minimal onnxruntime build needs for `ort_files`
    (build.sh --minimal_build --include_ops_by_config PATH)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    create_config_from_models([f.resolve() for f in ort_files], path, False)
    # The tool lists the models by absolute path; keep only their names, which stay true when
    # the export folder is moved.
    lines = [
        f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in path.read_text().splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")
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
        return node is not None and node.op_type == "DequantizeLinear" and (not from_initializer or node.input[0] in int8)

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
    props["variant"] = variant
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path), save_as_external_data=False)


def _set_variant(path: Path, variant: str) -> None:
    _save(onnx.load(str(path)), path, variant)
    log.debug("wrote %s (%d bytes)", path, os.path.getsize(path))
