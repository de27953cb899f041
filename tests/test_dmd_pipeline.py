"""DMDPipeline: loss values, gradient routing, CFG, multi-step inputs, EMA and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastgen_diffusers as fgd
from fastgen_diffusers.features import attach_feature_capture
from fastgen_diffusers.flow_matching import add_noise, convert_prediction, sample_timesteps
from fastgen_diffusers.losses import dsm_loss, vsd_loss
from fastgen_diffusers.utils import classifier_free_guidance


def _nets(tiny_dit, gan: bool = False):
    teacher = tiny_dit(0)
    student = tiny_dit(1)
    fake = fgd.create_fake_score(teacher)
    for p in fake.parameters():  # make the fake score differ from the teacher
        p.data.add_(0.05 * torch.randn_like(p))
    disc = None
    if gan:
        attach_feature_capture(teacher, [0, 2])
        torch.manual_seed(3)
        disc = fgd.ImageDiTDiscriminator(8, 2)
    return student, teacher, fake, disc


def _inputs(batch: int = 2, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    cond = torch.randn(batch, 8, generator=g)
    neg = torch.zeros(batch, 8)
    return latents, noise, cond, neg


def _grads(module):
    return [p.grad for p in module.parameters()]


def _has_grad(module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module))


def _no_grad(module) -> bool:
    return all(g is None or g.abs().sum() == 0 for g in _grads(module))


def _x0(model, x, t, cond, pred_type="flow"):
    return convert_prediction(model(x, t, cond)[0], x, t, from_type=pred_type, to_type="x0")


def test_student_loss_equals_the_documented_formula(tiny_dit):
    student, teacher, fake, _ = _nets(tiny_dit)
    cfg = fgd.DMDConfig(guidance_scale=4.0)
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
    latents, noise, cond, neg = _inputs()

    torch.manual_seed(11)
    losses = pipe.compute_student_loss(latents, noise, cond, negative_encoder_hidden_states=neg)

    torch.manual_seed(11)
    with torch.no_grad():
        t_s = torch.full((2,), 0.999)
        x_s = (noise.double() * 0.999).float()
        gen = _x0(student, x_s, t_s, cond)
        t = sample_timesteps(2, cfg.sample_t_cfg)
        x_t = add_noise(gen, torch.randn_like(gen), t)
        teacher_x0 = classifier_free_guidance(
            _x0(teacher, x_t, t, cond), _x0(teacher, x_t, t, neg), 4.0
        )
        expected = vsd_loss(gen, teacher_x0, _x0(fake, x_t, t, cond))
    assert set(losses) == {"vsd", "total"}
    torch.testing.assert_close(losses["vsd"], expected, rtol=1e-6, atol=0)
    assert losses["total"] is losses["vsd"]


@pytest.mark.parametrize("gan", [False, True])
@pytest.mark.parametrize("batch_cfg", [False, True])
def test_student_loss_gradient_reaches_the_student_only(tiny_dit, gan, batch_cfg):
    student, teacher, fake, disc = _nets(tiny_dit, gan)
    cfg = fgd.DMDConfig(guidance_scale=3.0, gan_loss_weight_gen=0.1 if gan else 0.0)
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc, batch_cfg=batch_cfg)
    latents, noise, cond, neg = _inputs()
    losses = pipe.compute_student_loss(latents, noise, cond, negative_encoder_hidden_states=neg)
    assert ("gan_gen" in losses) == gan
    losses["total"].backward()
    assert _has_grad(student)
    assert _no_grad(teacher) and _no_grad(fake)
    if gan:
        assert _no_grad(disc)
        assert all(p.requires_grad for p in disc.parameters())  # restored after the forward


def test_gan_generator_gradient_flows_through_teacher_features(tiny_dit):
    student, teacher, fake, disc = _nets(tiny_dit, gan=True)
    cfg = fgd.DMDConfig(gan_loss_weight_gen=0.5)
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc)
    latents, noise, cond, _ = _inputs()
    losses = pipe.compute_student_loss(latents, noise, cond)
    # The GAN term alone reaches the student (through the teacher's captured features) ...
    losses["gan_gen"].backward(retain_graph=True)
    assert _has_grad(student)
    assert _no_grad(teacher) and _no_grad(disc) and _no_grad(fake)
    gan_grad = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    # ... and the total is VSD + weight * GAN.
    torch.testing.assert_close(losses["total"], losses["vsd"] + 0.5 * losses["gan_gen"])
    losses["vsd"].backward(retain_graph=True)
    vsd_grad = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    losses["total"].backward()
    for g_total, g_vsd, g_gan in zip(_grads(student), vsd_grad, gan_grad):
        torch.testing.assert_close(g_total, g_vsd + 0.5 * g_gan, rtol=1e-5, atol=1e-8)


def test_batched_cfg_gives_the_same_numbers(tiny_dit):
    student, teacher, fake, disc = _nets(tiny_dit, gan=True)
    cfg = fgd.DMDConfig(guidance_scale=5.0, gan_loss_weight_gen=0.1)
    latents, noise, cond, neg = _inputs()
    results = []
    for batch_cfg in (False, True):
        pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc, batch_cfg=batch_cfg)
        torch.manual_seed(5)
        losses = pipe.compute_student_loss(latents, noise, cond, negative_encoder_hidden_states=neg)
        losses["total"].backward()
        results.append(
            (
                {k: v.detach() for k, v in losses.items()},
                [p.grad.clone() for p in student.parameters()],
            )
        )
        student.zero_grad()
    (a, ga), (b, gb) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


class Recorder(nn.Module):
    """Records every call's timestep and kwargs; predicts flow = x (so x0 = (1 - t) x)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        self.calls.append(
            {
                "t": timestep.detach().clone(),
                "x": hidden_states.detach().clone(),
                "ehs": encoder_hidden_states,
                **kwargs,
            }
        )
        return hidden_states * self.w


