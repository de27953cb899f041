"""Rectified-flow formulas against hand-computed values, in fp32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen_diffusers import SampleTimestepConfig
from fastgen_diffusers.flow_matching import (
    add_noise,
    convert_prediction,
    pred_noise_to_pred_x0,
    pred_x0_from_flow,
    pred_x0_from_v,
    renoise,
    rf_alpha,
    rf_sigma,
    sample_from_t_list,
    sample_timesteps,
    x0_to_eps,
    x0_to_flow,
    x0_to_v,
)
from fastgen_diffusers.utils import classifier_free_guidance, expand_like

# bf16 keeps 8 significant bits: a relative tolerance of 2^-7 covers one rounding of the output
# (the arithmetic itself runs in float64).
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}
DTYPES = [torch.float32, torch.bfloat16]

# One sample, two elements, t = 0.25: x0 = [1, -2], eps = [0.5, 3].
X0 = [1.0, -2.0]
EPS = [0.5, 3.0]
T = 0.25
X_T = [0.75 * 1.0 + 0.25 * 0.5, 0.75 * -2.0 + 0.25 * 3.0]  # [0.875, -0.75]
FLOW = [0.5 - 1.0, 3.0 + 2.0]  # eps - x0 = [-0.5, 5.0]


def _t(values, dtype):
    return torch.tensor([values], dtype=dtype)


def test_coefficients():
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.equal(rf_alpha(t), torch.tensor([1.0, 0.7, 0.0]))
    assert torch.equal(rf_sigma(t), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_hand_values(dtype):
    out = add_noise(_t(X0, dtype), _t(EPS, dtype), torch.tensor([T]))
    assert out.dtype == dtype
    torch.testing.assert_close(out, _t(X_T, dtype), **TOL[dtype])


def test_add_noise_is_computed_in_float64():
    # In bf16 arithmetic (1 - t) * x0 + t * eps for these values rounds differently; the
    # float64 path rounds only once, at the end.
    x0 = torch.tensor([[1.0 + 2**-7]], dtype=torch.bfloat16)
    eps = torch.tensor([[1.0 + 2**-6]], dtype=torch.bfloat16)
    t = torch.tensor([1 / 3])
    exact = (1 - 1 / 3) * (1 + 2**-7) + (1 / 3) * (1 + 2**-6)
    assert add_noise(x0, eps, t).item() == torch.tensor(exact, dtype=torch.bfloat16).item()


def test_add_noise_per_sample_t_broadcasts_over_video():
    x0 = torch.ones(2, 3, 4, 5, 6)
    eps = torch.zeros_like(x0)
    out = add_noise(x0, eps, torch.tensor([0.1, 0.9]))
    assert torch.allclose(out[0], torch.full_like(out[0], 0.9))
    assert torch.allclose(out[1], torch.full_like(out[1], 0.1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inversions_hand_values(dtype):
    x_t, t = _t(X_T, dtype), torch.tensor([T])
    torch.testing.assert_close(
        pred_x0_from_flow(_t(FLOW, dtype), x_t, t), _t(X0, dtype), **TOL[dtype]
    )
    torch.testing.assert_close(
        pred_noise_to_pred_x0(_t(EPS, dtype), x_t, t), _t(X0, dtype), **TOL[dtype]
    )
    torch.testing.assert_close(x0_to_eps(_t(X0, dtype), x_t, t), _t(EPS, dtype), **TOL[dtype])
    torch.testing.assert_close(x0_to_flow(_t(X0, dtype), x_t, t), _t(FLOW, dtype), **TOL[dtype])
    # v = alpha eps - sigma x0 = 0.75 * eps - 0.25 * x0
    v = [0.75 * 0.5 - 0.25 * 1.0, 0.75 * 3.0 + 0.25 * 2.0]
    torch.testing.assert_close(x0_to_v(_t(X0, dtype), x_t, t), _t(v, dtype), **TOL[dtype])
    torch.testing.assert_close(pred_x0_from_v(_t(v, dtype), x_t, t), _t(X0, dtype), **TOL[dtype])


def test_conversion_clamps_denominators():
    x = torch.tensor([[2.0]])
    # eps -> x0 at t = 1 divides by 1 - t = 0: clamped to 1e-6, finite.
    out = pred_noise_to_pred_x0(torch.tensor([[1.0]]), x, torch.tensor([1.0]))
    assert torch.isfinite(out).all() and out.item() == pytest.approx((2.0 - 1.0) / 1e-6)
    # x0 -> eps and x0 -> flow at t = 0 divide by t = 0: clamped.
    assert x0_to_eps(torch.tensor([[1.0]]), x, torch.tensor([0.0])).item() == pytest.approx(1e6)
    assert x0_to_flow(torch.tensor([[1.0]]), x, torch.tensor([0.0])).item() == pytest.approx(1e6)


@pytest.mark.parametrize("src", ["x0", "eps", "v", "flow"])
@pytest.mark.parametrize("dst", ["x0", "eps", "v", "flow"])
def test_convert_prediction_round_trips(src, dst):
    torch.manual_seed(0)
    x0, eps = (
        torch.randn(3, 4, 5, 5, dtype=torch.float64),
        torch.randn(3, 4, 5, 5, dtype=torch.float64),
    )
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t = add_noise(x0, eps, t)
    truth = {
        "x0": x0,
        "eps": eps,
        "flow": eps - x0,
        "v": expand_like(1 - t, x0) * eps - expand_like(t, x0) * x0,
    }
    out = convert_prediction(truth[src], x_t, t, from_type=src, to_type=dst)
    torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9)


def test_renoise_ode_is_an_euler_step_and_sde_uses_given_noise():
    torch.manual_seed(0)
    x_t, x0 = torch.randn(2, 3), torch.randn(2, 3)
    t, t_next = torch.tensor([0.8, 0.8]), torch.tensor([0.3, 0.3])
    flow = x0_to_flow(x0, x_t, t)
    euler = x_t + (0.3 - 0.8) * flow
    torch.testing.assert_close(renoise(x0, x_t, t, t_next, sample_type="ode"), euler)
    noise = torch.randn(2, 3)
    torch.testing.assert_close(
        renoise(x0, x_t, t, t_next, sample_type="sde", noise=noise), 0.7 * x0 + 0.3 * noise
    )
    with pytest.raises(ValueError, match="sample_type"):
        renoise(x0, x_t, t, t_next, sample_type="heun")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="per-sample"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_expand_like_and_cfg():
    assert expand_like(torch.arange(2.0), torch.zeros(2, 3, 4)).shape == (2, 1, 1)
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert classifier_free_guidance(cond, uncond, 1.0).item() == 2.0
    # cond + (s - 1)(cond - uncond) = 2 + 4 * 1
    assert classifier_free_guidance(cond, uncond, 5.0).item() == 6.0
    # identical to uncond + s (cond - uncond)
    assert classifier_free_guidance(cond, uncond, 5.0).item() == 1.0 + 5.0 * 1.0


# -- timestep sampling ---------------------------------------------------------------------

N = 200_000


def _sample(**kwargs):
    torch.manual_seed(0)
    return sample_timesteps(N, SampleTimestepConfig(**kwargs), dtype=torch.float64)


def test_uniform():
    t = _sample(time_dist_type="uniform", min_t=0.2, max_t=0.6)
    assert t.min() >= 0.2 and t.max() <= 0.6
    # mean 0.4, std of the mean 0.115 / sqrt(N) ~ 2.6e-4: 5e-3 is ~20 sigma
    assert t.mean().item() == pytest.approx(0.4, abs=5e-3)


def test_logitnormal_matches_its_definition():
    t = _sample(time_dist_type="logitnormal", p_mean=0.5, p_std=0.8, min_t=0.0, max_t=1.0)
    torch.manual_seed(0)
    expected = torch.sigmoid(torch.randn(N, dtype=torch.float64) * 0.8 + 0.5)
    torch.testing.assert_close(t, expected)
    # median of sigmoid(N(0.5, .)) is sigmoid(0.5)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=5e-3)


def test_lognormal_is_truncated_by_cdf_inversion():
    t = _sample(time_dist_type="lognormal", p_mean=-1.0, p_std=1.0, min_t=0.1, max_t=0.9)
    assert t.min() >= 0.1 and t.max() <= 0.9
    # every draw lands inside (no clamping pile-up at the bounds)
    assert (t == 0.1).sum() == 0 and (t == 0.9).sum() == 0
    # P(t < 0.3 | 0.1 < t < 0.9) from the normal CDF of log t
    cdf = torch.distributions.Normal(-1.0, 1.0).cdf
    lo, mid, hi = (cdf(torch.tensor(math.log(v))) for v in (0.1, 0.3, 0.9))
    assert (t < 0.3).double().mean().item() == pytest.approx(
        ((mid - lo) / (hi - lo)).item(), abs=5e-3
    )


def test_shifted_matches_the_shift_formula():
    t = _sample(time_dist_type="shifted", shift=3.0, min_t=0.0, max_t=1.0)
    torch.manual_seed(0)
    u = torch.rand(N, dtype=torch.float64)
    torch.testing.assert_close(t, u * 3.0 / (u * 2.0 + 1.0))
    # shift pushes mass to high t: P(t > 0.5) = P(u > 1/4) = 0.75
    assert (t > 0.5).double().mean().item() == pytest.approx(0.75, abs=5e-3)


def test_polynomial_draws_from_a_1000_point_grid():
    t = _sample(time_dist_type="polynomial", min_t=0.1, max_t=0.5)
    grid = torch.linspace(0.1, 0.5, 1000, dtype=torch.float64)
    assert torch.isin(t, grid).all()
    assert len(torch.unique(t)) == 1000


def test_sampling_dtype_device_and_bounds():
    cfg = SampleTimestepConfig()
    t = sample_timesteps(16, cfg, device="cpu", dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (16,)
    assert t.min() >= torch.tensor(cfg.min_t, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="n >= 1"):
        sample_timesteps(0, cfg)


def test_sample_from_t_list_uses_only_the_rungs():
    torch.manual_seed(0)
    t = sample_from_t_list(10_000, [0.999, 0.833, 0.5, 0.0], dtype=torch.float64)
    values, counts = torch.unique(t, return_counts=True)
    assert values.tolist() == [0.5, 0.833, 0.999]
    assert (counts.double() / 10_000 - 1 / 3).abs().max() < 0.03
    with pytest.raises(ValueError, match="0.0"):
        sample_from_t_list(2, [0.9, 0.5])
