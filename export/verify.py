"""Verification of an export folder against the torch model it came from.

Per file: the ONNX checker (full_check), self-containment, no random operator, the metadata, the
declared inputs and outputs (dynamic batch axis), then onnxruntime (CPUExecutionProvider) against
torch at several batch sizes (encoder on real test images, decoder on N(0, I) latents): output
names first, then shapes, then values.

End to end: the mean -ELBO over the whole test split computed through the two ONNX files, with the
same fixed noise as the torch side, must equal torch's within `ELBO_TOL` nats per 784 pixels
(`spec.nats_for_image`). The decoder's contract output is the mean x_mean, not logits, so the
Bernoulli NLL is computed from probabilities (float64, clipped to [PROB_EPS, 1 - PROB_EPS],
vae_dist.losses); torch's value is computed the same way from its own sigmoid output, and also the
native way from logits (as training reports it), which is recorded but not judged.
The reconstruction error (decode(mu) against the image) is recorded beside it.

The same pieces judge the edge variants (`judge`): `verify_files` checks any encoder and decoder
pair of a spec against the variant's own tolerance, ORT-format files included (through their
onnxruntime session, since the onnx package cannot read them), then the variant's quality cost on
the whole test split is measured against the fp32 torch model:

    neg_elbo_change   mean test -ELBO through the variant's encoder and decoder, minus fp32 torch's
    recon_mse_change  mean squared error per pixel of decode(mu) against the image, minus fp32 torch's

A variant is "verified" when every check passed and |neg_elbo_change| is within the budget;
otherwise it is "rejected", with the reasons. See docs/export.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.sample import session_options
from export.spec import BATCH_AXIS, ELBO_TOL, RANDOM_OPS, SubModelSpec, identity_metadata, nats_for_image, vae_specs
from vae_dist.data import splits
from vae_dist.epoch_end import evaluation_noise
from vae_dist.losses import kl_to_standard_normal, neg_elbo_from_mean, negative_elbo
from vae_dist.models import VAE
from vae_dist.record import ModelRecord
from vae_dist.rng import Stream, generator

if TYPE_CHECKING:
    from export.variants import VariantSpec

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 7, 128)
LATENT_SEED = 0  # the decoder is checked on N(0, I) latents from Stream.VERIFY_LATENTS with this seed
# Relative difference = |onnx - torch| / max(|torch|, REL_FLOOR); without the floor, values near 0
# (the background pixels of x_mean) turn float32 rounding into huge ratios.
REL_FLOOR = 1e-4
CHUNK = 1000  # test images per onnxruntime call in the end-to-end check


@dataclass
class Check:
    """One verdict. Value checks carry the output, batch size and differences."""

    file: str  # "encoder.onnx", or "" for whole-export checks
    # exists | load | checker | self_contained | random_ops | metadata | io | session | run | names
    # | shape | values | elbo | source
    check: str
    passed: bool
    detail: str = ""
    output: str | None = None
    batch: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    tol: float | None = None

    def __post_init__(self):
        self.passed = bool(self.passed)  # numpy's bool_ is not JSON serialisable


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    elbo: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def worst_values(self) -> dict[tuple[str, str], Check]:
        """Per (file, output), the worst value check: a failing one first, then the largest difference."""
        worst: dict[tuple[str, str], Check] = {}
        for c in self.checks:
            if c.check != "values":
                continue
            key = (c.file, c.output)
            if key not in worst or _worse(c, worst[key]):
                worst[key] = c
        return worst

    def failure_lines(self) -> list[str]:
        """A changed source model first (it explains the rest); then every failing output once, with
        its worst difference; then every other failure."""
        lines = [f"export: source: {c.detail}" for c in self.failures() if c.check == "source"]
        lines += [
            f"{c.file}: output {c.output!r} max abs diff {c.max_abs:.3e} (max rel {c.max_rel:.3e}, "
            f"batch {c.batch}) exceeds atol {c.tol:.1e}{'; ' + c.detail if c.detail else ''}"
            for c in self.worst_values().values()
            if not c.passed
        ]
        others = [c for c in self.failures() if c.check not in ("values", "source")]
        lines += [f"{c.file or 'export'}: {c.check}: {c.detail}" for c in others]
        return list(dict.fromkeys(lines))  # a check repeated per batch size fails the same way: said once

    def summary_lines(self) -> list[str]:
        lines = [
            f"{file} {output}: max abs diff {c.max_abs:.2e}, max rel diff {c.max_rel:.2e} "
            f"(batch sizes {', '.join(str(b) for b in self._batches(file, output))}, atol {c.tol:.0e})"
            for (file, output), c in self.worst_values().items()
        ]
        if self.elbo:
            e = self.elbo
            lines.append(
                f"-ELBO on all {e['images']} test images (nats): onnx {e['onnx']:.4f}, torch {e['torch']:.4f} "
                f"(|diff| {e['diff']:.1e}), torch from logits {e['torch_native']:.4f} "
                f"(|diff| {e['diff_native']:.1e}); tolerance {e['tol']:.3g}"
            )
            if e.get("recorded") is not None:
                lines.append(self._record_line(e))
        return lines

    @staticmethod
    def _record_line(e: dict[str, Any]) -> str:
        """Training's figure, said with what it was measured on: not always the whole test split."""
        line = f"training's recorded -ELBO: {e['recorded']:.4f} nats"
        count, now = e.get("recorded_images"), e.get("recorded_images_torch_native")
        if e.get("recorded_binarized"):
            return f"{line}, on binarised copies of {count or 'the'} test images (the check above: the images as given)"
        if count is None:
            return f"{line}, on a number of test images the run did not record"
        if count == e["images"]:
            return f"{line}, on the same {count} test images"
        where = f"{line}, on the first {count} test images only (data.test_subset)"
        return where + (f"; torch from logits on those now: {now:.4f}" if now is not None else "")

    def _batches(self, file: str, output: str) -> list[int]:
        return sorted({c.batch for c in self.checks if c.check == "values" and (c.file, c.output) == (file, output)})

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "onnxruntime": ort.__version__,  # the runtime the verdict holds for
            "failures": self.failure_lines(),
            "outputs": {
                f"{file}:{output}": {"max_abs": c.max_abs, "max_rel": c.max_rel, "atol": c.tol, "passed": c.passed}
                for (file, output), c in self.worst_values().items()
            },
            "elbo": self.elbo,
            "checks": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.checks],
        }


