"""End-to-end runs of the real training script on real Fashion-MNIST."""

import json
import math
import signal

import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image

import vae_dist.step
from helpers import ROOT, file_hashes, launch_cmd, metrics, poisoned_losses, run, set_options, tiny_overrides, weights
from vae_dist import epoch_end, runs, training
from vae_dist.artifacts import load_model
from vae_dist.config import load_config
from vae_dist.data import splits
from vae_dist.ema import WeightAverage
from vae_dist.record import read as read_record
from vae_dist.stopping import Stopped, StopRequest
from vae_dist.training import train


def small(**changes) -> list[str]:
    """A tiny run on more images: 16 steps of 64 an epoch, 300 test images."""
    return tiny_overrides(train_subset=1024, test_subset=300, **changes)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_accelerate_launch_writes_the_run(tmp_path, kind):
    args = ["--config", f"configs/{kind}.yaml", "--output-dir", str(tmp_path), "--name", "r"]
    out = run(launch_cmd(1, [*args, *set_options(small(epochs=2))]))
    run_dir = tmp_path / "r"
    assert out.stdout.strip().splitlines()[-1] == str(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["kind"] == kind and saved["train"]["epochs"] == 2
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["test_images"] == 300 and r["processes"] == 1
        assert r["test_neg_elbo"] == pytest.approx(r["test_recon"] + r["test_kl"])
        assert 0 < r["test_kl"] < r["test_neg_elbo"] < 800 and r["images_per_s"] > 0
    assert records[1]["test_neg_elbo"] < records[0]["test_neg_elbo"]
    for epoch in (0, 1):
        for stem in ("reconstruction", "samples"):
            png = run_dir / "images" / f"{stem}_epoch{epoch:03d}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            # 28-pixel images 2 pixels apart, upscaled 3 times so that each is 84 pixels wide
            rows, cols = (2, 8) if stem == "reconstruction" else (8, 8)
            assert Image.open(png).size == (3 * (2 + cols * 30), 3 * (2 + rows * 30))
    # the model file rebuilds the model without the YAML
    model, record = load_model(run_dir / "model.safetensors")
    assert record.kind == kind and record.image_shape == (1, 28, 28)
    assert record.test_neg_elbo == pytest.approx(records[-1]["test_neg_elbo"])
    assert record.eval_seed == 0  # export verification draws the same evaluation noise
    mu, logvar = model.encode(torch.rand(2, 1, 28, 28))
    assert mu.shape == (2, 20)
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints default


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("precious")
    out = run(
        launch_cmd(1, ["--config", "configs/linear.yaml", "--output-dir", str(tmp_path), "--name", "r"]), check=False
    )
    assert out.returncode != 0 and "error: run directory" in out.stderr and "already holds a run" in out.stderr
    assert (tmp_path / "r" / "config.yaml").read_text() == "precious"


def test_an_auto_named_run_records_its_name(tmp_path):
    cfg = load_config("linear", [*small(), f"run.output_dir={tmp_path}"])
    assert cfg.run.name is None
    run_dir = train(cfg, cpu=True).run_dir
    assert run_dir.parent == tmp_path and run_dir.name.startswith("linear-")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"] == {"name": run_dir.name, "output_dir": str(tmp_path), "log_with": ["tensorboard"]}


def test_a_bug_while_deciding_the_run_keeps_its_traceback(tmp_path, monkeypatch):
    """User mistakes become one line; a programming error must not be disguised as one."""

    def broken(cfg, resume, hold):
        raise KeyError("a bug")

    monkeypatch.setattr(runs, "decide_run", broken)
    cfg = load_config("linear", [*small(), f"run.output_dir={tmp_path}", "run.name=r"])
    with pytest.raises(KeyError, match="a bug"):
        train(cfg, cpu=True)
    monkeypatch.undo()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("precious")
    with pytest.raises(runs.ResumeError, match="already holds a run"):
        train(cfg, cpu=True)
    assert not (tmp_path / "r" / "images").exists()


@pytest.mark.slow
def test_linear_vae_quality_after_one_epoch(tmp_path, fashion_root):
    """The classic 784-400-20 VAE, one epoch of real Fashion-MNIST: test -ELBO below 270 nats."""
    cfg = load_config(ROOT / "configs/linear.yaml", ["train.epochs=1", f"run.output_dir={tmp_path}", "run.name=q"])
    result = train(cfg, cpu=True)
    assert result.metrics["test_images"] == 10000
    assert result.metrics["test_neg_elbo"] < 270
    assert read_record(result.run_dir / "model.safetensors").test_neg_elbo < 270


def test_the_one_process_step_equals_accelerates_wrapped_step(monkeypatch):
    """With one process, no accumulation and no loss scaling the step skips Accelerate's wrappers:
    bitwise the same weights as going through them."""
    from accelerate import Accelerator

    import vae_dist.step as T
    from vae_dist.models import build_model

    accelerator = Accelerator(cpu=True)
    cfg = load_config("linear", ["model.hidden_dims=[64]"])
    assert T._wrappers_do_nothing(accelerator)
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg.model, (1, 28, 28))
        pairs.append(accelerator.prepare(model, T.make_optimizer(model, cfg, accelerator.device)))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(32, 1, 28, 28, generator=g), torch.randn(32, 20, generator=g)) for _ in range(10)]
    for (x, eps) in batches:
        T.micro_step(accelerator, *pairs[0], x, eps, 1.0, "bernoulli")
    monkeypatch.setattr(T, "_wrappers_do_nothing", lambda accelerator: False)
    for (x, eps) in batches:
        T.micro_step(accelerator, *pairs[1], x, eps, 1.0, "bernoulli")
    (a, _), (b, _) = pairs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    torch.manual_seed(0)
    initial = build_model(cfg.model, (1, 28, 28))
    assert not torch.equal(a.decoder[-1].weight, initial.decoder[-1].weight)  # it did train


