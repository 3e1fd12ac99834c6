"""ONNX export and its verification, on tiny untrained models and the real Fashion-MNIST test split."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from export import pipeline
from export import sample as sampler
from export import spec as spec_lib
from export.convert import ExportError, export_submodel
from export.manifest import file_record
from export.pipeline import FAILED_DIR, export_run, find_latest_runs, recorded_test_images
from export.verify import Check, Report, check_graph, load_test_images, random_ops, torch_scores
from helpers import (
    DEAD_PID,
    LATENT,
    SHAPE,
    TINY_TEST_NEG_ELBO,
    VAE_DIST,
    cli,
    fashion_test_idx,
    file_hashes,
    full_disk,
    make_run,
    shift_initializer,
    weights,
)
from helpers import run as run_command
from vae_dist import artifacts, files, runs
from vae_dist import record as record_lib
from vae_dist.config import ModelConfig
from vae_dist.epoch_end import evaluation_noise
from vae_dist.files import WriteError
from vae_dist.losses import kl_to_standard_normal, neg_elbo_from_mean, negative_elbo
from vae_dist.models import build_model

# The linear run uses the Gaussian likelihood so that both -ELBO forms are verified.
KINDS = {"linear": "gaussian", "conv": "bernoulli"}


@pytest.fixture(scope="module")
def exported_runs(tmp_path_factory) -> Path:
    """Both kinds exported by `export` without RUN (the latest run of each kind)."""
    folder = tmp_path_factory.mktemp("runs")
    for kind, likelihood in KINDS.items():
        make_run(folder, f"{kind}-old", kind, likelihood, seed=1)
        old = folder / f"{kind}-old" / runs.MODEL_FILE
        os.utime(old, (old.stat().st_atime, old.stat().st_mtime - 3600))
        make_run(folder, f"{kind}-new", kind, likelihood)
    # The edge variants are covered by test_variants.py.
    result = CliRunner().invoke(cli(), ["export", "--output-dir", str(folder), "--variants", "none"])
    assert result.exit_code == 0, result.output
    assert result.output.count(": verified") == 2
    return folder


def exported(runs: Path, kind: str) -> Path:
    return runs / f"{kind}-new" / spec_lib.ONNX_DIR


def copy_run(runs: Path, kind: str, dest: Path) -> Path:
    return Path(shutil.copytree(runs / f"{kind}-new", dest / f"{kind}-copy"))


# ---------------------------------------------------------------- the files


@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_only_the_latest_run_of_each_kind(exported_runs, kind):
    names = sorted(p.name for p in exported(exported_runs, kind).iterdir())
    assert names == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    assert not (exported_runs / f"{kind}-old" / spec_lib.ONNX_DIR).exists()
    assert not list((exported_runs / f"{kind}-new").glob(".onnx-*")), "staging folder left behind"


@pytest.mark.parametrize("kind", KINDS)
def test_files_are_self_contained_valid_and_free_of_random_ops(exported_runs, kind):
    for role in ("encoder", "decoder"):
        model = onnx.load(str(exported(exported_runs, kind) / f"{role}.onnx"), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
        assert all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)
        assert random_ops(model) == []
        assert {o.domain: o.version for o in model.opset_import}[""] == spec_lib.DEFAULT_OPSET


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_describes_the_model(exported_runs, kind):
    for role in ("encoder", "decoder"):
        model = onnx.load(str(exported(exported_runs, kind) / f"{role}.onnx"))
        meta = {p.key: p.value for p in model.metadata_props}
        assert set(spec_lib.METADATA_KEYS) <= set(meta)
        assert meta["format"] == spec_lib.ONNX_FORMAT
        assert meta["role"] == role
        assert meta["model_kind"] == kind
        assert meta["latent_dim"] == str(LATENT)
        assert json.loads(meta["image_shape"]) == list(SHAPE)
        assert meta["dataset"] == "fashion-mnist"
        assert meta["likelihood"] == KINDS[kind]
        assert meta["opset"] == str(spec_lib.DEFAULT_OPSET)
        assert float(meta["test_neg_elbo"]) == pytest.approx(TINY_TEST_NEG_ELBO)
        assert meta["torch_version"] == torch.__version__
        assert meta["onnx_version"] == onnx.__version__
        assert meta["vae_dist_version"] == "0.1.0"


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_batch_and_contract_shapes(exported_runs, kind):
    folder = exported(exported_runs, kind)
    enc = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in enc.get_inputs()] == ["x"] and [o.name for o in enc.get_outputs()] == ["mu", "logvar"]
    assert [i.name for i in dec.get_inputs()] == ["z"] and [o.name for o in dec.get_outputs()] == ["x_mean"]
    assert isinstance(enc.get_inputs()[0].shape[0], str) and isinstance(dec.get_inputs()[0].shape[0], str)
    for batch in (1, 3, 50):
        x = np.random.default_rng(batch).random((batch, *SHAPE), dtype=np.float32)
        mu, logvar = enc.run(None, {"x": x})
        assert mu.shape == logvar.shape == (batch, LATENT)
        (x_mean,) = dec.run(None, {"z": mu})
        assert x_mean.shape == (batch, *SHAPE) and x_mean.dtype == np.float32
        assert x_mean.min() >= 0 and x_mean.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_records_files_versions_and_verification(exported_runs, kind):
    folder = exported(exported_runs, kind)
    manifest = json.loads((folder / spec_lib.MANIFEST_FILE).read_text())
    assert manifest["format"] == spec_lib.MANIFEST_FORMAT
    assert manifest["verified"] is True
    for name in ("encoder.onnx", "decoder.onnx"):
        record = file_record(folder / name)
        assert manifest["files"][name]["sha256"] == record["sha256"]
        assert manifest["files"][name]["size"] == record["size"]
    assert manifest["source"]["sha256"] == file_record(exported_runs / f"{kind}-new" / runs.MODEL_FILE)["sha256"]
    assert {"torch", "onnx", "onnxruntime", "vae_dist"} <= set(manifest["versions"])
    assert manifest["model"] == {
        "kind": kind,
        "latent_dim": LATENT,
        "image_shape": list(SHAPE),
        "dataset": "fashion-mnist",
        "likelihood": KINDS[kind],
        "test_neg_elbo": TINY_TEST_NEG_ELBO,
    }
    v = manifest["verification"]
    assert v["passed"] and v["failures"] == []
    assert set(v["outputs"]) == {"encoder.onnx:mu", "encoder.onnx:logvar", "decoder.onnx:x_mean"}
    assert all(o["max_abs"] <= 1e-4 and o["max_rel"] >= 0 for o in v["outputs"].values())
    batches = {(c["file"], c["output"], c["batch"]) for c in v["checks"] if c["check"] == "values"}
    assert {b for *_, b in batches} == {1, 7, 128}
    # End to end on the whole real test split, through both ONNX files.
    assert v["elbo"]["images"] == 10000 and v["elbo"]["likelihood"] == KINDS[kind]
    assert v["elbo"]["diff"] <= 0.01 and v["elbo"]["diff_native"] <= 0.01
    assert 100 < v["elbo"]["onnx"] < 5000


# ---------------------------------------------------------------- verification failing


def _stats_bias(model: onnx.ModelProto) -> onnx.TensorProto:
    """The encoder's last bias: its first LATENT entries produce mu, the others logvar."""
    (bias,) = [t for t in model.graph.initializer if t.name.endswith("to_stats.bias")]
    return bias