def _worse(a: Check, b: Check) -> bool:
    if a.passed != b.passed:
        return not a.passed
    return math.isnan(a.max_abs) or a.max_abs > b.max_abs


# ---------------------------------------------------------------- the graph itself


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """All nodes, including those in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def random_ops(model: onnx.ModelProto) -> list[str]:
    """Random operators anywhere in the model, local functions included."""
    nodes = list(iter_nodes(model.graph))
    for fn in model.functions:
        nodes += list(fn.node)
    return sorted({n.op_type for n in nodes if n.op_type in RANDOM_OPS})


def _graph_io(values) -> list[tuple[str, str, list]]:
    """(name, element type, dims) of graph inputs or outputs; '?' for an unknown dimension."""
    found = []
    for v in values:
        tt = v.type.tensor_type
        dims = [
            d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in tt.shape.dim
        ]
        found.append((v.name, onnx.TensorProto.DataType.Name(tt.elem_type), dims))
    return found


def _session_io(args) -> list[tuple[str, str, list]]:
    """The same view of an onnxruntime session's inputs or outputs ("tensor(float)" -> "FLOAT")."""
    return [
        (
            a.name,
            a.type.removeprefix("tensor(").removesuffix(")").upper(),
            [d if d is not None else "?" for d in a.shape],
        )
        for a in args
    ]


def _io_problems(found: list[tuple[str, str, list]], specs) -> list[str]:
    problems = []
    got = [name for name, _, _ in found]
    want = [t.name for t in specs]
    if got != want:
        return [f"expected {want}, found {got}"]
    for (name, elem_type, dims), t in zip(found, specs):
        if elem_type != "FLOAT":
            problems.append(f"{name} is {elem_type}, expected FLOAT")
        ok = len(dims) == len(t.dims) and all(
            (isinstance(g, str) and g != "?") if w == BATCH_AXIS else g == w for g, w in zip(dims, t.dims)
        )
        if not ok:
            problems.append(f"{name} has dims {dims}, expected {list(t.dims)} (dynamic {BATCH_AXIS!r} axis)")
    return problems


