"""`vae-dist evaluate`: the importance-weighted likelihood estimate, checked against the one-sample
-ELBO, against log p(x) integrated numerically for a 1-D latent, across chunkings and processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from helpers import EVALUATE, VAE_DIST, file_size_limit, json_lines, launch_cmd, make_run, run
from vae_dist import evaluate as ev
from vae_dist.config import ModelConfig
from vae_dist.losses import log_likelihood_samples, reconstruction_nll
from vae_dist.models import build_model


def tiny(shape=(1, 28, 28), latent=4, hidden=(32,), seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind="linear", latent_dim=latent, hidden_dims=list(hidden)), shape).eval()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_likelihood_of_samples_is_minus_the_reconstruction_nll(likelihood):
    logits, x = torch.randn(5, 3, 1, 7, 7), torch.rand(5, 1, 7, 7)
    got = log_likelihood_samples(logits, x, likelihood)
    want = -torch.stack([reconstruction_nll(logits[:, s], x, likelihood) for s in range(3)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_k_1_is_the_one_sample_elbo_with_the_same_noise():
    """log p(x|z) + log p(z) - log q(z|x) at the first latent, computed here with torch.distributions."""
    model, x = tiny(), torch.rand(6, 1, 28, 28)
    got = ev.estimate(model, x, torch.arange(6), 1, 7, "bernoulli")
    eps = torch.stack([ev.image_noise(7, i, 0, model.latent_dim)[0] for i in range(6)])
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = reconstruction_nll(model.decode(z), x, "bernoulli")
        one_sample = recon + Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1) - Normal(0, 1).log_prob(z).sum(1)
    torch.testing.assert_close(got.nll, one_sample.double(), rtol=0, atol=1e-3)
    torch.testing.assert_close(got.recon, recon.double(), rtol=0, atol=1e-3)
    # the reported -ELBO is that reconstruction term plus the closed-form KL (training's figure)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    torch.testing.assert_close(got.kl, kl.double(), rtol=0, atol=1e-4)


def exact_nll(model, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) of a 1-D latent model with a Bernoulli decoder: the integral of p(x|z) p(z) over
    z in [-12, 12], on a grid of 48001 points."""
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits = model.decode(z.float()).double().flatten(1)  # [G, pixels]
    x = x.double().flatten(1)
    log_px = x @ logits.T - torch.nn.functional.softplus(logits).sum(1)  # [N, G]
    log_pz = Normal(0.0, 1.0).log_prob(z[:, 0])
    return -(torch.logsumexp(log_px + log_pz, 1) + math.log((z[1] - z[0]).item()))


def test_the_estimate_reaches_the_integrated_likelihood_and_tightens_with_k():
    """A model with a 1-D latent whose decoder depends strongly on z (a narrow posterior the
    encoder does not match), on 500 random binary 6x6 images: the mean NLL_K falls from K=1 to 50 to
    5000, and at K=5000 it is within 0.05 nats of the exact mean -log p(x) (each image within 0.1)."""
    model = tiny(shape=(1, 6, 6), latent=1, hidden=(16,))
    with torch.no_grad():
        model.decoder[-1].weight.mul_(3)
    x = (torch.rand(500, 1, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    exact = exact_nll(model, x)
    nll = {k: ev.estimate(model, x, torch.arange(500), k, 0, "bernoulli").nll for k in (1, 50, 5000)}
    assert nll[1].mean() > nll[50].mean() > nll[5000].mean()
    assert abs(nll[5000].mean() - exact.mean()) < 0.05
    assert (nll[5000] - exact).abs().max() < 0.1
    assert (nll[1] - exact).mean() > 0.5  # K = 1 is clearly above: the test can tell them apart


def test_chunking_and_batching_do_not_change_the_figures(monkeypatch):
    model, images = tiny(), (torch.rand(10, 1, 28, 28) * 255).to(torch.uint8)

    class One:  # what evaluate_split needs of an Accelerator, for one process
        num_processes, process_index, device = 1, 0, torch.device("cpu")

        @staticmethod
        def gather(t):
            return t

    whole = ev.evaluate_split(One, model, images, 300, 0, "bernoulli", False, batch_size=10)
    monkeypatch.setattr(ev, "MEMORY_BUDGET", 784 * 4 * ev.BLOCK)  # one block of one image per decoder call
    parts = ev.evaluate_split(One, model, images, 300, 0, "bernoulli", False, batch_size=3)
    assert parts.keys() == whole.keys()
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], rel=1e-7), key  # float32 rounding of the sums


def test_a_chunk_stays_within_the_memory_budget():
    for pixels in (784, 3 * 64 * 64, 3 * 256 * 256):
        images = ev.images_per_pass(100, pixels)
        for k in (1, 5000):
            blocks = ev.chunk_blocks(images, pixels, k)
            assert images * blocks * ev.BLOCK * pixels * 4 <= max(ev.MEMORY_BUDGET, ev.BLOCK * pixels * 4)
            assert blocks * ev.BLOCK < k + ev.BLOCK  # never more latents than K needs


