"""Edge variants of an export: what each one is, kept apart from how it is made (export.produce)
and how it is judged (export.quality).

A variant is another encoder/decoder pair beside the fp32 files, with the same inputs and outputs
(float32 in, float32 out), made from the verified fp32 files:

    name               files                                   made by
    fp16               encoder.fp16.onnx, decoder.fp16.onnx    float16 weights and arithmetic, float32 I/O
    int8-dynamic       encoder.int8-dynamic.onnx, ...          int8 weights, activations quantised per call
    int8-static        encoder.int8-static.onnx, ...           int8 QDQ, activation ranges calibrated on
                                                               training images (CNN VAE only)
    fp32-ort           encoder.ort, decoder.ort                ORT format (mobile and minimal onnxruntime
    int8-dynamic-ort, int8-static-ort                          builds) of fp32 and the int8 variants

Each variant is checked like the fp32 files, against its own tolerance per sub-model (its
`atol`: the largest |variant - torch fp32| of any output at batch 1, 7 and 128), and its quality
cost is measured on the whole test split. A variant whose mean test -ELBO moves by more than the
quality budget (QUALITY_BUDGET nats, `vae-dist export --quality-budget`) is "rejected".

Manifest statuses: "verified" (checks passed, within budget), "rejected" (files present, but a
check failed or the budget was exceeded; the reasons say which) and "failed" (not produced).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from export import produce
from export.spec import DEFAULT_ATOL

QUALITY_BUDGET = 0.5  # nats: largest allowed |mean test -ELBO of the variant - fp32 torch's|
FP32 = "fp32"  # the export itself; not a variant, but the source of every variant
ORT_SUFFIX = "-ort"
STATUSES = ("verified", "rejected", "failed")


@dataclass(frozen=True)
class VariantSpec:
    name: str  # manifest key, and the sampler's --variant (plus --format ort for the "-ort" ones)
    suffix: str  # file name = role + suffix
    description: str
    # produce(job) writes job.target from job.source and returns what it did, for the manifest
    produce: Callable[[produce.Job], dict[str, Any]]
    # Largest |variant - torch fp32| per sub-model role, for every output, at every batch size.
    # Looser than fp32's 1e-4: these are the rounding errors the conversion itself brings.
    atol: Mapping[str, float]
    kinds: tuple[str, ...] = ("linear", "conv")  # model kinds it is made for
    source: str = FP32  # the variant whose files it is made from
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to `produce`, recorded
    calibrated: bool = False  # needs calibration inputs (training images, and latents from them)

    @property
    def format(self) -> str:
        return "ort" if self.suffix.endswith(".ort") else "onnx"

    def filename(self, role: str) -> str:
        return f"{role}{self.suffix}"

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds


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
    produce=produce.to_fp16,
    atol=FP16_ATOL,
)
INT8_DYNAMIC = VariantSpec(
    name="int8-dynamic",
    suffix=".int8-dynamic.onnx",
    description="int8 weights of every Gemm/MatMul and Conv; activations quantised to uint8 on each call",
    produce=produce.to_int8_dynamic,
    atol=INT8_ATOL,
    options={"weight_type": "QInt8", "per_channel": False, "reduce_range": False},
)
INT8_STATIC = VariantSpec(
    name="int8-static",
    suffix=".int8-static.onnx",
    description="int8 QDQ: weights and activations, activation ranges calibrated on training images",
    produce=produce.to_int8_static,
    atol=INT8_ATOL,
    kinds=("conv",),
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


def _ort_copy(name: str, suffix: str, atol: Mapping[str, float], kinds: tuple[str, ...]) -> VariantSpec:
    return VariantSpec(
        name=f"{name}{ORT_SUFFIX}",
        suffix=suffix.removesuffix(".onnx") + ".ort",
        description=f"{name} in ORT format, optimised offline (hardware-independent optimisations only)",
        produce=produce.to_ort_format,
        # The saved graph is onnxruntime's optimised one (fused nodes): the same tolerance as its source.
        atol=atol,
        kinds=kinds,
        source=name,
    )


# No fp16 copy: onnxruntime's CPU provider has no float16 Gemm/Conv kernels on x86, so the
# conversion inserts casts and folds the weights back to float32: the .ort file would be an fp32
# model as large as fp32-ort, specific to the converting machine. Convert fp16 on its target.
ORT_VARIANTS = (
    # onnxruntime's fused kernels only reorder float32 sums: the fp32 export's own tolerance
    _ort_copy(FP32, ".onnx", {"encoder": DEFAULT_ATOL, "decoder": DEFAULT_ATOL}, ("linear", "conv")),
    *(_ort_copy(v.name, v.suffix, v.atol, v.kinds) for v in (INT8_DYNAMIC, INT8_STATIC)),
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