def check_graph(path: Path, spec: SubModelSpec, expected_meta: dict[str, str]) -> list[Check]:
    """Static checks of one file; `expected_meta` holds the metadata values that must match."""
    name = path.name
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        return [Check(name, "load", False, f"not an ONNX model: {e}".splitlines()[0])]
    checks = []
    try:
        onnx.checker.check_model(model, full_check=True)
        checks.append(Check(name, "checker", True))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        checks.append(Check(name, "checker", False, str(e).strip().splitlines()[0]))

    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    detail = f"weights stored outside the file: {external[:5]}" if external else ""
    checks.append(Check(name, "self_contained", not external, detail))

    found = random_ops(model)
    checks.append(Check(name, "random_ops", not found, f"random operators in the graph: {found}" if found else ""))

    meta = {p.key: p.value for p in model.metadata_props}
    wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in expected_meta.items() if meta.get(k) != v]
    checks.append(Check(name, "metadata", not wrong, "; ".join(wrong)))

    problems = _io_problems(_graph_io(model.graph.input), spec.inputs) + _io_problems(
        _graph_io(model.graph.output), spec.outputs
    )
    checks.append(Check(name, "io", not problems, "; ".join(problems)))
    return checks


ORT_FORMAT_ID = b"ORTM"  # flatbuffers file identifier of onnxruntime's ORT format, at bytes 4-8


def is_ort_format(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8)[4:8] == ORT_FORMAT_ID


def check_session(session: ort.InferenceSession, spec: SubModelSpec, expected_meta: dict[str, str]) -> list[Check]:
    """Checks of a file that only onnxruntime can read (ORT format): metadata and signature."""
    name = spec.filename
    meta = session.get_modelmeta().custom_metadata_map
    wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in expected_meta.items() if meta.get(k) != v]
    problems = _io_problems(_session_io(session.get_inputs()), spec.inputs) + _io_problems(
        _session_io(session.get_outputs()), spec.outputs
    )
    return [Check(name, "metadata", not wrong, "; ".join(wrong)), Check(name, "io", not problems, "; ".join(problems))]


# ---------------------------------------------------------------- numbers


def open_session(path: Path) -> ort.InferenceSession:
    # The sampler's options: int8 variants are judged by exact int8 arithmetic.
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def compare(
    spec: SubModelSpec,
    session: ort.InferenceSession,
    reference: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    inputs: np.ndarray,
) -> list[Check]:
    """onnxruntime against torch on one batch: names, then shapes, then values."""
    name, batch = spec.filename, inputs.shape[0]
    got_names = [o.name for o in session.get_outputs()]
    if got_names != spec.output_names:
        return [Check(name, "names", False, f"outputs {got_names}, expected {spec.output_names}", batch=batch)]
    try:
        outputs = session.run(None, {spec.inputs[0].name: inputs})
    except Exception as e:  # onnxruntime's own exception types, e.g. a batch size baked into the graph
        return [Check(name, "run", False, f"onnxruntime failed at batch {batch}: {e}".splitlines()[0], batch=batch)]
    with torch.no_grad():
        expected = [t.numpy() for t in reference(torch.from_numpy(inputs))]
    checks = []
    for t, got, want in zip(spec.outputs, outputs, expected):
        shape = t.shape_for(batch)
        if tuple(got.shape) != shape:
            detail = f"{t.name} has shape {list(got.shape)}, expected {list(shape)}"
            checks.append(Check(name, "shape", False, detail, output=t.name, batch=batch))
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(want.astype(np.float64)), REL_FLOOR)).max()) if diff.size else 0.0
        passed = got.dtype == np.float32 and math.isfinite(max_abs) and max_abs <= spec.atol
        detail = "" if got.dtype == np.float32 else f"dtype {got.dtype}, expected float32"
        checks.append(Check(name, "values", passed, detail, t.name, batch, max_abs, max_rel, spec.atol))
    return checks


def _neg_elbo_sum(x_mean, x, mu, logvar, likelihood: str) -> float:
    """Sum over images of the -ELBO from the decoder's mean (vae_dist.losses), arrays or tensors."""
    t = [torch.as_tensor(a) for a in (x_mean, x, mu, logvar)]
    return neg_elbo_from_mean(*t, likelihood).sum().item()


@dataclass
class Scores:
    """Mean scores of one pipeline over the test images, both computed in float64."""

    neg_elbo: float  # -ELBO from the decoder mean, with the fixed evaluation noise
    recon_mse: float  # squared error per pixel of decode(mu), the reconstruction, against x


