"""Loss formulas against hand-computed values (fp32 and bf16) and their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen_diffusers.flow_matching import rf_alpha, rf_sigma
from fastgen_diffusers.losses import dsm_loss, gan_disc_loss, gan_gen_loss, r1_loss, vsd_loss

DTYPES = [torch.float32, torch.bfloat16]
# bf16 inputs are exact here (small dyadic values); the only rounding is of the output.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7}

X0 = [[1.0, -2.0]]
EPS = [[0.5, 3.0]]
T = [0.25]


def _t(v, dtype):
    return torch.tensor(v, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "pred_type, target",
    [
        ("x0", [1.0, -2.0]),
        ("eps", [0.5, 3.0]),
        ("flow", [0.5 - 1.0, 3.0 + 2.0]),
        ("v", [0.75 * 0.5 - 0.25 * 1.0, 0.75 * 3.0 + 0.25 * 2.0]),
    ],
)
def test_dsm_loss_hand_values(dtype, pred_type, target):
    pred = _t([[0.0, 1.0]], dtype)
    expected = ((0.0 - target[0]) ** 2 + (1.0 - target[1]) ** 2) / 2
    loss = dsm_loss(
        pred_type,
        pred,
        x0=_t(X0, dtype),
        eps=_t(EPS, dtype),
        t=torch.tensor(T),
        alpha_fn=rf_alpha,
        sigma_fn=rf_sigma,
    )
    assert loss.item() == pytest.approx(expected, rel=TOL[dtype])


def test_dsm_loss_errors():
    with pytest.raises(ValueError, match="needs x0"):
        dsm_loss("x0", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="alpha_fn"):
        dsm_loss(
            "v", torch.zeros(1, 2), x0=torch.zeros(1, 2), eps=torch.zeros(1, 2), t=torch.zeros(1)
        )
    with pytest.raises(ValueError, match="pred_type='score'"):
        dsm_loss("score", torch.zeros(1, 2), x0=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape"):
        dsm_loss("x0", torch.zeros(1, 3), x0=torch.zeros(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vsd_loss_hand_values_and_gradient(dtype):
    # Two samples. Sample 0: gen=[1, 3], teacher=[0, 1] -> mean|diff| = 1.5, w = 1/(1.5+1e-6).
    # Sample 1: gen=[2, 2], teacher=[2, 1] -> mean|diff| = 0.5, w = 1/(0.5+1e-6).
    gen = _t([[1.0, 3.0], [2.0, 2.0]], dtype).requires_grad_(True)
    teacher = _t([[0.0, 1.0], [2.0, 1.0]], dtype)
    fake = _t([[0.5, 2.0], [1.0, 1.0]], dtype)
    w = torch.tensor([[1 / (1.5 + 1e-6)], [1 / (0.5 + 1e-6)]], dtype=torch.float64)
    grad_dir = (fake.double() - teacher.double()) * w  # gen - target
    expected = 0.5 * (grad_dir**2).mean()
    loss = vsd_loss(gen, teacher, fake)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=TOL[dtype])
    loss.backward()
    # d/dgen 0.5 * mean((gen - target)^2) = (gen - target) / numel = w (fake - teacher) / 4
    torch.testing.assert_close(gen.grad.double(), grad_dir / 4, rtol=TOL[dtype], atol=TOL[dtype])


def test_vsd_loss_additional_scale_and_detached_inputs():
    gen = torch.tensor([[1.0, 3.0], [2.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [2.0, 1.0]], requires_grad=True)
    fake = torch.tensor([[0.5, 2.0], [1.0, 1.0]], requires_grad=True)
    base = vsd_loss(gen, teacher, fake)
    scaled = vsd_loss(gen, teacher, fake, additional_scale=torch.tensor([2.0, 2.0]))
    # w doubles -> squared distance to the target quadruples
    assert scaled.item() == pytest.approx(4 * base.item(), rel=1e-6)
    scaled.backward()
    assert teacher.grad is None and fake.grad is None and gen.grad is not None


def test_vsd_loss_weight_is_fp32_even_for_bf16():
    # With bf16 inputs the weight and target are still formed in fp32: the loss equals the
    # float64 formula on the (exact) bf16 input values to fp32 precision, which a bf16 weight
    # (8 significant bits) would miss by up to 2^-8 relative.
    gen = torch.tensor([[1.0, 0.5]], dtype=torch.bfloat16)
    teacher = torch.tensor([[0.99609375, 0.49951171875]], dtype=torch.bfloat16)
    fake = torch.tensor([[1.5, 0.25]], dtype=torch.bfloat16)
    g, te, f = (x.double() for x in (gen, teacher, fake))
    w = 1.0 / ((g - te).abs().mean() + 1e-6)
    expected = 0.5 * ((w * (f - te)) ** 2).mean()
    assert vsd_loss(gen, teacher, fake).item() == pytest.approx(expected.item(), rel=1e-6)


def test_vsd_shape_mismatch():
    with pytest.raises(ValueError, match="matching shapes"):
        vsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gan_losses_hand_values(dtype):
    fake = _t([[0.0, 1.0]], dtype)
    real = _t([[2.0, -1.0]], dtype)

    def softplus(x):
        return math.log1p(math.exp(x))

    assert gan_gen_loss(fake).item() == pytest.approx(
        (softplus(-0.0) + softplus(-1.0)) / 2, rel=1e-6
    )
    expected = (softplus(0.0) + softplus(1.0)) / 2 + (softplus(-2.0) + softplus(1.0)) / 2
    assert gan_disc_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert r1_loss(real, fake).item() == pytest.approx(((2 - 0) ** 2 + (-1 - 1) ** 2) / 2)


def test_gan_losses_need_2d_logits():
    with pytest.raises(ValueError, match="2-D"):
        gan_gen_loss(torch.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        gan_disc_loss(torch.zeros(4, 1), torch.zeros(4, 1, 1))
    with pytest.raises(ValueError, match="matching shapes"):
        r1_loss(torch.zeros(4, 1), torch.zeros(4, 2))