def test_verify_passes_on_a_good_export(exported_runs, tmp_path):
    run = copy_run(exported_runs, "conv", tmp_path)
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "FAIL" not in result.output
    assert "encoder.onnx mu: max abs diff" in result.output and "-ELBO on all 10000 test images" in result.output
    # A tiny run has no metrics log: training's figure is shown, and said to be of unknown extent.
    assert (
        f"training's recorded -ELBO: {TINY_TEST_NEG_ELBO:.4f} nats, on a number of test images the run did not record"
        in result.output
    )
    assert result.output.strip().splitlines()[-1] == f"{run / 'onnx'}: verified"  # the verdict comes last


def test_verify_fails_on_a_corrupted_weight_and_names_the_output(exported_runs, tmp_path):
    run = copy_run(exported_runs, "linear", tmp_path)
    shift_initializer(run / "onnx" / "encoder.onnx", _stats_bias, 0.5, entries=slice(LATENT))  # mu only
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 1, result.output
    fails = [line.strip() for line in result.output.splitlines() if line.strip().startswith("FAIL")]
    assert any("encoder.onnx: output 'mu' max abs diff 5.000e-01" in f for f in fails), fails
    assert not any("'logvar'" in f or "x_mean" in f for f in fails), fails
    assert any("elbo" in f for f in fails), fails  # the corruption shows end to end too
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert manifest["verified"] is False
    assert any("'mu'" in f for f in manifest["verification"]["failures"])
    # ...and the sampler will not touch it.
    out = tmp_path / "r.png"
    assert (
        sampler.main(
            ["reconstruct", "--model-dir", str(run / "onnx"), "--idx", str(fashion_test_idx()), "--out", str(out)]
        )
        == 1
    )
    assert not out.exists()


