"""The export of one sub-model: `spec.wrap(model)` traced by torch.onnx.export (dynamo) into one
self-contained ONNX file carrying its metadata. The pipeline (export.pipeline) calls it per spec."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import onnx
import torch

from export.spec import SubModelSpec
from vae_dist.errors import UserError
from vae_dist.models import VAE

log = logging.getLogger(__name__)

MAX_SINGLE_FILE = 2**31 - 1  # protobuf's limit: beyond it ONNX needs external data files


class ExportError(UserError):
    """The model could not be written as a single self-contained ONNX file."""


def versions() -> dict[str, str]:
    """Versions of the software that produces (and verifies) an export."""
    import numpy
    import onnxruntime
    import onnxscript

    from vae_dist.version import __version__

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "vae_dist": __version__,
        "python": platform.python_version(),
    }


def export_submodel(model: VAE, spec: SubModelSpec, path: Path, opset: int, metadata: dict[str, str]) -> Path:
    """Trace `spec.wrap(model)` with torch.onnx.export (dynamo) and write one self-contained file."""
    module = spec.wrap(model).eval()
    program = torch.onnx.export(
        module,
        spec.example_inputs(),
        dynamo=True,  # torch.export-based exporter; the default since torch 2.9, stated for older ones
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=opset,
        dynamic_shapes=spec.dynamic_shapes(),
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto
    # Below its native opset the exporter converts down, and keeps its own opset when it cannot.
    got = opset_of(proto)
    if got != opset:
        raise ExportError(f"{spec.filename}: the exporter could not target opset {opset} (it produced {got})")
    proto.graph.name = f"vae_dist_{spec.role}"
    proto.doc_string = f"vae-dist {metadata['model_kind']} VAE {spec.role}: {_signature(spec)}"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{spec.filename}: weights left in external data ({external[:3]}...)")
    if proto.ByteSize() > MAX_SINGLE_FILE:
        raise ExportError(f"{spec.filename}: {proto.ByteSize()} bytes does not fit in one ONNX file (2 GiB limit)")
    onnx.save_model(proto, str(path), save_as_external_data=False)
    log.info("exported %s (%d bytes, opset %d)", path.name, path.stat().st_size, opset)  # path: a staging folder
    return path


def opset_of(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _signature(spec: SubModelSpec) -> str:
    def fmt(ts):
        return ", ".join(f"{t.name} float32 {list(t.dims)}" for t in ts)

    return f"{fmt(spec.inputs)} -> {fmt(spec.outputs)}"
