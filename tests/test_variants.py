"""Edge variants (fp16, int8 dynamic, int8 static QDQ, ORT format): their export, verification,
quality cost on the real Fashion-MNIST test split, rejection, and use by the torch-free sampler."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from export import sample as sampler
from export import variants as variants_lib
from export.manifest import file_record
from export.pipeline import export_run
from export.variants import QUALITY_BUDGET, VARIANTS, census
from export.verify import ORT_FORMAT_ID
from helpers import LATENT, cli, make_run, run_sampler, shift_initializer, write_idx

KINDS = {"linear": "gaussian", "conv": "bernoulli"}  # both -ELBO forms, as in test_export.py
EXPECTED = {
    "linear": ["fp16", "int8-dynamic", "fp32-ort", "int8-dynamic-ort"],
    "conv": ["fp16", "int8-dynamic", "int8-static", "fp32-ort", "int8-dynamic-ort", "int8-static-ort"],
}


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory) -> Path:
    """One tiny run of each kind, exported with every variant by `vae-dist export`."""
    runs = tmp_path_factory.mktemp("runs")
    for kind, likelihood in KINDS.items():
        make_run(runs, kind, kind, likelihood)
    result = CliRunner().invoke(cli(), ["export", "--output-dir", str(runs)])
    assert result.exit_code == 0, result.output
    budget = "variants (quality budget 0.5 nats of test -ELBO per 784 pixels: 0.5 nats for 1x28x28 images):"
    assert result.output.count(budget) == 2
    return runs


@pytest.fixture(scope="module")
def float_images(test_images) -> np.ndarray:
    return test_images[:5].astype(np.float32) / 255


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- the export


@pytest.mark.parametrize("kind", KINDS)
def test_every_variant_is_made_verified_measured_and_listed(variant_runs, kind):
    folder = variant_runs / kind / "onnx"
    manifest = manifest_of(folder)
    assert manifest["verified"] is True and manifest["quality_budget"] == QUALITY_BUDGET
    assert list(manifest["variants"]) == EXPECTED[kind]
    for name, entry in manifest["variants"].items():
        spec = VARIANTS[name]
        assert entry["status"] == "verified" and entry["reasons"] == [], (name, entry["reasons"])
        assert entry["format"] == spec.format and entry["source"] == spec.source
        assert entry["tolerance"] == dict(spec.atol)
        assert set(entry["files"]) == {spec.filename("encoder"), spec.filename("decoder")}
        for filename, record in entry["files"].items():
            assert record["sha256"] == file_record(folder / filename)["sha256"]
            assert record["inputs"] and record["outputs"]
        # Verified like the fp32 files: every output at batch 1, 7 and 128, within the variant's tolerance.
        v = entry["verification"]
        assert v["passed"] and v["failures"] == []
        values = {(c["file"], c["output"], c["batch"]) for c in v["checks"] if c["check"] == "values"}
        assert len(values) == 3 * 3
        assert all(o["max_abs"] <= spec.atol[o_name.split(".")[0]] for o_name, o in v["outputs"].items())
        # Quality cost on the whole real test split, against fp32 torch.
        q = entry["quality"]
        assert q["images"] == 10000 and q["likelihood"] == KINDS[kind] and q["budget"] == QUALITY_BUDGET
        assert q["within_budget"] and abs(q["neg_elbo_change"]) <= QUALITY_BUDGET
        assert q["neg_elbo_change"] == pytest.approx(q["neg_elbo"] - q["neg_elbo_fp32_torch"])
        assert q["recon_mse_change"] == pytest.approx(q["recon_mse"] - q["recon_mse_fp32_torch"])
        assert 0 < q["recon_mse"] < 1
    # The fp32 reference of every variant is the one the fp32 verification computed.
    elbo = manifest["verification"]["elbo"]
    assert {e["quality"]["neg_elbo_fp32_torch"] for e in manifest["variants"].values()} == {elbo["torch"]}
    assert elbo["recon_mse_onnx"] == pytest.approx(elbo["recon_mse_torch"], rel=1e-4)
    # A minimal onnxruntime build's operator list for the ORT files.
    ops = manifest["required_operators"]
    assert ops["file"] == "required_operators.config" and len(ops["models"]) == 2 * sum(
        n.endswith("-ort") for n in EXPECTED[kind]
    )
    text = (folder / "required_operators.config").read_text()
    assert "Gemm" in text and str(folder) not in text


def test_the_operator_list_is_written_without_a_word_about_where(variant_runs, tmp_path, caplog):
    """onnxruntime's tool logs the (temporary) path it wrote at INFO; the user sees no such line."""
    files = sorted((variant_runs / "conv" / "onnx").glob("*.ort"))
    with caplog.at_level(logging.DEBUG):
        variants_lib.write_required_operators(files, tmp_path / "ops.config")
    assert caplog.records == []
    assert [p.name for p in tmp_path.iterdir()] == ["ops.config"]  # written beside and renamed