def torch_scores(model: VAE, images: torch.Tensor, eps: torch.Tensor, likelihood: str) -> tuple[Scores, float]:
    """The fp32 torch model's scores on uint8 `images`, and its -ELBO from logits (training's form)."""
    n = images.shape[0]
    neg_elbo = native = sq_err = 0.0
    with torch.no_grad():
        for lo in range(0, n, CHUNK):
            x = splits.to_float(images[lo : lo + CHUNK])
            mu, logvar = model.encode(x)
            logits = model.decode(model.reparameterize(mu, logvar, eps[lo : lo + CHUNK]))
            kl = kl_to_standard_normal(mu, logvar)
            native += negative_elbo(logits, x, kl, 1.0, likelihood).neg_elbo().double().sum().item()
            neg_elbo += _neg_elbo_sum(torch.sigmoid(logits), x, mu, logvar, likelihood)
            sq_err += _squared_error(torch.sigmoid(model.decode(mu)).numpy(), x.numpy())
    return Scores(neg_elbo / n, sq_err / images[0].numel() / n), native / n


def onnx_scores(
    encoder: ort.InferenceSession,
    decoder: ort.InferenceSession,
    images: torch.Tensor,
    eps: torch.Tensor,
    likelihood: str,
) -> Scores:
    """The same scores through an encoder and a decoder session, the host reparameterising
    exactly like export/sample.py does."""
    n = images.shape[0]
    neg_elbo = sq_err = 0.0
    for lo in range(0, n, CHUNK):
        x = splits.to_float(images[lo : lo + CHUNK]).numpy()
        mu, logvar = encoder.run(["mu", "logvar"], {"x": x})
        z = mu + np.exp(np.float32(0.5) * logvar) * eps[lo : lo + CHUNK].numpy()
        (x_mean,) = decoder.run(["x_mean"], {"z": z.astype(np.float32)})
        neg_elbo += _neg_elbo_sum(x_mean, x, mu, logvar, likelihood)
        (recon,) = decoder.run(["x_mean"], {"z": mu})
        sq_err += _squared_error(recon, x)
    return Scores(neg_elbo / n, sq_err / images[0].numel() / n)


def _squared_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.square(got.astype(np.float64) - want.astype(np.float64)).sum())


def elbo_check(
    encoder: ort.InferenceSession,
    decoder: ort.InferenceSession,
    model: VAE,
    images: torch.Tensor,
    likelihood: str,
    tol: float,
    seed: int,
) -> tuple[dict[str, Any], list[Check]]:
    """Mean -ELBO over `images` (uint8 [N, C, H, W]) through ONNX and through torch, same noise and
    same formula (from the decoder's probabilities), within `tol` nats per ELBO_TOL_PIXELS pixels.
    torch's figure from logits, as training reports it, is recorded beside them, not judged: the gap
    to it comes from float32 probabilities rounding to 1 (or 0) where the logits are large, the same
    in onnxruntime and torch, and grows with the number of such pixels (docs/export.md)."""
    n = images.shape[0]
    tol = nats_for_image(tol, images.shape[1:])
    eps = evaluation_noise(n, model.latent_dim, seed)
    reference, native = torch_scores(model, images, eps, likelihood)
    got = onnx_scores(encoder, decoder, images, eps, likelihood)
    result = {"onnx": got.neg_elbo, "torch": reference.neg_elbo, "torch_native": native}
    result["diff"] = abs(result["onnx"] - result["torch"])
    result["diff_native"] = abs(result["onnx"] - result["torch_native"])
    result.update(
        images=n,
        tol=tol,
        likelihood=likelihood,
        noise_seed=seed,
        recon_mse_onnx=got.recon_mse,
        recon_mse_torch=reference.recon_mse,
    )
    checks = [
        Check(
            "",
            "elbo",
            _within(result["diff"], tol),
            f"-ELBO onnx {result['onnx']:.4f} vs torch {result['torch']:.4f} nats: "
            f"|diff| {result['diff']:.4f} > {tol:.3g}",
            max_abs=result["diff"],
            tol=tol,
        ),
    ]
    for c in checks:
        if c.passed:
            c.detail = ""
    return result, checks


def _within(diff: float, tol: float) -> bool:
    return math.isfinite(diff) and diff <= tol


# ---------------------------------------------------------------- the whole export


