"""The training benchmark: it runs for any timing window, and reports start-up and step figures."""
from __future__ import annotations

import json
import os
import sys

import pytest

from helpers import EMOJI_FILES, EMOJI_TRAIN, run
from vae_dist.bench import endless


def test_endless_starts_a_new_pass_when_one_ends():
    passes = []

    def make():
        passes.append(len(passes))
        return iter(range(3))

    it = endless(make)
    assert [next(it) for _ in range(10)] == [0, 1, 2] * 3 + [0]
    assert passes == [0, 1, 2, 3]


def test_bad_options_are_refused():
    proc = run([sys.executable, "-m", "vae_dist.bench", "--batch-size", "0"], check=False)
    assert proc.returncode == 2 and "Invalid value for '--batch-size'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_benchmark_reports_start_up_and_step_figures(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "-m", "vae_dist.bench", "--seconds", "0.3", "--rounds", "2", "--runs", "1"]
    cmd += ["--run-epochs", "2", "--deep-batch", "2", "--json", str(out)]
    proc = run(cmd, check=False, environ=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    # The loop users run: a new run through each entry point, as a user types it.
    runs = result["runs"]["runs"]
    assert [r["entry"] for r in runs] == ["vae-dist train", "accelerate launch"]
    assert runs[1]["command"][1:4] == ["-m", "accelerate.commands.launch", "--num_processes"]
    for r in runs:
        assert r["epochs"] == 2 and len(r["epoch_images_per_s"]) == 2
        assert 0 < r["seconds_to_first_step"] < r["seconds"] and r["images_per_s"] > 0
    assert result["runs"]["launch_of_train"] == pytest.approx(runs[1]["images_per_s"] / runs[0]["images_per_s"])
    # ... and its epochs phase by phase: they add up to the epoch, the steps the most of it.
    epoch = result["epoch"]
    assert len(epoch["per_epoch"]) == 2
    for e in epoch["per_epoch"]:
        phases = e["phases"]  # "other": the epoch less its timed phases, so none may overlap another
        assert all(seconds >= 0 for seconds in phases.values()) and phases["other"] < 0.5 * e["seconds"]
        assert all(phases[p] > 0 for p in ("steps", "evaluation", "grids", "checkpoint"))
        assert phases["steps"] == max(phases.values())
    assert 0 < epoch["non_step_share"] < 1 and epoch["after_last_epoch"] > 0
    assert "accelerate launch / vae-dist train, images/s:" in proc.stdout
    assert "besides the steps:" in proc.stdout
    assert [m["model"] for m in result["models"]] == ["linear", "conv"]
    for m in result["models"]:
        assert len(m["rounds"]) == 2
        assert 0 < m["fraction_of_matmul"] < 1.5 and 0 < m["classic_fraction_of_matmul"] < 1.5
        assert m["step_flops"] > 4e8 and m["images_per_s"] > 0
    # The data rows: prepare's speed on the emoji PNGs; from disk against in memory on both sets.
    preparing, reading = result["data"]["prepare"], result["data"]["reading"]
    assert [r["workers"] for r in preparing] == sorted({1, len(os.sched_getaffinity(0))})
    assert all(r["files"] == EMOJI_FILES and r["images_per_s"] > 0 for r in preparing)
    assert [(r["config"], r["image_shape"], r["train_images"]) for r in reading] == [
        ("linear", [1, 28, 28], 60000),
        ("conv64", [3, 64, 64], EMOJI_TRAIN),
    ]
    for r in reading:
        assert len(r["rounds"]) == 2 and r["memory_images_per_s"] > 0 and r["disk_images_per_s"] > 0
        assert 0 < r["disk_of_memory"] < 5 and r["read_only_images_per_s"] > 0
    # the hierarchical models' step in float32 and bfloat16, and its share in convolutions
    deep = result["hierarchical"]
    assert [(r["config"], r["image_shape"], r["likelihood"]) for r in deep] == [
        ("hierarchical", [1, 28, 28], "bernoulli"),
        ("hierarchical64", [3, 64, 64], "dlm"),
    ]
    for r in deep:
        assert len(r["rounds"]) == 2 and r["float32_images_per_s"] > 0 and r["bfloat16_images_per_s"] > 0
        assert 0 < r["convolution_share"] < 1
    assert "convolutions" in proc.stdout and "of the float32 step" in proc.stdout
    # evaluate's estimate at K=5000, both models: its speed and FLOP fraction, and the 10,000-image time
    assert [(r["model"], r["k"]) for r in result["evaluate"]] == [("linear", 5000), ("conv", 5000)]
    for r in result["evaluate"]:
        assert r["flops"] > r["images"] * 5000 * 6e5 and 0 < r["fraction_of_matmul"] < 1.5
        assert r["seconds_for_10000"] == pytest.approx(10000 / r["images_per_s"], rel=1e-9)
    assert "evaluate linear K=5000:" in proc.stdout
    assert f"vae-dist prepare, {EMOJI_FILES} PNG files of 64x64, 1 worker(s)" in proc.stdout