def test_negative_model_kwargs_reach_the_unconditional_pass_only():
    student, teacher, fake = Recorder(), Recorder(), Recorder()
    pipe = fgd.DMDPipeline(student, teacher, fake, fgd.DMDConfig(guidance_scale=2.0))
    latents, noise, cond, neg = _inputs()
    pooled, neg_pooled = torch.ones(2, 3), -torch.ones(2, 3)
    pipe.compute_student_loss(
        latents,
        noise,
        cond,
        negative_encoder_hidden_states=neg,
        negative_model_kwargs={"pooled": neg_pooled},
        pooled=pooled,
    )
    assert [c["pooled"] is pooled for c in teacher.calls] == [True, False]
    assert teacher.calls[1]["pooled"] is neg_pooled and teacher.calls[1]["ehs"] is neg
    assert all(c["pooled"] is pooled for c in student.calls + fake.calls)


def test_num_train_timesteps_rescales_the_model_timestep():
    student, teacher, fake = Recorder(), Recorder(), Recorder()
    cfg = fgd.DMDConfig(num_train_timesteps=1000)
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
    latents, noise, _, _ = _inputs()
    pipe.compute_student_loss(latents, noise)
    torch.testing.assert_close(student.calls[0]["t"], torch.full((2,), 999.0))
    torch.testing.assert_close(teacher.calls[0]["t"], fake.calls[0]["t"])
    assert teacher.calls[0]["t"].min() >= 1.0 - 1e-4  # min_t * 1000


def test_multistep_student_input_is_noised_real_data_at_a_rung():
    student, teacher, fake = Recorder(), Recorder(), Recorder()
    t_list = [0.999, 0.6, 0.3, 0.0]
    cfg = fgd.DMDConfig(student_sample_steps=3, sample_t_cfg={"t_list": t_list})
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
    latents, noise, _, _ = _inputs(batch=64)
    pipe.compute_student_loss(latents, noise)
    (call,) = student.calls
    rungs = torch.tensor(t_list[:-1])
    assert torch.isclose(call["t"][:, None], rungs[None]).any(1).all()
    assert len(torch.unique(call["t"])) == 3  # 64 samples hit every rung
    torch.testing.assert_close(call["x"], add_noise(latents, noise, call["t"]))


def test_backward_simulation_unrolls_the_student_without_grad():
    t_list = [0.999, 0.6, 0.3, 0.0]
    cfg = fgd.DMDConfig(
        student_sample_steps=3, sample_t_cfg={"t_list": t_list}, backward_simulation=True
    )
    seen_rungs = set()
    for seed in range(12):
        student, teacher, fake = Recorder(), Recorder(), Recorder()
        pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
        _, noise, _, _ = _inputs(batch=2)
        torch.manual_seed(seed)
        losses = pipe.compute_student_loss(None, noise)  # no real data needed
        rung = len(student.calls) - 1
        seen_rungs.add(rung)
        # calls walk the rungs from pure noise; one rung index for the whole batch
        x = 0.999 * noise
        for k, call in enumerate(student.calls):
            torch.testing.assert_close(call["t"], torch.full((2,), t_list[k]))
            torch.testing.assert_close(call["x"], x, rtol=1e-6, atol=1e-6)
            x0 = (1 - t_list[k]) * x  # Recorder: flow = x
            eps = (x - (1 - t_list[k]) * x0) / t_list[k]  # ODE re-noise with implied eps
            x = (1 - t_list[k + 1]) * x0 + t_list[k + 1] * eps if k + 1 < len(t_list) else x
        losses["total"].backward()
        assert student.w.grad is not None  # the last (graded) forward keeps its graph
    assert seen_rungs == {0, 1, 2}