def test_binarised_images_are_drawn_once_per_image():
    x = torch.rand(4, 1, 28, 28)
    a, b = ev.binarized(x, torch.arange(4), 0), ev.binarized(x[2:], torch.arange(2, 4), 0)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and torch.equal(a[2:], b)
    assert abs(a.mean().item() - x.mean().item()) < 0.02
    assert not torch.equal(a, ev.binarized(x, torch.arange(4), 1))


def test_evaluate_appends_one_line_per_evaluation(tmp_path, fashion_root):
    run_dir = make_run(tmp_path / "runs", "tiny", "linear")
    for k in (1, 20):
        out = run([VAE_DIST, "evaluate", str(run_dir), "--k", str(k), "--batch-size", "500"])
        assert f"NLL (K={k})" in out.stdout and "10000 test images" in out.stdout, out.stdout
    records = json_lines(run_dir / "eval.jsonl")
    assert [r["k"] for r in records] == [1, 20]
    for r in records:
        assert r["images"] == 10000 and r["split"] == "test" and r["processes"] == 1 and not r["binarized"]
        assert r["nll_bits_per_dim"] == pytest.approx(r["nll"] / (784 * math.log(2)))
        assert r["neg_elbo"] == pytest.approx(r["recon"] + r["kl"])
    assert records[0]["neg_elbo"] == pytest.approx(records[1]["neg_elbo"])  # the same first latent
    assert records[1]["nll"] < records[0]["nll"]


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_figure(tmp_path, fashion_root):
    run_dir = make_run(tmp_path / "runs", "tiny", "linear")
    args = [str(run_dir), "--k", "64", "--batch-size", "250", "--cpu"]
    for nproc in (1, 2):
        run(launch_cmd(nproc, args, script=EVALUATE), timeout=900)
    one, two = json_lines(run_dir / "eval.jsonl")
    assert (one["processes"], two["processes"]) == (1, 2) and one["images"] == two["images"] == 10000
    for key in ("nll", "neg_elbo", "recon", "kl"):
        assert abs(one[key] - two[key]) < 1e-4, key


def test_a_failed_append_leaves_no_partial_line(tmp_path):
    """A write cut short by the file-size limit (as a full disk would) is cut back off: the file
    keeps exactly its earlier lines, and the error says so in one line."""
    import sys

    path = tmp_path / "eval.jsonl"
    path.write_text('{"k": 9}\n')
    before = path.read_bytes()
    code = (
        "import sys; from pathlib import Path; from vae_dist.evaluate import append_record, EvaluateError\n"
        "try:\n"
        f"    append_record(Path({str(path)!r}), {{'nll': 1.5, 'note': 'x' * 400}})\n"
        "except EvaluateError as e:\n"
        "    print(e); sys.exit(2)\n"
    )

    proc = run([sys.executable, "-c", code], check=False, preexec_fn=file_size_limit(len(before) + 50))
    assert proc.returncode == 2, proc.stderr
    assert f"could not append to {path}" in proc.stdout and "its earlier lines are kept" in proc.stdout
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind, tests, big_k", [("linear", 200, 5000), ("hierarchical", 3, 1000)])
def test_large_k_runs_in_bounded_memory(tmp_path, kind, tests, big_k):
    """Peak resident memory of `vae-dist evaluate` at a large K (the default batch of 100 images) is
    within 512 MB of the same command at K=1. Holding every latent's pixels at once would take
    100 x 5000 x 784 x 4 bytes = 1.5 GB for the linear VAE; the hierarchical model (the default
    layout, 64 channels of 28x28 activations a latent) would hold 3 x 1000 x 200 KB = 600 MB."""
    import sys

    import numpy as np

    from vae_dist.data import prepare

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100 + tests, 1, 28, 28), dtype=np.uint8)
    dataset = prepare.from_arrays(tmp_path / "ds", images[:100], images[100:]).out
    run_dir = make_run(tmp_path / "runs", "tiny", kind, dataset=str(dataset))
    code = (
        "import resource, sys\n"
        "from vae_dist.evaluate import evaluate_command\n"
        "try:\n"
        "    evaluate_command(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peaks = {}
    for k in (1, big_k):
        out = run([sys.executable, "-c", code, str(run_dir), "--k", str(k)], timeout=900)
        assert f"{tests} test images" in out.stdout, out.stdout
        peaks[k] = int(out.stdout.split("peak")[-1]) / 1024  # MB (ru_maxrss is in KiB on Linux)
    assert peaks[big_k] - peaks[1] < 512, peaks


def test_the_channels_last_cnn_gives_the_same_estimate():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="conv", latent_dim=4, hidden_dims=[32], channels=[8, 16]), (1, 28, 28))
    model.eval()
    x, idx = torch.rand(3, 1, 28, 28), torch.arange(3)
    before = ev.estimate(model, x, idx, 300, 0, "bernoulli")
    after = ev.estimate(ev.for_estimation(model), x, idx, 300, 0, "bernoulli")
    assert any(p.is_contiguous(memory_format=torch.channels_last) and p.ndim == 4 for p in model.parameters())
    for a, b in ((before.nll, after.nll), (before.recon, after.recon), (before.kl, after.kl)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
