"""The discretised mixture of logistics (vae_dist.dlm): a probability mass over the 256 values of
each sub-pixel, its edge bins, finite gradients at extreme parameters, and a plain float64
reference written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vae_dist import dlm

VALUES = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit value, as the toolkit's images


def random_params(channels: int, mixtures: int, pixels: int = 1, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = dlm.parameter_count(channels, mixtures)
    return torch.randn(1, count, 1, pixels, generator=gen, dtype=torch.float64) * scale


def test_the_masses_of_a_grey_sub_pixel_sum_to_one():
    for seed, scale in itertools.product(range(5), (0.1, 2.0, 6.0)):
        params = random_params(1, 4, scale=scale, seed=seed).expand(256, -1, -1, -1)
        mass = dlm.log_prob(params, VALUES.reshape(256, 1, 1, 1), 4).exp()
        assert mass.sum().item() == pytest.approx(1.0, abs=1e-12) and (mass >= 0).all()


def test_the_masses_of_an_rgb_pixel_sum_to_one_over_all_colours():
    # All 256^3 colours of one pixel, the channels coupled: sum of the joint masses is one.
    params = random_params(3, 2, seed=3)
    g, b = torch.meshgrid(VALUES, VALUES, indexing="ij")
    total = 0.0
    for r in range(256):
        x = torch.stack([torch.full_like(g, r / 255), g, b]).reshape(3, -1).T.reshape(-1, 3, 1, 1)
        total += dlm.log_prob(params.expand(x.shape[0], -1, -1, -1), x, 2).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-9)


def logistic_cdf(t: float, mean: float, scale: float) -> float:
    return 1 / (1 + math.exp(-(t - mean) / scale))


def reference_log_prob(params: torch.Tensor, x: torch.Tensor, mixtures: int) -> float:
    """log p(x) of one image, written out pixel by pixel and component by component in float64."""
    _, _, h, w = params.shape
    channels, m = x.shape[1], mixtures
    p = params[0].double()
    total = 0.0
    for i, j in itertools.product(range(h), range(w)):
        logits = p[:m, i, j]
        weights = torch.softmax(logits, 0)
        k = (x[0, :, i, j] * 255).round()
        values = 2 * k / 255 - 1
        pixel = 0.0
        for comp in range(m):
            mass = 1.0
            for c in range(channels):
                mean = p[m + c * m + comp, i, j]
                log_scale = max(p[m + channels * m + c * m + comp, i, j].item(), dlm.MIN_LOG_SCALE)
                if channels == 3 and c > 0:
                    a = torch.tanh(p[m + 2 * channels * m + (0 if c == 1 else 1) * m + comp, i, j])
                    mean = mean + a * values[0]
                    if c == 2:
                        mean = mean + torch.tanh(p[m + 2 * channels * m + 2 * m + comp, i, j]) * values[1]
                centre, s = mean.item(), math.exp(log_scale)
                upper = 1.0 if k[c] == 255 else logistic_cdf(values[c].item() + 1 / 255, centre, s)
                lower = 0.0 if k[c] == 0 else logistic_cdf(values[c].item() - 1 / 255, centre, s)
                mass *= upper - lower
            pixel += weights[comp].item() * mass
        total += math.log(pixel)
    return total


@pytest.mark.parametrize("channels", [1, 3])
def test_it_agrees_with_a_plain_float64_reference(channels):
    gen = torch.Generator().manual_seed(channels)
    for scale in (0.5, 1.5):
        params = torch.randn(2, dlm.parameter_count(channels, 3), 3, 4, generator=gen, dtype=torch.float64) * scale
        x = torch.randint(0, 256, (2, channels, 3, 4), generator=gen).double() / 255
        x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 1.0  # both edge bins
        ours = dlm.log_prob(params, x, 3)
        for n in range(2):
            assert ours[n].item() == pytest.approx(reference_log_prob(params[n : n + 1], x[n : n + 1], 3), rel=1e-9)
        in_float32 = dlm.log_prob(params.float(), x.float(), 3)
        assert torch.allclose(in_float32.double(), ours, rtol=1e-5)


def test_the_edge_bins_reach_to_infinity():
    # One component, mean 0, scale e^-1: the bin of 0 holds the mass below -1 + 1/255, the bin of
    # 255 the mass above 1 - 1/255.
    params = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64).reshape(1, 3, 1, 1)
    sigmoid = lambda t: 1 / (1 + math.exp(-t * math.e))  # noqa: E731
    zero = dlm.log_prob(params, torch.zeros(1, 1, 1, 1, dtype=torch.float64), 1).exp().item()
    top = dlm.log_prob(params, torch.ones(1, 1, 1, 1, dtype=torch.float64), 1).exp().item()
    assert zero == pytest.approx(sigmoid(-1 + 1 / 255), rel=1e-12)
    assert top == pytest.approx(1 - sigmoid(1 - 1 / 255), rel=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_stay_finite_at_extreme_parameters(channels):
    count = dlm.parameter_count(channels, 2)
    for value in (-1e4, -60.0, 0.0, 60.0, 1e4):
        params = torch.full((3, count, 2, 2), value, requires_grad=True)
        x = torch.tensor([0.0, 128 / 255, 1.0]).reshape(3, 1, 1, 1).expand(3, channels, 2, 2).contiguous()
        nll = -dlm.log_prob(params, x, 2).sum()
        nll.backward()
        assert torch.isfinite(nll) and torch.isfinite(params.grad).all(), value


def test_the_mean_image_and_the_parameter_layout():
    assert dlm.parameter_count(1, 10) == 30 and dlm.parameter_count(3, 10) == 100
    with pytest.raises(ValueError, match="grey .1. or RGB .3."):
        dlm.parameter_count(2, 10)
    # One component each pixel with a small scale at mean 0.5 (value 0.75 in [0, 1]): the mean image
    params = torch.zeros(1, dlm.parameter_count(3, 1), 2, 2)
    params[:, 1:4] = 0.5  # the three channels' means
    params[:, 4:7] = -5.0  # their log-scales
    mean = dlm.mean_image(params, 3, 1)  # no coupling: tanh(0) = 0
    assert mean.shape == (1, 3, 2, 2) and torch.allclose(mean, torch.full_like(mean, 0.75))


def test_the_compiled_mixture_gives_the_same_masses_and_gradients():
    """loss.compile: the fused kernels compute the same -log p and gradients as the plain ops, at
    two batch sizes (the batch is dynamic: no second compile is needed for the last batch)."""
    from vae_dist import likelihoods

    likelihoods._FUSED.clear()
    for batch in (4, 3):
        gen = torch.Generator().manual_seed(batch)
        x = torch.randint(0, 256, (batch, 3, 6, 5), generator=gen).float() / 255
        params = (torch.randn(batch, dlm.parameter_count(3, 5), 6, 5, generator=gen) * 2).requires_grad_()
        fused = likelihoods.fused_dlm_log_prob(params, x, 5)
        plain = dlm.log_prob(params, x, 5)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-3)
        fused_grad, plain_grad = (torch.autograd.grad(v.sum(), params)[0] for v in (fused, plain))
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert likelihoods._FUSED["dlm"] is not dlm.log_prob  # compiled, not fallen back


def test_where_the_mixture_cannot_be_compiled_it_runs_plain_with_a_warning(monkeypatch, caplog):
    from vae_dist import likelihoods

    def broken(params, x, mixtures):
        raise RuntimeError("InductorError: no C++ compiler\nmore")

    likelihoods._FUSED.clear()
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: broken)
    x = torch.randint(0, 256, (2, 1, 3, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    params = random_params(1, 3, pixels=9).float().reshape(1, -1, 3, 3).expand(2, -1, -1, -1)
    with caplog.at_level("WARNING"):
        value = likelihoods.fused_dlm_log_prob(params, x, 3)
    torch.testing.assert_close(value, dlm.log_prob(params, x, 3))
    assert "no C++ compiler" in caplog.text and "more" not in caplog.text
    assert likelihoods._FUSED["dlm"] is dlm.log_prob
    likelihoods._FUSED.clear()
