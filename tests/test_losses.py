import math

import pytest
import torch

from vae_dist.kinds import LIKELIHOODS
from vae_dist.likelihoods import PixelLikelihood
from vae_dist.losses import (
    gaussian_kl,
    kl_to_standard_normal,
    kl_weight,
    log_likelihood_samples,
    neg_elbo_from_mean,
    negative_elbo,
    reconstruction_nll,
    reconstruction_nll_from_mean,
)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    assert torch.equal(kl_to_standard_normal(torch.zeros(4, 3), torch.zeros(4, 3)), torch.zeros(4))
    g = torch.Generator().manual_seed(0)
    kl = kl_to_standard_normal(torch.randn(1000, 5, generator=g), torch.randn(1000, 5, generator=g))
    assert (kl > 0).all()


def test_kl_matches_monte_carlo():
    mu, logvar = torch.tensor([[0.7, -0.3]]), torch.tensor([[-0.5, 0.4]])
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), expected)


def test_bce_closed_form_on_a_tiny_case():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 0.25]])
    p = torch.sigmoid(logits)
    by_hand = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, x, "bernoulli"), by_hand)
    # log 2 for a fair coin on a white pixel
    assert math.isclose(
        reconstruction_nll(torch.zeros(1, 1), torch.ones(1, 1), "bernoulli").item(), math.log(2), rel_tol=1e-6
    )


def test_gaussian_is_squared_error_plus_constant():
    logits, x = torch.zeros(1, 4), torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    expected = 0.25 + 0.25 + 4 * 0.5 * math.log(math.pi)
    assert math.isclose(reconstruction_nll(logits, x, "gaussian").item(), expected, rel_tol=1e-6)


def test_negative_elbo_sums_terms_with_beta():
    g = torch.Generator().manual_seed(1)
    logits, x = torch.randn(6, 1, 4, 4, generator=g), torch.rand(6, 1, 4, 4, generator=g)
    mu, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = negative_elbo(logits, x, kl_to_standard_normal(mu, logvar), beta=0.5)
    assert t.loss.shape == (6,)
    torch.testing.assert_close(t.loss, t.recon + 0.5 * t.kl)
    torch.testing.assert_close(t.neg_elbo(), t.recon + t.kl)


def test_kl_warmup_is_linear():
    assert [kl_weight(2.0, 4, s) for s in (0, 1, 4, 10)] == [0.0, 0.5, 2.0, 2.0]
    assert kl_weight(2.0, 0, 0) == 2.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_likelihood_gives_one_figure_by_every_route(likelihood, channels):
    """Training's terms (from the decoder's output), the importance-weighted estimate's (many
    latents at once) and, for the likelihoods the export takes, the export's (from the decoder's
    mean, float64) are one likelihood, for every name in the table."""
    g = torch.Generator().manual_seed(0)
    pixel = PixelLikelihood(likelihood, channels, mixtures=3)
    out = torch.randn(3, 2, pixel.out_channels, 4, 4, generator=g)
    x = (torch.rand(3, channels, 4, 4, generator=g) * 255).round() / 255  # 8-bit images
    per_latent = log_likelihood_samples(out, x, pixel)
    for s in range(2):
        direct = reconstruction_nll(out[:, s], x, pixel)
        torch.testing.assert_close(-per_latent[:, s], direct, rtol=1e-5, atol=1e-4)
        if LIKELIHOODS[likelihood].exported:
            from_mean = reconstruction_nll_from_mean(pixel.mean(out[:, s]), x, likelihood)
            torch.testing.assert_close(from_mean.float(), direct, rtol=1e-4, atol=1e-3)
    shown = pixel.mean(out[:, 0])
    assert shown.shape == x.shape and 0 <= shown.min() <= shown.max() <= 1
    mu, logvar = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    terms = negative_elbo(out[:, 0], x, kl_to_standard_normal(mu, logvar), 1.0, pixel)
    kl = kl_to_standard_normal(mu, logvar)
    torch.testing.assert_close(terms.neg_elbo(), reconstruction_nll(out[:, 0], x, pixel) + kl)
    if LIKELIHOODS[likelihood].exported:
        from_mean = neg_elbo_from_mean(pixel.mean(out[:, 0]), x, mu, logvar, likelihood).float()
        torch.testing.assert_close(from_mean, terms.neg_elbo(), rtol=1e-4, atol=1e-3)


def test_gaussian_kl_is_the_closed_form_and_zero_between_equals():
    g = torch.Generator().manual_seed(2)
    qm, ql, pm, pl = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    q, p = torch.distributions.Normal(qm, ql.exp()), torch.distributions.Normal(pm, pl.exp())
    torch.testing.assert_close(gaussian_kl(qm, ql, pm, pl), torch.distributions.kl_divergence(q, p))
    assert torch.equal(gaussian_kl(qm, ql, qm, ql), torch.zeros(5, 4, dtype=torch.float64))
    # against N(0, I) it is the VAE's KL, per element
    torch.testing.assert_close(gaussian_kl(qm, ql, 0 * pm, 0 * pl).sum(1), kl_to_standard_normal(qm, 2 * ql))


def test_dlm_needs_grey_or_rgb_images():
    with pytest.raises(ValueError, match="grey .1. or RGB .3."):
        PixelLikelihood("dlm", 2)
    with pytest.raises(ValueError, match="unknown likelihood"):
        PixelLikelihood("poisson", 1)