@pytest.mark.parametrize("kind", KINDS)
def test_variant_files_are_what_they_claim(variant_runs, kind):
    folder = variant_runs / kind / "onnx"
    manifest = manifest_of(folder)
    for role in ("encoder", "decoder"):
        fp32 = onnx.load(str(folder / f"{role}.onnx"))
        fp16 = onnx.load(str(folder / f"{role}.fp16.onnx"))
        onnx.checker.check_model(fp16, full_check=True)
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
        assert {v.type.tensor_type.elem_type for v in [*fp16.graph.input, *fp16.graph.output]} == {
            onnx.TensorProto.FLOAT
        }
        dynamic = onnx.load(str(folder / f"{role}.int8-dynamic.onnx"))
        assert census(dynamic).get("MatMulInteger", 0) >= 1
        for name, model in (("fp16", fp16), ("int8-dynamic", dynamic)):
            meta = {p.key: p.value for p in model.metadata_props}
            assert meta["variant"] == name and meta["role"] == role and meta["model_kind"] == kind
        assert {p.key: p.value for p in fp32.metadata_props}.get("variant") is None
        assert (folder / f"{role}.int8-dynamic.onnx").stat().st_size < 0.5 * (folder / f"{role}.onnx").stat().st_size
        # ORT format: onnxruntime's own flatbuffers file, which still describes itself.
        for name in (n for n in EXPECTED[kind] if n.endswith("-ort")):
            path = folder / VARIANTS[name].filename(role)
            assert path.read_bytes()[4:8] == ORT_FORMAT_ID
            meta = session(path).get_modelmeta().custom_metadata_map
            assert meta["variant"] == name and meta["role"] == role
    dyn = manifest["variants"]["int8-dynamic"]["production"]
    assert dyn["encoder"]["quantized"].get("MatMulInteger") == 2
    if kind == "conv":
        assert dyn["encoder"]["quantized"].get("ConvInteger") == 2
        # Dynamic quantisation has no ConvTranspose form either.
        assert dyn["decoder"]["float"] == {"ConvTranspose": 2}


def test_static_quantisation_reports_what_was_quantised(variant_runs):
    folder = variant_runs / "conv" / "onnx"
    production = manifest_of(folder)["variants"]["int8-static"]["production"]
    enc, dec = production["encoder"], production["decoder"]
    assert enc["calibration_inputs"] == VARIANTS["int8-static"].options["calibration_images"]
    assert dec["calibration_inputs"] == 2 * enc["calibration_inputs"]  # posterior and prior latents
    # Encoder: both convolutions and the hidden Gemm in int8; the output layer (mu, logvar) kept float.
    assert enc["quantized"] == {"Conv": 2, "Gemm": 1} and enc["float"] == {"Gemm": 1}
    assert len(enc["kept_float"]) == 1
    assert enc["runtime_ops"].get("com.microsoft:QLinearConv") == 2  # what onnxruntime runs
    # Decoder: the Gemms in int8; ConvTranspose stays float (no int8 kernel in onnxruntime's CPU provider).
    assert dec["quantized"] == {"Gemm": 2} and dec["float_op_types"] == ["ConvTranspose"]
    assert dec["ops_before"]["ConvTranspose"] == dec["runtime_ops"]["ConvTranspose"] == 2
    assert dec["ops_after"]["QuantizeLinear"] >= 1 and dec["ops_after"]["DequantizeLinear"] >= 1
    assert "QuantizeLinear" not in dec["ops_before"]


@pytest.mark.parametrize("kind", KINDS)
def test_variants_agree_with_fp32_within_their_tolerance(variant_runs, kind, float_images):
    folder = variant_runs / kind / "onnx"
    z = np.random.default_rng(1).standard_normal((5, LATENT), dtype=np.float32)
    want_enc = session(folder / "encoder.onnx").run(None, {"x": float_images})
    (want_dec,) = session(folder / "decoder.onnx").run(None, {"z": z})
    for name in EXPECTED[kind]:
        spec = VARIANTS[name]
        got_enc = session(folder / spec.filename("encoder")).run(None, {"x": float_images})
        (got_dec,) = session(folder / spec.filename("decoder")).run(None, {"z": z})
        assert all(g.dtype == np.float32 for g in [*got_enc, got_dec])
        # Against fp32 ONNX rather than torch (1e-6 apart), so allow for that too.
        assert max(np.abs(g - w).max() for g, w in zip(got_enc, want_enc)) <= spec.atol["encoder"] + 1e-4, name
        assert np.abs(got_dec - want_dec).max() <= spec.atol["decoder"] + 1e-4, name