@pytest.mark.parametrize("loss_type", ["x0", "eps", "v", "flow", None])
def test_fake_score_loss_is_dsm_in_the_chosen_space(tiny_dit, loss_type):
    student, teacher, fake, _ = _nets(tiny_dit)
    cfg = fgd.DMDConfig(fake_score_pred_type=loss_type)
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
    latents, noise, cond, _ = _inputs()
    torch.manual_seed(2)
    losses = pipe.compute_fake_score_loss(latents, noise, cond)
    torch.manual_seed(2)
    with torch.no_grad():
        gen = _x0(student, (noise.double() * 0.999).float(), torch.full((2,), 0.999), cond)
        t = sample_timesteps(2, cfg.sample_t_cfg)
        eps = torch.randn_like(gen)
        x_t = add_noise(gen, eps, t)
        space = loss_type or "flow"
        pred = convert_prediction(fake(x_t, t, cond)[0], x_t, t, from_type="flow", to_type=space)
        expected = dsm_loss(
            space, pred, x0=gen, eps=eps, t=t, alpha_fn=lambda s: 1 - s, sigma_fn=lambda s: s
        )
    torch.testing.assert_close(losses["fake_score"], expected, rtol=1e-5, atol=0)
    losses["total"].backward()
    assert _has_grad(fake) and _no_grad(student) and _no_grad(teacher)


@pytest.mark.parametrize("r1", [0.0, 100.0])
@pytest.mark.parametrize("same_t_noise", [False, True])
def test_discriminator_loss_trains_the_discriminator_only(tiny_dit, r1, same_t_noise):
    student, teacher, fake, disc = _nets(tiny_dit, gan=True)
    cfg = fgd.DMDConfig(
        gan_loss_weight_gen=0.1, gan_r1_reg_weight=r1, gan_use_same_t_noise=same_t_noise
    )
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc)
    latents, noise, cond, _ = _inputs()
    losses = pipe.compute_discriminator_loss(latents, noise, cond)
    assert ("r1" in losses) == (r1 > 0)
    if r1 > 0:
        torch.testing.assert_close(losses["total"], losses["gan_disc"] + r1 * losses["r1"])
        assert losses["r1"] > 0
    losses["total"].backward()
    assert _has_grad(disc)
    assert _no_grad(student) and _no_grad(teacher) and _no_grad(fake)


def test_update_ema_counts_iterations(tiny_dit):
    student, teacher, fake, _ = _nets(tiny_dit)
    cfg = fgd.DMDConfig(ema={"decay": 0.5})
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg)
    assert isinstance(pipe.ema, fgd.ExponentialMovingAverage)
    w0 = student.proj_out.weight.detach().clone()
    pipe.update_ema()  # first update: (re)initialise from the live weights
    with torch.no_grad():
        student.proj_out.weight.add_(1.0)
    pipe.update_ema()  # 0.5 * w0 + 0.5 * (w0 + 1)
    torch.testing.assert_close(pipe.ema.state_dict()["proj_out.weight"], w0 + 0.5)
    assert pipe._iteration == 2
    assert fgd.DMDPipeline(student, teacher, fake, fgd.DMDConfig()).ema is None


def test_teacher_is_frozen_and_create_fake_score_copies(tiny_dit):
    teacher = tiny_dit(0)
    attach_feature_capture(teacher, [1])
    fake = fgd.create_fake_score(teacher)
    assert fake is not teacher and fake.training
    assert all(p.requires_grad for p in fake.parameters())
    assert fgd.get_feature_capture(fake) is None  # hooks are not carried over
    assert all(not b._forward_hooks for b in fake.blocks)
    assert fgd.get_feature_capture(teacher) is not None
    fgd.DMDPipeline(tiny_dit(1), teacher, fake, fgd.DMDConfig())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    same = fgd.create_fake_score(teacher, deep_copy=False)
    assert same is teacher and all(p.requires_grad for p in same.parameters())


