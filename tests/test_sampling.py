"""Few-step student and multi-step teacher samplers on a model with a known flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen_diffusers.sampling import sample_student, sample_teacher


class LinearFlow(nn.Module):
    """flow = a * x + cond: simple enough to integrate by hand."""

    def __init__(self, a: float = 0.5):
        super().__init__()
        self.a = a
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        self.calls.append(timestep.clone())
        out = self.a * hidden_states
        if encoder_hidden_states is not None:
            out = out + encoder_hidden_states[:, :, None, None]
        return out


def test_one_step_student_returns_the_x0_of_scaled_noise():
    model = LinearFlow()
    noise = torch.randn(2, 3, 4, 4)
    x0 = sample_student(model, noise, [0.999, 0.0])
    x = 0.999 * noise
    torch.testing.assert_close(x0, x - 0.999 * 0.5 * x)
    torch.testing.assert_close(model.calls[0], torch.full((2,), 0.999))


def test_ode_student_is_euler_on_the_rungs():
    model = LinearFlow()
    noise = torch.randn(2, 3, 4, 4)
    t_list = [0.999, 0.7, 0.2, 0.0]
    out = sample_student(model, noise, t_list)
    x = 0.999 * noise
    for t, t_next in zip(t_list[:-1], t_list[1:]):
        x0 = x - t * 0.5 * x
        x = x + (t_next - t) * 0.5 * x if t_next > 0 else x0
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert [c[0].item() for c in model.calls] == pytest.approx([0.999, 0.7, 0.2])


def test_sde_student_renoises_with_the_generators_noise():
    model = LinearFlow()
    noise = torch.randn(1, 2, 3, 3)
    t_list = [0.9, 0.4, 0.0]
    out = sample_student(
        model, noise, t_list, sample_type="sde", generator=torch.Generator().manual_seed(3)
    )
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))
    x = 0.9 * noise
    x0 = x - 0.9 * 0.5 * x
    x = 0.6 * x0 + 0.4 * fresh
    torch.testing.assert_close(out, x - 0.4 * 0.5 * x, rtol=1e-6, atol=1e-6)
    again = sample_student(
        model, noise, t_list, sample_type="sde", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out, again)


def test_teacher_euler_with_cfg():
    model = LinearFlow(a=0.0)  # flow = cond
    noise = torch.zeros(2, 1, 2, 2)
    cond, uncond = torch.ones(2, 1), torch.zeros(2, 1)
    out = sample_teacher(
        model,
        noise,
        [1.0, 0.5, 0.0],
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond,
        guidance_scale=3.0,
    )
    # guided flow = uncond + 3 (cond - uncond) = 3; x(0) = 0 + (0 - 1) * 3
    torch.testing.assert_close(out, torch.full_like(noise, -3.0))


def test_sampler_input_errors():
    model = LinearFlow()
    with pytest.raises(ValueError, match="t_list"):
        sample_student(model, torch.randn(1, 1, 2, 2), [0.5, 0.9, 0.0])
    with pytest.raises(ValueError, match="t_list"):
        sample_student(model, torch.randn(1, 1, 2, 2), [0.9, 0.5])
    with pytest.raises(ValueError, match="negative conditioning"):
        sample_teacher(model, torch.randn(1, 1, 2, 2), [1.0, 0.0], guidance_scale=2.0)