# ---------------------------------------------------------------- rejection and failure


def test_a_variant_over_its_budget_is_rejected_and_the_sampler_refuses_it(tmp_path):
    make_run(tmp_path, "lin", "linear", "bernoulli")
    result = CliRunner().invoke(
        cli(),
        ["export", "lin", "--output-dir", str(tmp_path), "--variants", "int8-dynamic", "--quality-budget", "1e-9"],
    )
    assert result.exit_code == 0, result.output  # the fp32 export is the product: still a success
    assert "int8-dynamic     rejected" in result.output and "the budget is 1e-09" in result.output
    folder = tmp_path / "lin" / "onnx"
    manifest = manifest_of(folder)
    assert manifest["verified"] is True and manifest["quality_budget"] == 1e-9
    entry = manifest["variants"]["int8-dynamic"]
    assert list(manifest["variants"]) == ["int8-dynamic"]
    assert entry["status"] == "rejected" and entry["verification"]["passed"] is True
    assert entry["quality"]["within_budget"] is False
    assert entry["reasons"] == [
        f"quality: mean test -ELBO changed by {entry['quality']['neg_elbo_change']:+.4f} nats against fp32 torch; "
        "the budget is 1e-09"
    ]
    assert (folder / "decoder.int8-dynamic.onnx").is_file()  # kept, for inspection or --allow-rejected

    out = tmp_path / "s.png"
    proc = run_sampler(["sample", "--model-dir", str(folder), "--variant", "int8", "--out", str(out)])
    assert proc.returncode == 1 and not out.exists()
    assert "no accepted int8-static or int8-dynamic variant" in proc.stderr
    assert "int8-dynamic rejected: quality: mean test -ELBO changed by" in proc.stderr
    assert "pass --allow-rejected to use a rejected one anyway" in proc.stderr
    # Naming the file directly does not get around it.
    proc = run_sampler(["sample", "--decoder", str(folder / "decoder.int8-dynamic.onnx"), "--out", str(out)])
    assert proc.returncode == 1 and "which the export rejected (quality: mean test -ELBO" in proc.stderr
    assert "--allow-rejected" in proc.stderr and not out.exists()

    proc = run_sampler(
        ["sample", "--model-dir", str(folder), "--variant", "int8", "--allow-rejected", "--out", str(out)]
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "using variant int8-dynamic (decoder.int8-dynamic.onnx)" in proc.stderr
    assert "warning: using int8-dynamic, which the export rejected (quality:" in proc.stderr

    # `vae-dist verify` judges again, against a new budget if given: within it, accepted again.
    result = CliRunner().invoke(cli(), ["verify", str(tmp_path / "lin"), "--quality-budget", "0.5"])
    assert result.exit_code == 0, result.output
    assert manifest_of(folder)["variants"]["int8-dynamic"]["status"] == "verified"
    proc = run_sampler(["sample", "--model-dir", str(folder), "--variant", "int8", "--out", str(out)])
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_a_variant_that_cannot_be_made_does_not_fail_the_export(tmp_path, monkeypatch):
    def broken(job):
        raise RuntimeError("converter crashed")

    monkeypatch.setitem(VARIANTS, "fp16", dataclasses.replace(VARIANTS["fp16"], produce=broken))
    run = make_run(tmp_path, "lin", "linear", "bernoulli")
    result = export_run(run, variants=["fp16", "int8-dynamic"])
    assert result.verified and result.onnx_dir == run / "onnx"
    section = result.manifest["variants"]
    assert section["fp16"]["status"] == "failed"
    assert section["fp16"]["reasons"] == ["production: RuntimeError: converter crashed"]
    assert not list(result.onnx_dir.glob("*.fp16.*"))
    assert section["int8-dynamic"]["status"] == "verified"
    proc = run_sampler(["sample", "--model-dir", str(result.onnx_dir), "--variant", "fp16", "--allow-rejected"])
    assert proc.returncode == 1
    assert "no accepted fp16 variant" in proc.stderr and "fp16 failed: production: RuntimeError" in proc.stderr


def test_an_ort_copy_of_a_failed_variant_is_not_made(tmp_path, monkeypatch):
    def broken(job):
        raise ValueError("no calibration")

    monkeypatch.setitem(VARIANTS, "int8-static", dataclasses.replace(VARIANTS["int8-static"], produce=broken))
    run = make_run(tmp_path, "cnn", "conv", "bernoulli")
    section = export_run(run, variants=["int8-static-ort"]).manifest["variants"]
    assert list(section) == ["int8-static", "int8-static-ort"]  # the source comes along
    assert section["int8-static"]["status"] == section["int8-static-ort"]["status"] == "failed"
    assert section["int8-static-ort"]["reasons"] == ["made from int8-static, which could not be made"]
    assert not list((run / "onnx").glob("*.int8-static.*"))


def _output_bias(model: onnx.ModelProto) -> onnx.TensorProto:
    """The bias of the layer that feeds the decoder's final Sigmoid."""
    (sigmoid,) = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    (last,) = [n for n in model.graph.node if sigmoid.input[0] in n.output]
    (bias,) = [t for t in model.graph.initializer if t.name == last.input[2]]
    return bias


def test_verify_catches_a_damaged_variant_and_int8_falls_back_to_dynamic(variant_runs, tmp_path):
    run = Path(shutil.copytree(variant_runs / "conv", tmp_path / "conv"))
    folder = run / "onnx"
    shift_initializer(folder / "decoder.int8-static.onnx", _output_bias, 5.0)  # ConvTranspose stays float: a float bias
    # Changed bytes are refused before anything else...
    proc = run_sampler(
        ["sample", "--model-dir", str(folder), "--variant", "int8-static", "--out", str(tmp_path / "a.png")]
    )
    assert proc.returncode == 1 and "is not the file that was verified" in proc.stderr
    # ...and judged again by `vae-dist verify`: the fp32 export passes, the variant does not.
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 0, result.output
    assert "int8-static      rejected" in result.output
    assert "decoder.int8-static.onnx: output 'x_mean' max abs diff" in result.output
    entry = manifest_of(folder)["variants"]["int8-static"]
    assert entry["status"] == "rejected" and not entry["verification"]["passed"]
    assert (
        entry["files"]["decoder.int8-static.onnx"]["sha256"]
        == file_record(folder / "decoder.int8-static.onnx")["sha256"]
    )
    assert manifest_of(folder)["variants"]["int8-dynamic"]["status"] == "verified"
    # int8 now means the dynamic variant; the static one is refused by name.
    out = tmp_path / "b.png"
    proc = run_sampler(["sample", "--model-dir", str(folder), "--variant", "int8", "-n", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "using variant int8-dynamic (decoder.int8-dynamic.onnx)" in proc.stderr
    proc = run_sampler(["sample", "--model-dir", str(folder), "--variant", "int8-static", "--out", str(out)])
    assert proc.returncode == 1 and "int8-static rejected: decoder.int8-static.onnx: output 'x_mean'" in proc.stderr


# ---------------------------------------------------------------- the sampler on each variant


CHOICES = [
    ("fp32", "onnx", "fp32"),
    ("fp16", "onnx", "fp16"),
    ("int8", "onnx", "int8-static"),
    ("int8-dynamic", "onnx", "int8-dynamic"),
    ("int8-static", "onnx", "int8-static"),
    ("fp32", "ort", "fp32-ort"),
    ("int8", "ort", "int8-static-ort"),
    ("int8-dynamic", "ort", "int8-dynamic-ort"),
]


@pytest.fixture(scope="module")
def fp32_samples(variant_runs, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("fp32") / "s.png"
    proc = run_sampler(
        ["sample", "--model-dir", str(variant_runs / "conv" / "onnx"), "-n", "4", "--seed", "3", "--out", str(out)]
    )
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out), dtype=np.int16)


@pytest.mark.parametrize("variant, fmt, used", CHOICES, ids=[f"{v}-{f}" for v, f, _ in CHOICES])
def test_sampler_runs_each_variant_without_torch(variant_runs, tmp_path, fp32_samples, variant, fmt, used):
    out = tmp_path / "s.png"
    args = ["sample", "--model-dir", str(variant_runs / "conv"), "-n", "4", "--seed", "3", "--out", str(out)]
    proc = run_sampler([*args, "--variant", variant, "--format", fmt])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out} (4 samples from the prior, seed 3)"
    spec = VARIANTS.get(used)
    if spec is None:
        assert proc.stderr == ""
    else:
        assert proc.stderr.strip() == f"using variant {used} ({spec.filename('decoder')})"
    # The same draws, decoded by a coarser model: close to fp32's grey levels, not equal to them.
    diff = np.abs(np.asarray(Image.open(out), dtype=np.int16) - fp32_samples)
    limit = {"fp32": 1, "fp16": 3}.get(used.removesuffix("-ort"), 0.1 * 255)
    assert diff.max() <= limit, (used, diff.max())


def test_sampler_reconstructs_with_an_int8_ort_pair(variant_runs, tmp_path, float_images):
    idx = write_idx(tmp_path / "t.idx", (float_images[:, 0] * 255).round().astype(np.uint8))
    out = tmp_path / "r.png"
    proc = run_sampler(
        [
            "reconstruct",
            "--model-dir",
            str(variant_runs / "linear" / "onnx"),
            "--idx",
            str(idx),
            "-n",
            "3",
            "--variant",
            "int8",
            "--format",
            "ort",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "using variant int8-dynamic-ort (encoder.int8-dynamic.ort, decoder.int8-dynamic.ort)"
    assert out.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--variant", "fp16", "--format", "ort"],
            "has no fp16-ort variant (it has: fp16 (verified), int8-dynamic (verified)",
        ),
        (["--variant", "int8-static"], "has no int8-static variant"),
        (["--variant", "int9"], "argument --variant: invalid choice: 'int9'"),
    ],
)
def test_sampler_explains_a_variant_it_cannot_use(variant_runs, tmp_path, args, message):
    proc = run_sampler(
        ["sample", "--model-dir", str(variant_runs / "linear" / "onnx"), "--out", str(tmp_path / "x.png"), *args]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # nothing to refuse: a usage error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


# ---------------------------------------------------------------- pieces


def test_sampler_mirrors_the_variant_registry():
    for name, spec in VARIANTS.items():
        base, fmt = (name.removesuffix("-ort"), "ort") if name.endswith("-ort") else (name, "onnx")
        assert f"decoder{sampler.VARIANT_INFIXES[base]}{sampler.FORMAT_EXTENSIONS[fmt]}" == spec.filename("decoder")
        assert spec.format == fmt
    assert set(sampler.VARIANT_INFIXES) == {"fp32", *(v.name for v in variants_lib.ONNX_VARIANTS)}
    assert set(sampler.INT8_PREFERENCE) <= set(VARIANTS)


def test_variant_selection():
    assert [v.name for v in variants_lib.select(None, "linear")] == EXPECTED["linear"]
    assert [v.name for v in variants_lib.select(None, "conv")] == EXPECTED["conv"]
    # An ORT copy brings its source; a variant for another model kind is skipped.
    assert [v.name for v in variants_lib.select(["int8-static-ort"], "conv")] == ["int8-static", "int8-static-ort"]
    assert variants_lib.select(["int8-static"], "linear") == []
    assert variants_lib.parse_names("all") is None and variants_lib.parse_names("none") == []
    assert variants_lib.parse_names("fp16, int8-dynamic") == ["fp16", "int8-dynamic"]
    with pytest.raises(ValueError, match="unknown variant"):
        variants_lib.parse_names("fp16,int4")
    result = CliRunner().invoke(cli(), ["export", "--variants", "int4"])
    assert result.exit_code == 2 and "unknown variant(s) ['int4']" in result.output


@pytest.mark.slow  # re-judges every variant twice
@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2, 3]"])
def test_verify_over_a_damaged_manifest_lists_the_variants_again(variant_runs, tmp_path, damage):
    """A rebuilt manifest judges again the variants whose files are there: none is left unlisted."""
    run = Path(shutil.copytree(variant_runs / "conv", tmp_path / "conv"))
    folder = run / "onnx"
    (folder / "manifest.json").write_bytes(damage)
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 0, result.output
    manifest = manifest_of(folder)
    assert manifest["verified"] is True and list(manifest["variants"]) == EXPECTED["conv"]
    for name, entry in manifest["variants"].items():
        assert entry["status"] == "verified", (name, entry["reasons"])
        for filename, record in entry["files"].items():
            assert record["sha256"] == file_record(folder / filename)["sha256"]
    assert manifest["required_operators"]["file"] == "required_operators.config"
    out = tmp_path / "s.png"
    proc = run_sampler(["sample", "--model-dir", str(folder), "--variant", "int8", "-n", "2", "--out", str(out)])
    assert proc.returncode == 0 and out.is_file(), proc.stderr