def load_test_images(model: VAE, record: ModelRecord, data_root: str | Path | None = None) -> torch.Tensor:
    """The real test split of the run's data set, uint8 [N, C, H, W]; never downloads."""
    return splits.split_for_model(record.dataset, model.image_shape, False, data_root)


def verify_files(
    onnx_dir: Path,
    specs: tuple[SubModelSpec, ...],
    model: VAE,
    record: ModelRecord,
    images: torch.Tensor,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> tuple[list[Check], dict[str, ort.InferenceSession]]:
    """Every file of `specs` in `onnx_dir` against `model`: its static checks, then onnxruntime
    against torch at `batch_sizes` (encoder on real test images, decoder on N(0, I) latents),
    each output within its spec's atol. ORT-format files (onnxruntime's own format, which the
    onnx package cannot read) are checked through their session. Returns the checks and the
    sessions that could be opened, by role."""
    if images.shape[0] < max(batch_sizes):  # a small test split: its images, repeated, fill the batch
        images = images[torch.arange(max(batch_sizes)) % images.shape[0]]
    model.eval()
    checks: list[Check] = []
    sessions: dict[str, ort.InferenceSession] = {}
    g = generator(LATENT_SEED, Stream.VERIFY_LATENTS)
    latents = torch.randn(max(batch_sizes), model.latent_dim, generator=g).numpy()
    for spec in specs:
        path = onnx_dir / spec.filename
        if not path.is_file():
            checks.append(Check(spec.filename, "exists", False, f"{path} not found"))
            continue
        expected = identity_metadata(spec.role, record)
        ort_format = is_ort_format(path)
        if not ort_format:
            checks += check_graph(path, spec, expected)
        elif not spec.suffix.endswith(".ort"):
            checks.append(Check(spec.filename, "load", False, "an ORT-format file under an .onnx name"))
        try:
            session = open_session(path)
        except Exception as e:  # onnxruntime raises its own exception types
            checks.append(Check(spec.filename, "session", False, f"onnxruntime cannot load it: {e}".splitlines()[0]))
            continue
        if ort_format:
            checks += check_session(session, spec, expected)
        sessions[spec.role] = session
        if spec.role == "encoder":
            reference, batches = model.encode, [splits.to_float(images[:b]).numpy() for b in batch_sizes]
        else:
            reference, batches = (lambda z: (torch.sigmoid(model.decode(z)),)), [latents[:b] for b in batch_sizes]
        for inputs in batches:
            checks += compare(spec, session, reference, np.ascontiguousarray(inputs))
    return checks, sessions


def verify_export(
    onnx_dir: Path,
    model: VAE,
    record: ModelRecord,
    atol: float | None = None,
    data_root: str | Path | None = None,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    elbo_tol: float = ELBO_TOL,
    recorded_images: int | None = None,
) -> Report:
    """Verify encoder.onnx and decoder.onnx in `onnx_dir` against `model` on the run's real test split.

    `recorded_images`: how many test images (the first ones) training's recorded -ELBO, the model
    file's test_neg_elbo, was measured on, when known; torch's figure on those is recorded beside it.
    """
    onnx_dir = Path(onnx_dir)
    model.eval()
    images = load_test_images(model, record, data_root)
    report = Report()
    report.checks, sessions = verify_files(onnx_dir, vae_specs(model, atol), model, record, images, batch_sizes)
    if len(sessions) == 2:
        try:
            report.elbo, checks = elbo_check(
                sessions["encoder"],
                sessions["decoder"],
                model,
                images,
                record.likelihood,
                elbo_tol,
                record.eval_seed,
            )
        except Exception as e:  # e.g. a graph that runs at batch 128 but not at 1000
            checks = [Check("", "elbo", False, f"end-to-end run failed: {e}".splitlines()[0])]
        report.checks += checks
        if report.elbo and record.test_neg_elbo is not None:
            report.elbo.update(_training_record(model, record, images, recorded_images, report.elbo))
    return report


def _training_record(
    model: VAE, record: ModelRecord, images: torch.Tensor, count: int | None, elbo: dict[str, Any]
) -> dict[str, Any]:
    """Training's own -ELBO figure, and torch's now on the images it was measured on (training
    evaluates the first data.test_subset images, with the evaluation noise drawn for that many)."""
    figures: dict[str, Any] = {"recorded": record.test_neg_elbo, "recorded_images": count}
    if record.binarize == "dynamic":  # training measured binarised copies; this check, the images as they are
        figures["recorded_binarized"] = True
        return figures
    if count is None or count > images.shape[0]:
        return figures
    if count == images.shape[0]:
        native = elbo["torch_native"]
    else:
        noise = evaluation_noise(count, model.latent_dim, elbo["noise_seed"])
        _, native = torch_scores(model, images[:count], noise, elbo["likelihood"])
    figures["recorded_images_torch_native"] = native
    return figures


# ---------------------------------------------------------------- edge variants


@dataclass
class Reference:
    """The fp32 torch model on the test split: computed once, shared by every variant."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    eps: torch.Tensor  # the fixed noise, one row per image
    likelihood: str
    scores: Scores
    seed: int

    @classmethod
    def compute(cls, model: VAE, record: ModelRecord, images: torch.Tensor) -> Reference:
        seed, likelihood = record.eval_seed, record.likelihood
        eps = evaluation_noise(images.shape[0], model.latent_dim, seed)
        scores, _ = torch_scores(model.eval(), images, eps, likelihood)
        return cls(images, eps, likelihood, scores, seed)

    @classmethod
    def from_elbo(cls, elbo: dict[str, Any], model: VAE, images: torch.Tensor) -> Reference:
        """The reference that the fp32 verification (`elbo_check`) already computed."""
        assert elbo.get("images") == images.shape[0], "the -ELBO record covers other images"
        seed = elbo["noise_seed"]
        eps = evaluation_noise(images.shape[0], model.latent_dim, seed)
        return cls(images, eps, elbo["likelihood"], Scores(elbo["torch"], elbo["recon_mse_torch"]), seed)


@dataclass
class Verdict:
    status: str  # "verified" | "rejected"
    reasons: list[str]
    report: Report
    quality: dict[str, Any] | None = None
    specs: tuple[SubModelSpec, ...] = field(default_factory=tuple)


def variant_specs(model: VAE, variant: VariantSpec) -> tuple[SubModelSpec, ...]:
    """The fp32 contract, in the variant's files, with the variant's tolerances."""
    return tuple(s.with_file(variant.suffix, variant.atol[s.role]) for s in vae_specs(model))


def judge(
    onnx_dir: Path,
    variant: VariantSpec,
    model: VAE,
    record: ModelRecord,
    reference: Reference,
    budget: float,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Verdict:
    """Check the variant's files in `onnx_dir` and measure what the conversion costs, against
    `budget` nats of -ELBO per 784 pixels (`spec.nats_for_image`)."""
    budget = nats_for_image(budget, model.image_shape)
    specs = variant_specs(model, variant)
    checks, sessions = verify_files(Path(onnx_dir), specs, model, record, reference.images, batch_sizes)
    report = Report(checks)
    quality = None
    if len(sessions) == 2:
        try:
            got = onnx_scores(
                sessions["encoder"], sessions["decoder"], reference.images, reference.eps, reference.likelihood
            )
            quality = quality_record(got, reference, budget)
        except Exception as e:  # onnxruntime's own exception types, e.g. at batch 1000
            report.checks.append(Check("", "quality", False, f"end-to-end run failed: {e}".splitlines()[0]))
    reasons = report.failure_lines()
    if quality is not None and not quality["within_budget"]:
        reasons.append(
            f"quality: mean test -ELBO changed by {quality['neg_elbo_change']:+.4f} nats against fp32 torch; "
            f"the budget is {budget:.3g}"
        )
    return Verdict("rejected" if reasons else "verified", reasons, report, quality, specs)


def quality_record(got: Scores, reference: Reference, budget: float) -> dict[str, Any]:
    change = got.neg_elbo - reference.scores.neg_elbo
    return {
        "images": int(reference.images.shape[0]),
        "likelihood": reference.likelihood,
        "noise_seed": reference.seed,
        "neg_elbo": got.neg_elbo,
        "neg_elbo_fp32_torch": reference.scores.neg_elbo,
        "neg_elbo_change": change,
        "recon_mse": got.recon_mse,
        "recon_mse_fp32_torch": reference.scores.recon_mse,
        "recon_mse_change": got.recon_mse - reference.scores.recon_mse,
        "budget": budget,
        # NaN (a broken graph) is never within budget
        "within_budget": bool(math.isfinite(change) and abs(change) <= budget),
    }
