"""`vae-dist runs`: a table (and JSON) of the runs in a folder, from the files each run holds."""

from __future__ import annotations

import json

from click.testing import CliRunner

from helpers import VAE_DIST, metrics, run, tiny_overrides
from vae_dist.config import load_config
from vae_dist.evaluate import evaluate_run
from vae_dist.listing import runs_command
from vae_dist.training import train


def tiny_config(runs, name, epochs, *extra):
    overrides = tiny_overrides(epochs=epochs, hidden_dims=[16], latent_dim=2, grid_samples=4, log_with=[])
    return load_config("linear", [*overrides, f"run.output_dir={runs}", f"run.name={name}", *extra])


def test_the_runs_of_a_folder_are_listed_with_what_they_hold(tmp_path, fashion_root):
    runs = tmp_path / "runs"
    # a finished run (binarised: bits/dim), evaluated twice and exported; then one stopped after 1 of its 3 epochs
    done = train(tiny_config(runs, "done", 2, "data.binarize=dynamic"), cpu=True).run_dir
    evaluate_run(str(done), k=1)
    best = evaluate_run(str(done), k=8)
    run([VAE_DIST, "export", str(done), "--variants", "fp16"])
    stopped = train(tiny_config(runs, "stopped", 1), cpu=True).run_dir
    (stopped / "model.safetensors").unlink()
    config_path = stopped / "config.yaml"
    config_path.write_text(config_path.read_text().replace("epochs: 1", "epochs: 3"))
    (runs / "not-a-run").mkdir()  # no config.yaml, no model: left out

    out = CliRunner().invoke(runs_command, ["--output-dir", str(runs), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == ["done", "stopped"]  # oldest first
    first, second = rows
    assert first["kind"] == "linear" and first["dataset"] == "fashion-mnist" and first["image_shape"] == [1, 28, 28]
    assert (first["epochs"], first["finished"]) == ("2/2", True)
    records = metrics(done)
    assert first["test_neg_elbo"] == records[-1]["test_neg_elbo"]
    assert first["test_bits_per_dim"] == records[-1]["test_bits_per_dim"] and second["test_bits_per_dim"] is None
    assert first["best_nll"] == {"nll": best["nll"], "k": 8, "split": "test"}
    assert first["export"] == "verified (fp16)" and first["export_verified"] and first["variants"] == ["fp16"]
    assert (second["epochs"], second["finished"], second["export"], second["best_nll"]) == ("1/3", False, "-", None)
    assert second["image_shape"] == [1, 28, 28]  # from the prepared data set: the run has no model file

    text = CliRunner().invoke(runs_command, ["--output-dir", str(runs)]).output.splitlines()
    assert text[0].split()[:3] == ["run", "model", "data"] and len(text) == 3
    elbo, bits = f"{records[-1]['test_neg_elbo']:.2f}", f"{records[-1]['test_bits_per_dim']:.4f}"
    assert text[1].split()[:7] == ["done", "linear", "fashion-mnist", "1x28x28", "2/2", elbo, bits]
    assert f"{best['nll']:.2f} (8)" in text[1] and "verified (fp16)" in text[1] and text[1].split()[-3] == "yes"
    grey = f"{metrics(stopped)[-1]['test_neg_elbo']:.2f}"  # Bernoulli on grey levels: no bits/dim
    assert text[2].split()[:7] == ["stopped", "linear", "fashion-mnist", "1x28x28", "1/3", grey, "-"]


def test_a_folder_that_is_not_there_is_one_line(tmp_path):
    out = CliRunner().invoke(runs_command, ["--output-dir", str(tmp_path / "nope")])
    assert out.exit_code == 2 and out.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a folder of runs; give one with --output-dir"
    ]
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(runs_command, ["--output-dir", str(tmp_path / "empty")])
    assert out.exit_code == 0 and out.output.strip() == f"no runs in {tmp_path / 'empty'}"
