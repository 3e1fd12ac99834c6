"""The hierarchical VAE and the discretised mixture of logistics through everything training
guarantees: 1 and 2 processes train the same model, a run killed with SIGKILL resumes to the same
weights (with the weights' average), reading from disk, tracking and the grids at several
temperatures, the importance-weighted estimate, and the refusals (export, bad layouts)."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    EVALUATE,
    VAE_DIST,
    checkpoint_step,
    json_lines,
    kill_when,
    launch_cmd,
    metrics,
    relative_l2,
    run,
    set_options,
    start,
    tiny_overrides,
    weights,
    write_idx_set,
)
from vae_dist import evaluate as ev
from vae_dist import hierarchical
from vae_dist.config import load_config
from vae_dist.data.prepare import prepare
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.losses import gaussian_kl
from vae_dist.models import build_model

# The shipped 28x28 config (binarised, AdamW, warm-up, clip and skip, weights' average, three
# temperatures), made tiny: one block per resolution, 8 channels, 2-channel latent groups.
TINY = tiny_overrides(
    train_subset=1280,
    test_subset=301,
    encoder_blocks="28x1,14x1,7x1,1x1",
    decoder_blocks="1x1,7x1,14x1,28x1",
    width=8,
    latent_channels=2,
    warmup_steps=5,
    ema=0.9,
    epochs=2,
    checkpoint_every=5,
    keep_checkpoints=3,
)
HIERARCHICAL = ["--config", "configs/hierarchical.yaml", *set_options(TINY)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("h1")
    run(launch_cmd(1, [*HIERARCHICAL, "--output-dir", str(out), "--name", "r"]))
    return out / "r"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("h2")
    run(launch_cmd(2, [*HIERARCHICAL, "--output-dir", str(out), "--name", "r"]))
    return out / "r"


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_hierarchical_model(one_process, two_processes):
    m1, m2 = metrics(one_process), metrics(two_processes)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [20, 40]
    diff = relative_l2(weights(one_process / "model.safetensors"), weights(two_processes / "model.safetensors"))
    print(f"hierarchical, relative L2 difference of the saved weights, 1 vs 2 processes: {diff:.3e}")
    assert diff <= 1e-5
    assert m1[-1]["test_images"] == m2[-1]["test_images"] == 301
    assert m1[-1]["test_neg_elbo"] == pytest.approx(m2[-1]["test_neg_elbo"], rel=1e-5)


@pytest.mark.slow
def test_the_hierarchical_run_is_tracked_and_drawn_at_every_temperature(one_process):
    lines = metrics(one_process)
    for m in lines:  # binarised images: the -ELBO is a probability of the data, in bits/dim too
        assert m["test_bits_per_dim"] == pytest.approx(m["test_neg_elbo"] / (784 * math.log(2)))
        assert m["skipped_updates"] == 0 and math.isfinite(m["train_loss"])
    assert lines[1]["test_neg_elbo"] < lines[0]["test_neg_elbo"]
    images = one_process / "images"
    for epoch in (0, 1):
        for stem in ("reconstruction", "samples", "samples_t0.8", "samples_t0.6"):
            assert (images / f"{stem}_epoch{epoch:03d}.png").is_file(), stem
    cold, warm = (np.asarray(Image.open(images / f"{s}_epoch001.png")) for s in ("samples_t0.6", "samples"))
    assert cold.shape == warm.shape and not np.array_equal(cold, warm)
    assert (one_process / "curves.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_killed_hierarchical_run_with_a_weights_average_resumes_to_the_same_weights(
    tmp_path, one_process, two_processes, nproc
):
    run_dir = tmp_path / "r"
    args = [*HIERARCHICAL, "--output-dir", str(tmp_path), "--name", "r"]
    proc = start(launch_cmd(nproc, args), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: checkpoint_step(run_dir) >= 25)  # mid second epoch
    assert not (run_dir / "model.safetensors").exists(), "the run finished before the kill"
    run(launch_cmd(nproc, [*args, "--resume", "auto"]))
    whole = {1: one_process, 2: two_processes}[nproc]
    a, b = weights(whole / "model.safetensors"), weights(run_dir / "model.safetensors")
    if nproc == 1:
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert relative_l2(a, b) <= 1e-6
    assert metrics(run_dir)[-1]["test_neg_elbo"] == pytest.approx(metrics(whole)[-1]["test_neg_elbo"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_reading_from_disk_train_the_same_hierarchical_model(tmp_path, one_process):
    run(launch_cmd(2, [*HIERARCHICAL, "--set", "data.in_memory=never", "--output-dir", str(tmp_path), "--name", "r"]))
    diff = relative_l2(weights(one_process / "model.safetensors"), weights(tmp_path / "r" / "model.safetensors"))
    assert diff <= 1e-5


@pytest.mark.slow
def test_evaluate_takes_a_hierarchical_run_on_one_and_two_processes(one_process, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (301, 28, 28), dtype=np.uint8)
    where = write_idx_set(tmp_path / "idx", images[:100], images[100:])  # Fashion-MNIST's files, 201 test images
    args = [str(one_process), "--k", "3", "--batch-size", "50", "--data", str(where), "--cpu"]
    for nproc in (1, 2):
        run(launch_cmd(nproc, args, script=EVALUATE), timeout=900)
    one, two = json_lines(one_process / "eval.jsonl")
    assert one["images"] == two["images"] == 201 and one["binarized"]
    for key in ("nll", "neg_elbo", "recon", "kl"):
        assert abs(one[key] - two[key]) < 1e-4, key
    assert one["nll_bits_per_dim"] == pytest.approx(one["nll"] / (784 * math.log(2)))


def test_the_estimate_of_a_hierarchical_model_is_its_importance_weights():
    """K=1 is log p(x|z) + log p(z) - log q(z|x) at the first latent (summed over the groups);
    the -ELBO beside it is the reconstruction there plus the closed-form KL along that latent;
    and the estimate tightens with K."""
    cfg = load_config("hierarchical", [o for o in TINY if o.startswith("model.")])
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28)).eval()
    x = (torch.rand(3, 1, 28, 28) < 0.3).float()
    one = ev.estimate(model, x, torch.arange(3), 1, 5, "bernoulli")
    eps = torch.stack([ev.image_noise(5, i, 0, model.latent_dim)[:1] for i in range(3)])
    with torch.no_grad():
        out, log_ratio, kl = model.importance(x, eps)
        out_f, kl_f = model(x, eps[:, 0])
    recon = PixelLikelihood("bernoulli", 1).nll(out_f, x).double()
    torch.testing.assert_close(one.recon, recon, rtol=0, atol=1e-3)
    torch.testing.assert_close(one.nll, recon - log_ratio[:, 0], rtol=0, atol=1e-3)
    torch.testing.assert_close(one.kl, kl_f.double(), rtol=0, atol=1e-3)
    many = ev.estimate(model, x, torch.arange(3), 200, 5, "bernoulli")
    assert many.nll.mean() < one.nll.mean()


def test_a_pointwise_product_is_the_1x1_convolution_forward_and_backward():
    torch.manual_seed(0)
    for bias in (True, False):
        conv = torch.nn.Conv2d(6, 5, 1, bias=bias)
        x = torch.randn(3, 6, 7, 4, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out = hierarchical.pointwise(x, conv.weight, conv.bias)
        ref = torch.nn.functional.conv2d(x_ref, conv.weight, conv.bias)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(ref)
        mine = torch.autograd.grad(out, [x, conv.weight], grad)
        theirs = torch.autograd.grad(ref, [x_ref, conv.weight], grad)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b)


def reference_top_down(model, x, eps):
    """The top-down pass as the module docstring states it, block by block with each module's own
    forward: the prior from the state h, the posterior from [h, encoder activations]."""
    acts = model._activations(x)
    noises = eps.split([math.prod(s) for s in model.group_shapes], dim=1)
    h, here, kl = None, None, 0
    for i, (r, group) in enumerate(zip(model.group_resolutions, model.groups)):
        if r != here:
            start = model.start[str(r)].expand(len(x), -1, -1, -1)
            h = start if h is None else torch.nn.functional.interpolate(h, size=model.sizes[r]) + start
            here = r
        p_mean, p_log_std, update = group.prior(h).split([group.zdim, group.zdim, group.width], dim=1)
        q_mean, q_log_std = group.posterior(torch.cat([h, acts[r]], dim=1)).chunk(2, dim=1)
        z = q_mean + q_log_std.exp() * noises[i].view(len(x), *model.group_shapes[i])
        kl = kl + gaussian_kl(q_mean, q_log_std, p_mean, p_log_std).flatten(1).sum(1)
        h = group.block(h + update + group.z_in(z))
    return model.head(h), kl


def test_the_posterior_shares_its_first_convolution_with_the_prior_and_the_encoder():
    """The forward pass computes the prior's and the posterior's first convolutions on the state as
    one, and the posterior's on the encoder's activations once per resolution: the same model."""
    cfg = load_config("hierarchical", ["model.width=8", "model.latent_channels=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, eps = torch.rand(3, 1, 28, 28), torch.randn(3, model.latent_dim)
    out, kl = model(x, eps)
    ref_out, ref_kl = reference_top_down(model, x, eps)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-3)
    params = list(model.parameters())
    mine = torch.autograd.grad(out.sum() + kl.sum(), params)
    theirs = torch.autograd.grad(ref_out.sum() + ref_kl.sum(), params)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def emoji_set(tmp_path_factory, emoji_dir):
    return prepare(str(emoji_dir), tmp_path_factory.mktemp("emoji") / "set", workers=2).out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["conv64", "hierarchical64"])
def test_the_mixture_of_logistics_trains_on_colour_images_in_bits_per_dim(tmp_path, emoji_set, config):
    """conv64 and hierarchical64 (made small) with `dlm` on 256 emoji: bits/dim recorded, the grids
    drawn from the mixture's mean, `vae-dist evaluate` in bits/dim, and the export refused."""
    small = ["encoder_blocks=64x1,32x1,16x1,8x1,1x1", "decoder_blocks=1x1,8x1,16x1,32x1,64x1", "width=8"]
    overrides = [f"data.path={emoji_set}", *tiny_overrides(batch_size=32, test_subset=40, epochs=2),
                 "loss.likelihood=dlm", "loss.mixtures=3", "train.ema=0", "train.warmup_steps=0",
                 f"run.output_dir={tmp_path}", "run.name=r"]
    overrides += [f"model.{o}" for o in small] if config == "hierarchical64" else []
    run([VAE_DIST, "train", "--config", config, *set_options(overrides)])
    first, m = metrics(tmp_path / "r")
    assert m["test_bits_per_dim"] == pytest.approx(m["test_neg_elbo"] / (12288 * math.log(2)))
    assert 0 < m["test_bits_per_dim"] < first["test_bits_per_dim"]
    grid = np.asarray(Image.open(tmp_path / "r" / "images" / "reconstruction_epoch000.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 1
    out = run([VAE_DIST, "evaluate", str(tmp_path / "r"), "--k", "2", "--batch-size", "50"]).stdout
    record = json_lines(tmp_path / "r" / "eval.jsonl")[-1]
    assert record["likelihood"] == "dlm" and record["nll_bits_per_dim"] == pytest.approx(
        record["nll"] / (12288 * math.log(2))
    )
    assert "bits/dim" in out
    refused = run([VAE_DIST, "export", str(tmp_path / "r")], check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "which the ONNX export does not carry yet" in refused.stderr
    assert not (tmp_path / "r" / "onnx").exists()


def test_evaluation_noise_is_one_row_per_image_however_the_split_is_cut():
    from vae_dist.epoch_end import evaluation_noise
    from vae_dist.rng import Stream, generator

    # a flat model's: one table from one generator, as every earlier version drew it, so the test
    # -ELBO recorded in an older model file comes back
    assert torch.equal(evaluation_noise(300, 20, 4), torch.randn(300, 20, generator=generator(4, Stream.EVAL_NOISE)))
    rows = torch.tensor([299, 3, 3, 150])
    for latent in (20, 50_000):  # a hierarchical model's, by blocks of images
        whole = evaluation_noise(300, latent, 4)
        assert whole.shape == (300, latent)
        assert torch.equal(evaluation_noise(300, latent, 4, rows), whole[rows])
        assert torch.equal(evaluation_noise(300, latent, 4, torch.arange(150, 300)), whole[150:])
        assert not torch.equal(evaluation_noise(300, latent, 5, rows), whole[rows])


@pytest.mark.slow
def test_the_api_gives_back_the_runs_figure_and_samples_at_a_temperature(one_process, fashion_root):
    """The Python API on the hierarchical run: the test -ELBO training recorded (on binarised
    copies of the test images, drawn as training drew them), samples at a temperature,
    reconstructions, and the flat-only calls refused in words."""
    import vae_dist
    from vae_dist.data import splits

    model = vae_dist.load(one_process, device="cpu")
    test = splits.load_split("fashion-mnist", False, fashion_root, subset=301).images.numpy()
    assert model.neg_elbo(test).mean() == pytest.approx(metrics(one_process)[-1]["test_neg_elbo"], rel=1e-6)
    warm, cold = model.sample(6, seed=1), model.sample(6, seed=1, temperature=0.5)
    assert warm.shape == cold.shape == (6, 1, 28, 28) and np.array_equal(warm, model.sample(6, seed=1))
    assert not np.array_equal(warm, cold) and 0 <= cold.min() and cold.max() <= 1
    assert model.reconstruct(test[:3]).shape == (3, 1, 28, 28)
    with pytest.raises(vae_dist.InputError, match="a hierarchical model has groups of latents"):
        model.encode(test[:2])