def test_verify_rejects_a_random_operator(exported_runs, tmp_path):
    run = copy_run(exported_runs, "conv", tmp_path)
    path = run / "onnx" / "decoder.onnx"
    model = onnx.load(str(path))
    # x_mean + 0 * RandomUniformLike(x_mean): the same numbers, but the graph draws noise.
    (last,) = [n for n in model.graph.node if "x_mean" in n.output]
    last.output[0] = "x_mean_raw"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    model.graph.node.extend(
        [
            helper.make_node("RandomUniformLike", ["x_mean_raw"], ["noise"]),
            helper.make_node("Mul", ["noise", "zero"], ["no_noise"]),
            helper.make_node("Add", ["x_mean_raw", "no_noise"], ["x_mean"]),
        ]
    )
    onnx.save(model, str(path))
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 1, result.output
    assert "decoder.onnx: random_ops: random operators in the graph: ['RandomUniformLike']" in result.output


def test_verify_notices_a_retrained_model(exported_runs, tmp_path, caplog):
    run = copy_run(exported_runs, "linear", tmp_path)
    (run / runs.MODEL_FILE).unlink()
    make_run(tmp_path / "other", "x", "linear", "gaussian", seed=5)
    shutil.copy(tmp_path / "other" / "x" / runs.MODEL_FILE, run / runs.MODEL_FILE)
    with caplog.at_level(logging.INFO, logger="export"):
        result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 1
    assert "model.safetensors changed since the export" in result.output
    fails = [line.strip() for line in result.output.splitlines() if line.strip().startswith("FAIL")]
    assert len(fails) > 1 and "changed since the export" in fails[0]  # the cause comes first
    assert result.output.strip().splitlines()[-1] == f"{run / 'onnx'}: verification FAILED"
    # No log line says "verified" before the source check could fail it.
    assert not [r for r in caplog.records if r.getMessage().endswith(" verified")]


def test_verification_draws_the_evaluation_noise_the_run_used(tmp_path):
    """The -ELBO check reuses the eval_seed recorded in the model file, so torch's figure is the
    one training's evaluation computes."""
    run = make_run(tmp_path, "r", "linear", eval_seed=3)
    result = export_run(run, variants=[])
    assert result.verified
    elbo = result.manifest["verification"]["elbo"]
    model, record = artifacts.load_model(run / runs.MODEL_FILE)
    images = load_test_images(model, record)
    _, native = torch_scores(model, images, evaluation_noise(len(images), LATENT, 3), "bernoulli")
    assert elbo["noise_seed"] == 3 and elbo["torch_native"] == pytest.approx(native, abs=1e-9)
    _, other = torch_scores(model, images, evaluation_noise(len(images), LATENT, 0), "bernoulli")
    assert other != pytest.approx(native, abs=1e-9)


