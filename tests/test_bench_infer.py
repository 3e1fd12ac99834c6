"""The inference benchmark on tiny exports with a very short time budget: the output's shape, not
its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export import bench_infer
from export.pipeline import export_run
from helpers import make_run, run

pytestmark = pytest.mark.slow  # runs the benchmark end to end, several times

# A few variants keep the export short; the benchmark takes whatever the manifest lists.
VARIANTS = {"linear": ["int8-dynamic", "fp32-ort"], "conv": ["int8-static", "fp32-ort"]}
FAST = ["--seconds", "0.02", "--warmup", "0"]


def bench(args: list[str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "export.bench_infer", *args], 300, check=False, environ=os.environ)


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for kind, variants in VARIANTS.items():
        assert export_run(make_run(runs, kind, kind), variants=variants).verified
    make_run(runs, "not-exported", "linear", latent_dim=2)  # a run without an export is not a benchmark target
    return runs


@pytest.fixture(scope="module")
def result(bench_runs, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench") / "infer.json"
    proc = bench(["--output-dir", str(bench_runs), "--json", str(out), *FAST])
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_json_has_every_measurement(result):
    _, doc = result
    assert doc["format"] == bench_infer.FORMAT
    assert doc["settings"]["threads"] == doc["settings"]["torch_threads"] == 1
    assert doc["settings"]["inter_op_threads"] == 1 and doc["settings"]["batch_sizes"] == [1, 64]
    assert doc["machine"]["logical_cpus"] >= 1 and doc["versions"]["onnxruntime"]
    assert [m["kind"] for m in doc["models"]] == ["conv", "linear"]
    measured = {(r["kind"], r["role"], r["variant"], r["batch"]) for r in doc["results"]}
    expected = {
        (kind, role, variant, batch)
        for kind, variants in VARIANTS.items()
        for role in ("encoder", "decoder")
        for variant in ("torch-eager", "fp32", *variants)
        for batch in (1, 64)
    }
    assert measured == expected and len(doc["results"]) == len(expected)
    for r in doc["results"]:
        assert r["calls"] >= 3 and 0 < r["p50_ms"] <= r["p90_ms"] and r["images_per_s"] > 0 and r["vs_torch"] > 0
        assert r["size_bytes"] > 0
        if r["runtime"] == "torch":
            assert r["file"] is None and r["format"] == "torch"
        else:
            assert r["file"].startswith(r["role"]) and r["status"] == "verified"
            assert r["format"] == ("ort" if r["file"].endswith(".ort") else "onnx")
    q = doc["quality"]["conv"]["int8-static"]
    assert q["status"] == "verified" and q["images"] == 10000 and "neg_elbo_change" in q


def test_every_target_has_a_verdict(result):
    _, doc = result
    names = [t["name"] for t in doc["targets"]]
    assert names == [
        "linear decoder, batch 1: onnxruntime fp32 p50 <= 0.5 x PyTorch eager p50",
        "conv decoder, batch 1: onnxruntime fp32 p50 <= 1 x PyTorch eager p50",
        "conv int8-static decoder file <= 30% of fp32's",
        "conv int8-static quality: |test -ELBO change| <= budget",
        "linear int8-dynamic decoder file <= 30% of fp32's",
        "linear int8-dynamic quality: |test -ELBO change| <= budget",
    ]
    for t in doc["targets"]:
        assert isinstance(t["passed"], bool) and t["measured"] >= 0 and t["limit"] > 0 and t["detail"]


def test_printed_table_and_verdicts(result):
    proc, doc = result
    lines = proc.stdout.splitlines()
    assert lines[1].split() == [
        "model",
        "part",
        "variant",
        "status",
        "size",
        "batch",
        "p50",
        "ms",
        "p90",
        "ms",
        "images/s",
        "vs",
        "torch",
    ]
    assert sum(line.startswith(("conv ", "linear ")) and " ms" not in line for line in lines) >= len(doc["results"])
    assert "quality cost against fp32 torch" in proc.stdout
    verdicts = [line.split()[0] for line in lines if line.startswith("  ") and ": " in line]
    assert len(verdicts) == len(doc["targets"]) and set(verdicts) <= {"PASS", "MISS"}, proc.stdout


def test_an_explicit_run_other_batch_sizes_and_threads(bench_runs, tmp_path):
    out = tmp_path / "b.json"
    proc = bench([str(bench_runs / "linear"), "--batch-sizes", "3", "--threads", "2", "--json", str(out), *FAST])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert {r["batch"] for r in doc["results"]} == {3} and {r["kind"] for r in doc["results"]} == {"linear"}
    assert doc["settings"]["threads"] == doc["settings"]["torch_threads"] == 2
    latency = [t for t in doc["targets"] if "batch 1" in t["name"]]
    assert [t["passed"] for t in latency] == [None, None]  # not measured at batch 1
    assert "n/a  linear decoder, batch 1" in proc.stdout


def test_without_an_export_it_says_what_to_do(tmp_path):
    proc = bench(["--output-dir", str(tmp_path), "--json", str(tmp_path / "x.json"), *FAST])
    assert proc.returncode == 2 and "no verified export under" in proc.stderr and "vae-dist export" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_target_verdicts():
    def row(kind, variant, p50, size=1000, role="decoder", batch=1):
        return {"kind": kind, "variant": variant, "role": role, "batch": batch, "p50_ms": p50, "size_bytes": size}

    rows = [
        row("linear", "torch-eager", 1.0),
        row("linear", "fp32", 0.6, 1000),
        row("linear", "int8-dynamic", 0.3, 250),
        row("conv", "torch-eager", 1.0),
        row("conv", "fp32", 0.9, 1000),
        row("conv", "int8-static", 0.5, 400),
    ]
    models = [
        {
            "model": {"kind": "linear", "quality_budget": 0.5},
            "quality": {"int8-dynamic": {"status": "verified", "neg_elbo_change": -0.2}},
        },
        {
            "model": {"kind": "conv", "quality_budget": 0.5},
            "quality": {"int8-static": {"status": "rejected", "neg_elbo_change": 0.7}},
        },
    ]
    verdicts = {t["name"]: t["passed"] for t in bench_infer.evaluate_targets(models, rows)}
    assert verdicts == {
        "linear decoder, batch 1: onnxruntime fp32 p50 <= 0.5 x PyTorch eager p50": False,  # 0.6 x
        "conv decoder, batch 1: onnxruntime fp32 p50 <= 1 x PyTorch eager p50": True,
        "linear int8-dynamic decoder file <= 30% of fp32's": True,
        "linear int8-dynamic quality: |test -ELBO change| <= budget": True,
        "conv int8-static decoder file <= 30% of fp32's": False,
        "conv int8-static quality: |test -ELBO change| <= budget": False,
    }
