import math

import pytest
import torch

from vae_dist.kinds import LIKELIHOODS
from vae_dist.losses import (
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
    t = negative_elbo(logits, x, mu, logvar, beta=0.5)
    assert t.loss.shape == (6,)
    torch.testing.assert_close(t.loss, t.recon + 0.5 * t.kl)
    torch.testing.assert_close(t.neg_elbo(), t.recon + t.kl)


def test_kl_warmup_is_linear():
    assert [kl_weight(2.0, 4, s) for s in (0, 1, 4, 10)] == [0.0, 0.5, 2.0, 2.0]
    assert kl_weight(2.0, 0, 0) == 2.0


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_every_likelihood_gives_one_figure_by_every_route(likelihood):
    """Training's terms (from logits), the importance-weighted estimate's (many latents at once) and
    the export's (from the decoder's mean, float64) are one likelihood, for every name in the table."""
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(3, 2, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    per_latent = log_likelihood_samples(logits, x, likelihood)
    for s in range(2):
        direct = reconstruction_nll(logits[:, s], x, likelihood)
        torch.testing.assert_close(-per_latent[:, s], direct, rtol=1e-5, atol=1e-4)
        from_mean = reconstruction_nll_from_mean(torch.sigmoid(logits[:, s]), x, likelihood)
        torch.testing.assert_close(from_mean.float(), direct, rtol=1e-4, atol=1e-3)
    mu, logvar = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    terms = negative_elbo(logits[:, 0], x, mu, logvar, 1.0, likelihood)
    torch.testing.assert_close(neg_elbo_from_mean(torch.sigmoid(logits[:, 0]), x, mu, logvar, likelihood).float(),
                               terms.neg_elbo(), rtol=1e-4, atol=1e-3)