def _log_metrics(run: Path, *records: dict) -> None:
    with open(run / runs.METRICS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_training_record_is_compared_on_the_test_images_it_was_measured_on(tmp_path):
    """Training may evaluate the first data.test_subset images only: the summary says so, and gives
    torch's figure on those same images, with the same evaluation noise."""
    run = make_run(tmp_path, "r", "linear")
    _log_metrics(
        run,
        {"epoch": 0, "test_neg_elbo": 600.0, "test_images": 10000},
        {"epoch": 1, "test_neg_elbo": TINY_TEST_NEG_ELBO, "test_images": 1000},
    )
    result = export_run(run, variants=[])
    elbo = result.manifest["verification"]["elbo"]
    assert elbo["images"] == 10000 and elbo["recorded"] == TINY_TEST_NEG_ELBO and elbo["recorded_images"] == 1000
    model, record = artifacts.load_model(run / runs.MODEL_FILE)
    images = load_test_images(model, record)[:1000]
    _, native = torch_scores(model, images, evaluation_noise(1000, LATENT, 0), "bernoulli")
    assert elbo["recorded_images_torch_native"] == pytest.approx(native, abs=1e-9)
    assert abs(native - elbo["torch_native"]) > 1e-3  # another figure than the whole split's
    lines = result.report.summary_lines()
    assert lines[-2].startswith("-ELBO on all 10000 test images (nats): onnx ")
    assert lines[-1] == (
        f"training's recorded -ELBO: {TINY_TEST_NEG_ELBO:.4f} nats, on the first 1000 test images only "
        f"(data.test_subset); torch from logits on those now: {native:.4f}"
    )


def test_where_the_count_behind_training_record_comes_from(tmp_path):
    run = make_run(tmp_path, "r", "linear")
    record = dataclasses.replace(record_lib.read(run / runs.MODEL_FILE), test_neg_elbo=250.5)
    assert recorded_test_images(run, record) is None  # no metrics log
    _log_metrics(run, {"test_neg_elbo": 250.5, "test_images": 2000}, {"test_neg_elbo": 249.0, "test_images": 3000})
    assert recorded_test_images(run, record) == 2000  # the line holding the same figure
    assert recorded_test_images(run, dataclasses.replace(record, test_neg_elbo=1.0)) is None
    own = dataclasses.replace(record, test_images=500)
    assert recorded_test_images(run, own) == 500  # the model file's own record first
    (run / runs.METRICS_FILE).write_text("{not json\n{}\n")
    assert recorded_test_images(run, record) is None
    e = {"recorded": 250.5, "images": 10000, "recorded_images": 10000}
    assert Report._record_line(e) == "training's recorded -ELBO: 250.5000 nats, on the same 10000 test images"


def test_random_ops_are_found_in_subgraphs():
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])
    branch = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["z"], ["r"])],
        "noisy",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 4])],
    )
    quiet = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["q"])],
        "quiet",
        [],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [None, 4])],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=quiet)], "g", [z], [out], [cond]
    )
    assert random_ops(helper.make_model(graph)) == ["RandomNormalLike"]
    flat = helper.make_graph([helper.make_node("Multinomial", ["z"], ["out"])], "g", [z], [out])
    assert random_ops(helper.make_model(flat)) == ["Multinomial"]


def test_check_graph_flags_wrong_metadata_and_signature(exported_runs, tmp_path):
    src = exported(exported_runs, "conv") / "encoder.onnx"
    cfg = ModelConfig(kind="conv", latent_dim=LATENT, hidden_dims=[32], channels=[4, 8])
    encoder, decoder = spec_lib.vae_specs(build_model(cfg, SHAPE))
    checks = {c.check: c for c in check_graph(src, decoder, {"role": "decoder", "latent_dim": "7"})}
    assert not checks["metadata"].passed and "role='encoder'" in checks["metadata"].detail
    assert not checks["io"].passed and "expected ['z']" in checks["io"].detail
    assert checks["checker"].passed and checks["random_ops"].passed and checks["self_contained"].passed
    garbage = tmp_path / "encoder.onnx"
    garbage.write_text("not a model")
    (bad,) = check_graph(garbage, encoder, {})
    assert bad.check == "load" and not bad.passed