# -- bad input ---------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(tiny_dit):
    student, teacher, fake, disc = _nets(tiny_dit)
    latents, noise, cond, neg = _inputs()
    pipe = fgd.DMDPipeline(student, teacher, fake, fgd.DMDConfig())

    with pytest.raises(ValueError, match=r"latents and noise must have the same shape.*\(2, 4, 8,"):
        pipe.compute_student_loss(latents, noise[:, :3], cond)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs negative conditioning"):
        pipe.compute_student_loss(latents, noise, cond, guidance_scale=3.0)
    with pytest.raises(ValueError, match="needs negative conditioning"):
        fgd.DMDPipeline(
            student, teacher, fake, fgd.DMDConfig(guidance_scale=2.0)
        ).compute_student_loss(latents, noise, cond)
    with pytest.raises(ValueError, match="gan_loss_weight_gen=0.1 .* needs a discriminator"):
        fgd.DMDPipeline(student, teacher, fake, fgd.DMDConfig(gan_loss_weight_gen=0.1))
    with pytest.raises(RuntimeError, match="needs a discriminator"):
        pipe.compute_discriminator_loss(latents, noise, cond)
    with pytest.raises(TypeError, match="DMDConfig"):
        fgd.DMDPipeline(student, teacher, fake, {"guidance_scale": 2.0})

    # GAN on, but no feature capture attached to the teacher
    d = fgd.ImageDiTDiscriminator(8, 2)
    gan_pipe = fgd.DMDPipeline(
        student, teacher, fake, fgd.DMDConfig(gan_loss_weight_gen=0.1), discriminator=d
    )
    with pytest.raises(RuntimeError, match="no feature capture is attached.*attach_feature"):
        gan_pipe.compute_student_loss(latents, noise, cond)
    with pytest.raises(RuntimeError, match="no feature capture"):
        gan_pipe.compute_discriminator_loss(latents, noise, cond)

    # multi-step without backward simulation needs real latents
    multi = fgd.DMDPipeline(
        student,
        teacher,
        fake,
        fgd.DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": [0.9, 0.5, 0.0]}),
    )
    with pytest.raises(ValueError, match="pass latents"):
        multi.compute_student_loss(None, noise, cond)


def test_model_output_in_the_wrong_layout_is_an_error():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, hidden_states, timestep, encoder_hidden_states=None):
            return hidden_states.flatten(2).transpose(1, 2) * self.w  # tokens, not latents

    pipe = fgd.DMDPipeline(Packed(), Packed(), Packed(), fgd.DMDConfig())
    latents, noise, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"returned shape \(2, 64, 4\) for input \(2, 4, 8, 8\)"):
        pipe.compute_student_loss(latents, noise)


@pytest.mark.parametrize("kind", ["student", "fake_score", "discriminator"])
def test_global_batch_draws_split_one_process_batch_across_ranks(tiny_dit, kind):
    # Two "ranks" with the same seed, each given its half of the batch, see exactly the noise
    # and timesteps a single process draws for the whole batch: their mean loss is its loss.
    student, teacher, fake, disc = _nets(tiny_dit, gan=kind == "discriminator")
    cfg = fgd.DMDConfig(
        guidance_scale=2.0,
        gan_loss_weight_gen=0.1 if kind == "discriminator" else 0.0,
        gan_use_same_t_noise=False,
        gan_r1_reg_weight=0.1 if kind == "discriminator" else 0.0,
    )
    pipe = fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc)
    latents, noise, cond, neg = _inputs(batch=4)

    def loss(rows: slice) -> torch.Tensor:
        torch.manual_seed(11)
        if kind == "student":
            out = pipe.compute_student_loss(
                latents[rows], noise[rows], cond[rows], negative_encoder_hidden_states=neg[rows]
            )
        elif kind == "fake_score":
            out = pipe.compute_fake_score_loss(latents[rows], noise[rows], cond[rows])
        else:
            out = pipe.compute_discriminator_loss(latents[rows], noise[rows], cond[rows])
        return out["total"].detach()

    whole = loss(slice(0, 4))
    halves = []
    for rank in (0, 1):
        pipe.draw_for_global_batch(rank, 2)
        halves.append(loss(slice(2 * rank, 2 * rank + 2)))
    pipe.draw_for_global_batch(0, 1)
    assert torch.equal(loss(slice(0, 4)), whole)  # world size 1: the plain draws again
    # Every loss is a mean over samples: equal halves average to the whole batch's loss.
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="rank must be in"):
        pipe.draw_for_global_batch(2, 2)
