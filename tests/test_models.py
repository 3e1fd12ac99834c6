import pytest
import torch

from vae_dist.config import ModelConfig
from vae_dist.kinds import MODEL_KINDS
from vae_dist.models import BUILDERS, VAE, build_model

SHAPES = [(1, 28, 28), (3, 32, 32)]


def make(kind, shape, latent=7):
    cfg = ModelConfig(kind=kind, latent_dim=latent, hidden_dims=[32], channels=[8, 16])
    torch.manual_seed(0)
    return build_model(cfg, shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_interface_and_shapes(kind, shape):
    model = make(kind, shape)
    assert isinstance(model, VAE) and model.latent_dim == 7 and model.image_shape == shape
    x = torch.rand(5, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 7)
    assert model.decode(mu).shape == (5, *shape)
    logits, mu2, logvar2 = model(x, torch.zeros(5, 7))
    assert logits.shape == (5, *shape)
    # With zero noise, z is the posterior mean.
    torch.testing.assert_close(logits, model.decode(mu))
    torch.testing.assert_close(mu2, mu)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gradients_reach_every_parameter(kind):
    model = make(kind, (1, 28, 28))
    logits, mu, logvar = model(torch.rand(3, 1, 28, 28))
    (logits.sum() + mu.sum() + logvar.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_reparameterize_is_mu_plus_sigma_eps():
    mu, logvar, eps = torch.tensor([[1.0, -2.0]]), torch.log(torch.tensor([[4.0, 0.25]])), torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(VAE.reparameterize(mu, logvar, eps), torch.tensor([[2.0, -1.0]]))


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