def test_a_failed_export_is_kept_apart_and_the_good_one_untouched(exported_runs, tmp_path, monkeypatch):
    run = copy_run(exported_runs, "conv", tmp_path)
    good = (run / "onnx" / "manifest.json").read_bytes()

    def failing(*args, **kwargs):
        return Report(
            [Check("decoder.onnx", "values", False, output="x_mean", batch=7, max_abs=0.3, max_rel=0.5, tol=1e-4)]
        )

    monkeypatch.setattr("export.pipeline.verify_export", failing)
    result = export_run(run)
    assert not result.verified and result.onnx_dir == run / FAILED_DIR
    assert json.loads((run / FAILED_DIR / "manifest.json").read_text())["verified"] is False
    assert (run / "onnx" / "manifest.json").read_bytes() == good
    code = sampler.main(["sample", "--model-dir", str(run / FAILED_DIR), "--out", str(tmp_path / "s.png")])
    assert code == 1 and not (tmp_path / "s.png").exists()
    assert result.report.failure_lines() == [
        "decoder.onnx: output 'x_mean' max abs diff 3.000e-01 (max rel 5.000e-01, batch 7) exceeds atol 1.0e-04"
    ]


# ---------------------------------------------------------------- pieces


def test_find_latest_runs_uses_metadata_kind_and_mtime(tmp_path):
    make_run(tmp_path, "linear-looking-but-conv", "conv")
    make_run(tmp_path, "a", "linear")
    newest = make_run(tmp_path, "b", "linear")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / runs.MODEL_FILE).write_bytes(b"\0" * 64)
    (tmp_path / "unfinished").mkdir()
    for name, age in (("a", 10), ("b", 100), ("linear-looking-but-conv", 50)):
        path = tmp_path / name / runs.MODEL_FILE
        os.utime(path, (1e9, 1e9 - age))
    os.utime(newest / runs.MODEL_FILE, (1e9, 1e9))
    assert find_latest_runs(tmp_path) == {"conv": tmp_path / "linear-looking-but-conv", "linear": newest}
    assert find_latest_runs(tmp_path / "missing") == {}


