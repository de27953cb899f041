"""DMD2 runs the floor of network calls per step: forwards and backwards counted by hooks.

Floor (one-step student, CFG on): student step = student fwd+bwd, teacher 2 forwards (cond and
uncond; one doubled forward with batched CFG and no GAN) of which only the conditional one is
backpropagated (GAN features), fake score 1 forward, discriminator 1 fwd+bwd with GAN.
Fake-score step = student 1 forward, fake score fwd+bwd. Discriminator step (after the
fake-score step of the same iteration) = no student forward (its sample is reused), teacher 3
forwards (fake, real, R1-perturbed real), discriminator 3 fwd+bwd.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import fastgen_diffusers as fgd
from fastgen_diffusers.features import attach_feature_capture

pytestmark = pytest.mark.usefixtures("single_thread")


class Calls:
    """Counts forwards of each module, and backward passes that reach its input layer (the
    backward of a network whose output is detached, as the teacher's under the GAN, still
    runs from its captured blocks down to its input)."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.count: Counter[str] = Counter()
        for name, module in modules.items():
            module.register_forward_hook(self._count(f"{name}.fwd"))
            first = getattr(module, "proj_in", module)  # TinyDiT's input layer
            first.register_forward_hook(self._count_backward(f"{name}.bwd"))

    def _count(self, key: str):
        return lambda module, args, output: self.count.update([key])

    def _count_backward(self, key: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda grad: self.count.update([key]))

        return hook

    def take(self) -> dict[str, int]:
        result = {k: v for k, v in self.count.items() if v}
        self.count.clear()
        return result


def _setup(tiny_dit, *, gan: bool, batch_cfg: bool):
    teacher, student = tiny_dit(0), tiny_dit(1)
    fake = fgd.create_fake_score(teacher)
    disc = None
    if gan:
        attach_feature_capture(teacher, [0, 2])
        torch.manual_seed(3)
        disc = fgd.ImageDiTDiscriminator(8, 2)
    cfg = fgd.DMDConfig(
        guidance_scale=3.0,
        gan_loss_weight_gen=0.1 if gan else 0.0,
        gan_r1_reg_weight=0.1 if gan else 0.0,
    )
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc, batch_cfg=batch_cfg)
    modules = dict(student=student, teacher=teacher, fake=fake)
    if disc is not None:
        modules["disc"] = disc
    return pipe, Calls(**modules)


def _inputs():
    g = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return latents, noise, torch.randn(2, 8, generator=g), torch.zeros(2, 8)


@pytest.mark.parametrize(
    "gan, batch_cfg, teacher_fwd",
    [(False, False, 2), (False, True, 1), (True, False, 2), (True, True, 2)],
)
def test_student_step_runs_the_floor(tiny_dit, gan, batch_cfg, teacher_fwd):
    pipe, calls = _setup(tiny_dit, gan=gan, batch_cfg=batch_cfg)
    latents, noise, cond, neg = _inputs()
    pipe.compute_student_loss(latents, noise, cond, negative_encoder_hidden_states=neg)[
        "total"
    ].backward()
    expected = {"student.fwd": 1, "student.bwd": 1, "teacher.fwd": teacher_fwd, "fake.fwd": 1}
    if gan:  # the conditional teacher pass only carries the GAN gradient
        expected |= {"teacher.bwd": 1, "disc.fwd": 1, "disc.bwd": 1}
    assert calls.take() == expected


def test_fake_score_and_discriminator_steps_run_the_floor(tiny_dit):
    pipe, calls = _setup(tiny_dit, gan=True, batch_cfg=False)
    latents, noise, cond, _ = _inputs()
    pipe.compute_fake_score_loss(latents, noise, cond)["total"].backward()
    assert calls.take() == {"student.fwd": 1, "fake.fwd": 1, "fake.bwd": 1}
    torch.manual_seed(11)
    reused = pipe.compute_discriminator_loss(latents, noise, cond)
    reused["total"].backward()
    assert calls.take() == {"teacher.fwd": 3, "disc.fwd": 3, "disc.bwd": 3}

    # The reused sample gives the losses a fresh one gives (same draws).
    fresh_pipe, _ = _setup(tiny_dit, gan=True, batch_cfg=False)
    torch.manual_seed(11)
    fresh = fresh_pipe.compute_discriminator_loss(latents, noise, cond)
    for key in ("gan_disc", "r1"):
        torch.testing.assert_close(reused[key], fresh[key], rtol=0, atol=0)

    # A student weight changed in place (an optimizer step) or other noise: sampled again.
    with torch.no_grad():
        next(pipe.student.parameters()).add_(0.1)
    pipe.compute_discriminator_loss(latents, noise, cond)
    assert calls.take()["student.fwd"] == 1
    pipe.compute_discriminator_loss(latents, noise.clone(), cond)
    assert calls.take()["student.fwd"] == 1
