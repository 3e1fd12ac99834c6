import pytest
import torch

from vae_dist.config import ModelConfig
from vae_dist.kinds import MODEL_KINDS
from vae_dist.models import BUILDERS, VAE, FlatVAE, build_model

SHAPES = [(1, 28, 28), (3, 32, 32)]


def config(kind, shape, latent=7):
    h = shape[1]
    return ModelConfig(
        kind=kind,
        latent_dim=latent,
        hidden_dims=[32],
        channels=[8, 16],
        encoder_blocks=f"{h}x1,{h // 2}x1,{h // 4}x2,1x1",
        decoder_blocks=f"1x1,{h // 4}x2,{h // 2}x1,{h}x1",
        width=8,
        latent_channels=2,
    )


def make(kind, shape, out_channels=None, latent=7):
    torch.manual_seed(0)
    return build_model(config(kind, shape, latent), shape, out_channels)


def shaken(model):
    """Every weight moved off its initial value (the prior's last layers start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_interface_and_shapes(kind, shape):
    model = make(kind, shape, out_channels=5).eval()
    assert isinstance(model, VAE) and model.image_shape == shape and model.out_channels == 5
    x, latent = torch.rand(4, *shape), model.latent_dim
    out, kl = model(x, torch.randn(4, latent))
    assert out.shape == (4, 5, *shape[1:]) and kl.shape == (4,) and kl.dtype == torch.float32
    assert bool((kl >= 0).all())
    with torch.no_grad():
        # the posterior's mean path is the posterior at zero noise
        torch.testing.assert_close(model.reconstruct(x), model(x, torch.zeros(4, latent))[0])
        assert model.sample(torch.randn(3, latent), 0.5).shape == (3, 5, *shape[1:])
        eps = torch.randn(4, 3, latent)
        many, log_ratio, first_kl = model.importance(x, eps)
        assert many.shape == (4, 3, 5, *shape[1:]) and log_ratio.shape == (4, 3) and log_ratio.dtype == torch.float64
        # each latent's decoding is the forward pass at that noise
        one, kl_one = model(x, eps[:, 1])
        torch.testing.assert_close(many[:, 1], one, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first_kl.float(), model(x, eps[:, 0])[1], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_importance_ratio_averages_to_the_closed_form_kl(kind):
    """-(log p(z) - log q(z|x)) at z ~ q is an unbiased estimate of KL(q || p), the closed form the
    forward pass gives (for the hierarchical model, along each sample's path through the groups)."""
    model = shaken(make(kind, (1, 28, 28))).eval()
    x = torch.rand(1, 1, 28, 28)
    samples = 4000
    eps = torch.randn(1, samples, model.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, log_ratio, _ = model.importance(x, eps)
        kls = torch.cat([model(x.expand(500, -1, -1, -1), eps[0, i : i + 500])[1] for i in range(0, samples, 500)])
    gap = -log_ratio[0] - kls.double()  # zero mean, sample by sample
    assert abs(gap.mean().item()) < 4 * gap.std().item() / samples**0.5 + 1e-3


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gradients_reach_every_parameter(kind):
    model = shaken(make(kind, (1, 28, 28)))
    out, kl = model(torch.rand(3, 1, 28, 28), torch.randn(3, model.latent_dim))
    (out.sum() + kl.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_temperature_scales_the_prior_noise(kind):
    model = shaken(make(kind, (1, 28, 28))).eval()
    eps = torch.randn(3, model.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.sample(eps, 0.5), model.sample(0.5 * eps, 1.0))
        cold = [model.sample(torch.randn(3, model.latent_dim), 1e-6) for _ in range(2)]
        torch.testing.assert_close(cold[0], cold[1], rtol=0, atol=1e-4)  # near zero, one image: the modes
        assert not torch.allclose(model.sample(eps, 1.0)[0], model.sample(eps, 1.0)[1], atol=1e-3)


def test_reparameterize_is_mu_plus_sigma_eps():
    mu, logvar, eps = torch.tensor([[1.0, -2.0]]), torch.log(torch.tensor([[4.0, 0.25]])), torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(FlatVAE.reparameterize(mu, logvar, eps), torch.tensor([[2.0, -1.0]]))


def test_default_linear_is_784_400_20():
    model = build_model(ModelConfig(), (1, 28, 28))
    shapes = [tuple(p.shape) for p in model.parameters() if p.ndim == 2]
    assert shapes == [(400, 784), (40, 400), (400, 20), (784, 400)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 27, 31)])
def test_conv_mirrors_odd_sizes(shape):
    model = build_model(ModelConfig(kind="conv", channels=[4, 8, 8], hidden_dims=[]), shape)
    assert model.decode(torch.zeros(2, 20)).shape == (2, *shape)


@pytest.mark.parametrize("upsample", ["transposed", "transposed4", "nearest"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (1, 27, 31)])
def test_every_upsampling_mirrors_the_sizes(shape, upsample):
    cfg = ModelConfig(kind="conv", channels=[4, 8, 8], hidden_dims=[], upsample=upsample)
    assert build_model(cfg, shape).decode(torch.zeros(2, 20)).shape == (2, *shape)


@pytest.mark.parametrize("upsample, even", [("transposed", False), ("transposed4", True), ("nearest", True)])
def test_which_upsampling_leaves_a_checkerboard(upsample, even):
    """A constant feature map through up-stages whose weights are all 1: inside the border, every
    output pixel is the same sum when each sees as many weights (4x4 kernels at stride 2, resize
    then convolve); 3x3 transposed kernels at stride 2 cover pixels 1, 2 or 4 times."""
    cfg = ModelConfig(kind="conv", channels=[2, 2], hidden_dims=[], upsample=upsample)
    model = build_model(cfg, (1, 32, 32))
    for m in model.decoder.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    with torch.no_grad():
        out = model.decoder(torch.ones(1, *model.feature_shape))[0, 0, 4:-4, 4:-4]
    assert bool(out.max() == out.min()) is even


def test_every_kind_of_the_table_is_built_and_nothing_else():
    """A model kind is declared once, in vae_dist.kinds; its builder is its implementation."""
    assert list(BUILDERS) == list(MODEL_KINDS)