def test_export_of_a_named_run_with_another_opset(tmp_path):
    make_run(tmp_path, "fresh", "linear")
    result = CliRunner().invoke(
        cli(),
        ["export", "fresh", "--output-dir", str(tmp_path), "--opset", "20", "--atol", "1e-3", "--variants", "none"],
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "fresh" / "onnx"
    for role in ("encoder", "decoder"):
        model = onnx.load(str(folder / f"{role}.onnx"))
        assert {o.domain: o.version for o in model.opset_import}[""] == 20
        assert {p.key: p.value for p in model.metadata_props}["opset"] == "20"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["opset"] == 20 and manifest["verified"] is True
    assert {o["atol"] for o in manifest["verification"]["outputs"].values()} == {1e-3}


def test_an_opset_the_exporter_cannot_reach_is_an_error(tmp_path):
    model = build_model(ModelConfig(kind="linear", latent_dim=LATENT, hidden_dims=[8]), SHAPE).eval()
    _, decoder = spec_lib.vae_specs(model)
    with pytest.raises(ExportError, match="could not target opset 13"):
        export_submodel(model, decoder, tmp_path / "old.onnx", 13, {"model_kind": "linear"})


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_neg_elbo_from_mean_matches_the_training_loss(likelihood):
    g = torch.Generator().manual_seed(0)
    # Within +-8: beyond ~16, float32 sigmoid rounds to 1 and the mean alone loses the tail
    # (bounded by the clip at PROB_EPS); trained models seldom go there, see the end-to-end check.
    logits = (torch.randn(16, *SHAPE, generator=g) * 3).clamp(-8, 8)
    x = torch.rand(16, *SHAPE, generator=g)
    mu, logvar = torch.randn(16, LATENT, generator=g), torch.randn(16, LATENT, generator=g)
    want = negative_elbo(logits, x, kl_to_standard_normal(mu, logvar), 1.0, likelihood).neg_elbo().double().numpy()
    got = neg_elbo_from_mean(torch.sigmoid(logits), x, mu, logvar, likelihood)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_export_command_errors(tmp_path):
    result = CliRunner().invoke(cli(), ["export", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no finished run under" in result.output
    result = CliRunner().invoke(cli(), ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output
    make_run(tmp_path, "fresh", "linear")
    result = CliRunner().invoke(cli(), ["verify", "fresh", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "export the run first" in result.output


def test_python_dash_m_export_runs_the_export_command(tmp_path):
    proc = run_command([sys.executable, "-m", "export", "--output-dir", str(tmp_path / "none")], 120, check=False)
    assert proc.returncode == 2 and "no finished run under" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sampler_contract_matches_the_export_spec():
    encoder, decoder = spec_lib.vae_specs(build_model(ModelConfig(kind="linear", latent_dim=3, hidden_dims=[4]), SHAPE))
    assert sampler.ONNX_FORMAT == spec_lib.ONNX_FORMAT
    assert sampler.MANIFEST_FILE == spec_lib.MANIFEST_FILE
    assert sampler.SIGNATURES == {s.role: (s.input_names, s.output_names) for s in (encoder, decoder)}
    assert sampler.ONNX_DIR == spec_lib.ONNX_DIR


def test_sampler_mirrors_the_project_defaults_and_grid_layout():
    """export/sample.py cannot import the project: its copies of shared facts must agree."""
    from vae_dist import paths

    assert (sampler.RUNS_ENV, sampler.DEFAULT_RUNS) == (paths.RUNS_ENV, paths.DEFAULT_RUNS)
    assert (sampler.PAD, sampler.MIN_CELL_PIXELS) == (artifacts.GRID_PAD, artifacts.MIN_CELL_PIXELS)
    for shape in ((1, 28, 28), (3, 64, 64), (1, 27, 31)):
        rows = [torch.rand(3, *shape), torch.rand(2, *shape)]
        got = sampler.tile([list(r.numpy()) for r in rows])
        assert np.array_equal(got, artifacts.grid_pixels(rows))
        assert got.shape[2] // (3 * shape[2]) >= 1 and sampler.grid_scale(shape[2]) * shape[2] >= 84


def _damaged_model(folder: Path, how: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = make_run(folder, f"bad-{how}", "linear")
    path = run / runs.MODEL_FILE
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "truncated header":
        path.write_bytes(path.read_bytes()[:5])
    elif how == "unknown kind":  # a model file from a newer vae-dist
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        meta["model"] = json.dumps({**json.loads(meta["model"]), "kind": "transformer"})
        save_file(weights(path), str(path), metadata=meta)
    else:  # valid safetensors whose metadata is not a model description
        save_file({"w": torch.zeros(1)}, str(path), metadata={"format": record_lib.FORMAT, "model": "[1, 2]"})
    return run


@pytest.mark.parametrize(
    "how, says",
    [
        ("truncated", "cannot be read as a safetensors file"),
        ("truncated header", "cannot be read as a safetensors file"),
        ("unknown kind", "describes a model of kind 'transformer'; this vae-dist knows linear, conv"),
        ("metadata", "train or copy the model again"),
    ],
)
def test_a_damaged_model_file_is_one_line_and_does_not_stop_the_others(tmp_path, how, says):
    bad = _damaged_model(tmp_path, how)
    result = CliRunner().invoke(cli(), ["export", str(bad), "--variants", "none"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {bad / runs.MODEL_FILE} ") and says in line, line  # the file, once
    assert not (bad / "onnx").exists()
    good = make_run(tmp_path, "good", "conv")
    found = find_latest_runs(tmp_path)
    assert found["conv"] == good and "linear" not in found


def test_an_export_removes_the_staging_folders_of_exports_that_were_killed(tmp_path, caplog):
    run = make_run(tmp_path, "r", "linear")
    dead = DEAD_PID
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    stale, live = files.staging_name(run / "onnx", dead), files.staging_name(run / "onnx", os.getppid())
    for folder in (stale, live):
        folder.mkdir()
        (folder / "encoder.onnx").write_bytes(b"half")
    with caplog.at_level(logging.INFO):
        assert export_run(run, variants=[]).verified
    assert not stale.exists() and live.is_dir()  # a running export's folder is left alone
    # What the user reads (the command shows this project's lines only): a few, none naming a staging folder.
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("export", "vae_dist")]
    assert ".onnx.partial" not in "\n".join(ours)
    assert [re.sub(r"\(\d+ bytes", "(N bytes", line) for line in ours] == [
        f"removed the files left for {run / 'onnx'} by a process that did not finish",
        "exported encoder.onnx (N bytes, opset 18)",
        "exported decoder.onnx (N bytes, opset 18)",
        f"export of {run} verified: {run / 'onnx'}",
    ]


# ---------------------------------------------------------------- a full disk


LIMIT_BEFORE_VARIANTS = """
import resource, signal, sys
from export import pipeline
making = pipeline.make_variants

def limited(*args, **kwargs):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return making(*args, **kwargs)

pipeline.make_variants = limited
from vae_dist.cli import main
main(["export", sys.argv[1], "--variants", sys.argv[2]])
"""


@pytest.mark.slow  # an export in a subprocess, twice over for the variants
@pytest.mark.parametrize(
    "phase, free_bytes, variants",
    [
        ("fp32", 20_000, "none"),  # the encoder or the decoder does not fit
        ("variants", 150_000, "fp16"),  # the fp32 files fit, an fp16 file does not (tmpfs only)
    ],
)
def test_a_full_disk_stops_the_export_in_one_line_and_the_previous_export_is_untouched(
    tmp_path, phase, free_bytes, variants
):
    run = make_run(tmp_path, "conv-full", "conv")
    assert export_run(run, variants=[]).verified
    before = file_hashes(run)
    command = [VAE_DIST, "export", str(run), "--variants", variants]
    with full_disk(run, free_bytes) as (preexec_fn, how):
        if phase == "variants" and how != "tmpfs":
            # A file-size limit from the start would stop the (larger) fp32 files first: the export
            # lowers it for itself just before it makes the variants.
            command = [sys.executable, "-c", LIMIT_BEFORE_VARIANTS, str(run), variants]
            preexec_fn = None
        proc = run_command(command, check=False, preexec_fn=preexec_fn)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    written = r"(en|de)coder\.onnx" if phase == "fp32" else r"(en|de)coder\.fp16\.onnx"
    reasons = "|".join(re.escape(os.strerror(e)) for e in (errno.ENOSPC, errno.EFBIG))
    assert re.fullmatch(
        rf"error: cannot write {written} of the new export of {re.escape(str(run))} \(({reasons})\); "
        rf"the previous export in {re.escape(str(run / 'onnx'))} is untouched; "
        r"free some space \(or raise the quota or file size limit\) and run the export again",
        line,
    ), line
    assert ".onnx.partial" not in proc.stderr  # no temporary path shown
    assert file_hashes(run) == before  # byte for byte, and nothing added: no staging folder left
    assert not list(run.glob(".onnx-*"))


def test_a_full_disk_without_a_previous_export_says_nothing_was_exported(tmp_path, monkeypatch):
    run = make_run(tmp_path, "r", "linear")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline.manifest_lib, "write_manifest", full)
    result = CliRunner().invoke(cli(), ["export", str(run), "--variants", "none"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: cannot write manifest.json of the new export of {run} ({os.strerror(errno.ENOSPC)}); "
        "nothing was exported; free some space (or raise the quota or file size limit) and run the export again"
    )
    assert sorted(p.name for p in run.iterdir()) == [runs.MODEL_FILE]


def test_verify_on_a_full_disk_leaves_the_manifest_as_it_was(exported_runs, tmp_path, monkeypatch):
    run = copy_run(exported_runs, "linear", tmp_path)
    before = file_hashes(run)
    real_write = pipeline.manifest_lib.write_manifest

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(onnx_dir, manifest):  # the real write, on a disk that has no room left
        monkeypatch.setattr(Path, "write_text", no_room)
        return real_write(onnx_dir, manifest)

    monkeypatch.setattr(pipeline.manifest_lib, "write_manifest", full)
    result = CliRunner().invoke(cli(), ["verify", str(run)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: cannot write {run / 'onnx' / 'manifest.json'} (No space left on device) while recording the "
        f"verdict; {run / 'onnx'} is as it was; free some space (or raise the quota or file size limit) and run "
        "verify again"
    )
    assert file_hashes(run) == before


def test_a_write_refused_for_room_is_told_apart_from_a_failing_tool(tmp_path, monkeypatch):
    """Tools writing from C++ report a full disk as their own errors: the folder is asked."""
    with pytest.raises(RuntimeError):  # room enough: the tool's own error stands
        with files.writing(tmp_path / "x.onnx", room_for=1000):
            raise RuntimeError("Protobuf serialization failed")
    with pytest.raises(WriteError, match=r"cannot write .*x\.onnx \(No space left on device\)"):
        with files.writing(tmp_path / "x.onnx"):  # an OSError anywhere in the chain
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise ValueError("while saving") from e
    monkeypatch.setattr(files, "room_refused", lambda folder, size: OSError(errno.EDQUOT, "Disk quota exceeded"))
    with pytest.raises(WriteError, match=r"\(Disk quota exceeded\)"):
        with files.writing(tmp_path / "x.onnx", room_for=1000):
            raise RuntimeError("Failed to save ORT format model")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing


def test_the_operator_list_stops_the_export_only_for_want_of_room(tmp_path, monkeypatch, caplog):
    section = {"fp32-ort": {"status": "verified", "files": {"encoder.ort": {}, "decoder.ort": {}}}}

    def fails(error):
        def write(files, path):
            raise error

        return write

    monkeypatch.setattr(pipeline.variants_lib, "write_required_operators", fails(ValueError("not an ORT file")))
    assert pipeline.write_operator_config(tmp_path, section) is None  # informational: a warning only
    assert "could not write required_operators.config" in caplog.text
    too_large = OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(pipeline.variants_lib, "write_required_operators", fails(too_large))
    with pytest.raises(WriteError, match="required_operators.config"):
        pipeline.write_operator_config(tmp_path, section)


def test_an_interrupted_export_exits_130_in_one_line(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_run", interrupted)
    result = CliRunner().invoke(cli(), ["export", str(tmp_path / "r"), "--variants", "none"])
    assert result.exit_code == 130
    assert result.output.strip() == f"interrupted while exporting {tmp_path / 'r'}; its previous export is untouched"


def test_tolerances_and_budgets_grow_with_the_pixels():
    from export.spec import ELBO_TOL, nats_for_image

    assert nats_for_image(ELBO_TOL, (1, 28, 28)) == ELBO_TOL
    assert nats_for_image(ELBO_TOL, (1, 8, 8)) == ELBO_TOL  # never below the stated figure
    assert nats_for_image(ELBO_TOL, (3, 64, 64)) == pytest.approx(ELBO_TOL * 12288 / 784)


def test_a_folder_moved_aside_by_a_killed_replacement_comes_back(tmp_path):
    """files.publish renames the earlier folder aside, then the new one in: a kill between the two
    leaves no `onnx/`; the next export or verify puts the earlier one back, or removes it."""
    run = make_run(tmp_path, "r", "linear")
    assert export_run(run, variants=[]).verified
    before = (run / "onnx" / "manifest.json").read_bytes()
    dead = DEAD_PID
    aside = files.aside_name(run / "onnx", dead)
    os.replace(run / "onnx", aside)
    report, _ = pipeline.verify_run(run)
    assert report.passed and not aside.exists()
    assert json.loads((run / "onnx" / "manifest.json").read_bytes())["files"] == json.loads(before)["files"]

    aside.mkdir()  # beside a present folder it is only removed
    (aside / "stale").write_text("x")
    live = files.aside_name(run / "onnx", os.getppid())  # a running replacement's folder is left alone
    live.mkdir()
    new = tmp_path / "new"
    new.mkdir()
    (new / "marker").write_text("new")
    files.publish(new, run / "onnx")
    assert not aside.exists() and live.is_dir() and (run / "onnx" / "marker").read_text() == "new"