@pytest.mark.parametrize("content", [b"model: [unclosed\n", b"\xff\xfe\x00binary", b"model: 3\n"])
def test_a_damaged_saved_config_refuses_the_resume_in_one_line(tmp_path, content):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000010" / runs.STATE_FILE).write_text("{}")
    (run_dir / "config.yaml").write_bytes(content)
    cfg = load_config("linear", [f"run.output_dir={tmp_path}", "run.name=r"])
    with pytest.raises(runs.ResumeError, match="config.yaml") as e:
        runs.decide_run(cfg, "auto")
    assert "\n" not in str(e.value)


def test_a_finished_run_resumed_is_a_no_op_and_a_run_without_checkpoints_is_never_restarted(tmp_path):
    import shutil

    def cfg():
        return load_config("linear", [*small(), f"run.output_dir={tmp_path}", "run.name=r"])

    first = train(cfg(), cpu=True)
    before = file_hashes(first.run_dir)
    again = train(cfg(), resume="auto", cpu=True)  # finished: nothing to do, nothing written
    assert file_hashes(first.run_dir) == before
    assert again.metrics["test_neg_elbo"] == first.metrics["test_neg_elbo"]
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    shutil.rmtree(first.run_dir / "checkpoints")
    before = file_hashes(first.run_dir)
    other = load_config("conv", [*small(), f"run.output_dir={tmp_path}", "run.name=r"])
    with pytest.raises(runs.ResumeError, match="holds a model but no checkpoint to resume from"):
        train(other, resume="auto", cpu=True)
    assert file_hashes(first.run_dir) == before


def test_a_run_stopped_before_its_first_checkpoint_starts_again_only_with_its_own_config(tmp_path):
    cfg = load_config("linear", [*small(), f"run.output_dir={tmp_path}", "run.name=r"])
    (tmp_path / "r").mkdir()
    runs.write_config(tmp_path / "r", cfg)  # what a run killed before its first checkpoint leaves
    other = load_config("linear", [*small(), "train.lr=0.01", f"run.output_dir={tmp_path}"])
    other.run.name = "r"
    with pytest.raises(runs.ResumeError, match=r"different configuration: train.lr \(0.001 -> 0.01\)"):
        train(other, resume="auto", cpu=True)
    assert train(cfg, resume="auto", cpu=True).metrics["epoch"] == 0
    assert (tmp_path / "r" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes_to_the_same_model(tmp_path):
    """The disk fills while the first checkpoint is written: one line names the file and says how
    to continue; after space is freed, the run (which had no checkpoint yet) starts again with its
    own configuration and ends bitwise where an uninterrupted one does."""
    from helpers import VAE_DIST, full_disk, weights

    args = ["train", "--config", "linear", "--name", "r", *set_options(small(epochs=2, checkpoint_every=8))]
    run([VAE_DIST, *args, "--output-dir", str(tmp_path / "whole")])
    # Room for the configuration and grids, not for the optimizer state (~5 MB).
    with full_disk(tmp_path / "small", 1_000_000) as (preexec, mechanism):
        out = run(
            [VAE_DIST, *args, "--output-dir", str(tmp_path / "small")], check=False, preexec_fn=preexec
        )
    assert out.returncode == 2, (mechanism, out.stderr[-2000:])
    error = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert error.startswith("error: could not write ") and "nothing the run wrote before is lost" in error, error
    assert "the run has no checkpoint yet" in error and "--name r" in error and "--resume auto" in error
    run_dir = tmp_path / "small" / "r"
    assert list((run_dir / "checkpoints").iterdir()) == []  # the partial checkpoint is removed
    assert not (run_dir / "model.safetensors").exists()
    run([VAE_DIST, *args, "--output-dir", str(tmp_path / "small"), "--resume", "auto"])
    a, b = weights(tmp_path / "whole" / "r" / "model.safetensors"), weights(run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", ".", "..", "a/b"])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    runs_dir = tmp_path / "runs"
    cfg = load_config("linear", [*small(), f"run.output_dir={runs_dir}"])
    cfg.run.name = name
    with pytest.raises(runs.ResumeError, match="not a plain folder name"):
        train(cfg, cpu=True)
    assert not any(tmp_path.rglob("*.yaml"))


def test_reading_from_disk_trains_bitwise_the_same_model_as_reading_from_memory(tmp_path):
    results = {}
    for mode in ("always", "never"):
        cfg = load_config(
            "conv",
            [*small(), f"data.in_memory={mode}", f"run.output_dir={tmp_path}", f"run.name={mode}"],
        )
        results[mode] = train(cfg, cpu=True)
    a, b = (results[m].model.state_dict() for m in ("always", "never"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["always"].metrics["test_neg_elbo"] == results["never"].metrics["test_neg_elbo"]
    grids = [(tmp_path / m / "images" / "reconstruction_epoch000.png").read_bytes() for m in ("always", "never")]
    assert grids[0] == grids[1]


def test_a_run_with_checkpoints_but_no_saved_config_is_not_resumed(tmp_path):
    """Without config.yaml nothing says what the checkpoints were trained with: refused."""
    (tmp_path / "r" / "checkpoints" / "step-00000010").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step-00000010" / runs.STATE_FILE).write_text("{}")
    cfg = load_config("linear", [f"run.output_dir={tmp_path}", "run.name=r"])
    with pytest.raises(runs.ResumeError, match="config.yaml cannot be read"):
        runs.decide_run(cfg, "auto")


@pytest.mark.parametrize("accum", [1, 2])
def test_a_guarded_run_skips_a_non_finite_update_counts_it_and_warms_up(
    tmp_path, fashion_root, monkeypatch, caplog, accum
):
    # Without the guard the same NaN stops the run (training.Diverged); with it the update is
    # skipped, counted in metrics.jsonl and the epoch's log line, and training goes on.
    poisoned = poisoned_losses(vae_dist.step.negative_elbo, {3})
    monkeypatch.setattr(vae_dist.step, "negative_elbo", poisoned)
    overrides = tiny_overrides(train_subset=512, test_subset=128, epochs=1, log_with=[])
    cfg = load_config("linear", [*overrides, "train.skip_threshold=1e9", "train.grad_clip=50", "train.warmup_steps=100",
                                 "train.weight_decay=0.01", f"train.grad_accum_steps={accum}",
                                 f"run.output_dir={tmp_path}", "run.name=g"])
    rates, step_of = [], training.micro_step  # the learning rate each update was made with

    def recording(acc, model, optimizer, *args):
        rates.append(optimizer.param_groups[0]["lr"])
        return step_of(acc, model, optimizer, *args)

    monkeypatch.setattr(training, "micro_step", recording)
    caplog.set_level("INFO")
    result = train(cfg, cpu=True)
    expected = [1e-3 * (step + 1) / 100 for step in range(8)]  # 512 images, batch 64
    assert rates == pytest.approx([rate for rate in expected for _ in range(accum)])  # each micro-batch
    (line,) = metrics(result.run_dir)
    assert line["skipped_updates"] == 1 and math.isfinite(line["train_loss"]) and line["train_loss"] > 0
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert "1 update(s) skipped" in caplog.text
    poisoned.calls = 0
    with pytest.raises(training.Diverged):
        train(load_config("linear", [*overrides, f"run.output_dir={tmp_path}", "run.name=unguarded"]), cpu=True)


def test_the_weights_average_is_evaluated_saved_and_resumed_bitwise(tmp_path, fashion_root):
    # With train.ema the model file, the grids and the test -ELBO are the average's; a run stopped
    # at its first epoch's checkpoint and resumed ends bitwise where an uninterrupted one does.
    def config(name: str, epochs: int):
        return load_config("linear", [*small(epochs=epochs), "train.ema=0.9", f"run.output_dir={tmp_path}",
                                      f"run.name={name}"])

    whole = train(config("whole", 2), cpu=True)
    train(config("resumed", 1), cpu=True)
    resumed = train(config("resumed", 2), resume="auto", cpu=True)
    assert file_hashes(whole.run_dir, ("model.safetensors",)) == file_hashes(resumed.run_dir, ("model.safetensors",))
    assert metrics(whole.run_dir) == [{**m, "seconds": w["seconds"], "images_per_s": w["images_per_s"]}
                                      for m, w in zip(metrics(resumed.run_dir), metrics(whole.run_dir))]
    saved, _ = load_model(whole.run_dir / "model.safetensors")
    checkpoint = runs.list_checkpoints(whole.run_dir)[-1]  # the last epoch's: the raw weights
    raw = weights(checkpoint / runs.CHECKPOINT_MODEL_FILE)
    average = saved.state_dict()
    assert all(torch.isfinite(average[k]).all() for k in raw) and not all(torch.equal(average[k], raw[k]) for k in raw)
    test = splits.load_split("fashion-mnist", False, fashion_root, subset=300)
    again = epoch_end.test_elbo(Accelerator(cpu=True), saved, "bernoulli", test, config("whole", 2))
    assert again["test_neg_elbo"] == pytest.approx(whole.metrics["test_neg_elbo"], abs=1e-9)


def test_a_weights_average_follows_its_decay_after_a_warm_up():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, 0.75)
    assert [average.decay_at(n) for n in (1, 2, 26, 1000)] == [2 / 11, 3 / 12, 0.75, 0.75]
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(4.0)
    average.update(model)
    for a, b in zip(average.model.parameters(), before):
        assert torch.allclose(a, b + 4.0 * 9 / 11)  # 2/11 * w + 9/11 * (w + 4)
    state = average.state_dict()
    fresh = WeightAverage(torch.nn.Linear(2, 1), 0.75)
    fresh.load_state_dict(state)
    assert fresh.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), average.model.parameters()))
    del state["updates"]  # as saved before updates were counted: the configured decay from then on
    fresh.load_state_dict(state)
    assert fresh.decay_at(fresh.updates + 1) == 0.75


def test_a_checkpoint_from_before_a_state_field_existed_is_resumed(tmp_path, fashion_root):
    cfg = load_config("linear", [*small(epochs=1), f"run.output_dir={tmp_path}", "run.name=old"])
    first = train(cfg, cpu=True)
    for checkpoint in runs.list_checkpoints(first.run_dir):
        path = checkpoint / runs.STATE_FILE
        state = yaml.safe_load(path.read_text())
        del state["epoch_skipped"]  # as written before skipped updates were counted
        path.write_text(json.dumps(state))
    again = load_config("linear", [*small(epochs=2), f"run.output_dir={tmp_path}", "run.name=old"])
    assert [m["epoch"] for m in metrics(train(again, resume="auto", cpu=True).run_dir)] == [0, 1]


def test_a_run_with_a_weights_average_stopped_mid_epoch_resumes_bitwise(tmp_path, fashion_root, monkeypatch):
    # Stopped (SIGTERM) after step 11 of 16 in the first epoch, its checkpoint then holding the
    # average and the epoch's skipped update: the resumed run ends bitwise where a whole one does.
    extra = ["train.ema=0.9", "train.grad_clip=1.0", "train.checkpoint_every=5"]

    def config(name: str):
        return load_config("linear", [*small(epochs=2), *extra, f"run.output_dir={tmp_path}", f"run.name={name}"])

    poisoned = poisoned_losses(vae_dist.step.negative_elbo, {4, 20})  # updates 4 and 20 skipped, in every run
    monkeypatch.setattr(vae_dist.step, "negative_elbo", poisoned)
    whole = train(config("whole"), cpu=True)
    poisoned.calls = 0
    asked = []
    with monkeypatch.context() as stopping:
        stopping.setattr(
            StopRequest, "requested", lambda self: asked.append(1) or (signal.SIGTERM if len(asked) == 11 else 0)
        )
        with pytest.raises(Stopped):
            train(config("stopped"), cpu=True)
    resumed = train(config("stopped"), resume="auto", cpu=True)  # its updates count on from 12
    assert file_hashes(whole.run_dir, ("model.safetensors",)) == file_hashes(resumed.run_dir, ("model.safetensors",))
    assert [m["skipped_updates"] for m in metrics(whole.run_dir)] == [1, 1]
    assert [m["skipped_updates"] for m in metrics(resumed.run_dir)] == [1, 1]
