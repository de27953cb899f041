"""The stabilizer options of DMDConfig, each against its formula on small tensors: teacher
guidance normalisation (rescale / clamp), per-sample guidance scales, implicit distribution
alignment (full networks and LoRA), intra-segment guidance, the backward-simulation mix and
the GAN weight per student rung."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from pydantic import ValidationError
from tiny_pipelines import TINY_SD3_CONFIG
from torch import nn

from fastgen_diffusers import DMDConfig
from fastgen_diffusers.alignment import align_fake_score, blend_low_rank
from fastgen_diffusers.flow_matching import add_noise, next_rung
from fastgen_diffusers.losses import gan_gen_loss, pseudo_huber_loss
from fastgen_diffusers.methods import DMDPipeline
from fastgen_diffusers.utils import classifier_free_guidance, normalize_guidance

B, C, H, W = 3, 4, 2, 2


pytestmark = pytest.mark.usefixtures("single_thread")


class Affine(nn.Module):
    """A tiny x0-predicting network in the pipeline's call convention, conditioned by a
    per-sample scalar prompt: ``x0 = a * x_t + b * t + prompt``."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        t = timestep.reshape(-1, 1, 1, 1)
        prompt = encoder_hidden_states.reshape(-1, 1, 1, 1)
        return self.a * hidden_states + self.b * t + prompt


def _pipe(**overrides) -> DMDPipeline:
    cfg = DMDConfig(pred_type="x0", **overrides)
    return DMDPipeline(Affine(0.5, 0.2), Affine(0.3, -0.1), Affine(0.4, 0.05), cfg)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- guidance ---------------------------------------------------------------------------------


def test_guidance_norm_against_velocity_formula():
    x_t, cond, uncond = _randn(B, C, H, W, seed=1), _randn(B, C, H, W, seed=2), _randn(B, C, H, W)
    t = torch.tensor([0.9, 0.5, 0.1]).reshape(-1, 1, 1, 1)
    guided = classifier_free_guidance(cond, uncond, 4.0)
    # Direct: velocities v = (x_t - x0) / t, per-token norms over the channels (dim 1).
    v, v_cond = (x_t - guided) / t, (x_t - cond) / t
    n, n_cond = v.norm(dim=1, keepdim=True), v_cond.norm(dim=1, keepdim=True)
    rescaled = x_t - t * (v * n_cond / n)
    clamped = x_t - t * (v * torch.clamp(3.0 * n_cond / n, max=1.0))
    got = normalize_guidance(guided, cond, x_t, "rescale")
    torch.testing.assert_close(got, rescaled, rtol=1e-5, atol=1e-5)
    # The rescaled velocity has the conditional velocity's norm at every token.
    torch.testing.assert_close(((x_t - got) / t).norm(dim=1), n_cond.squeeze(1))
    torch.testing.assert_close(
        normalize_guidance(guided, cond, x_t, "clamp", 3.0), clamped, rtol=1e-5, atol=1e-5
    )
    # Some tokens are clamped, some are not: both branches of min(1, k n_cond / n) are used.
    ratio = 3.0 * n_cond / n
    assert (ratio < 1).any() and (ratio > 1).any()
    with pytest.raises(ValueError, match="'rescale' or 'clamp'"):
        normalize_guidance(guided, cond, x_t, "layer")


def test_pipeline_applies_guidance_norm_to_the_teacher():
    pipe = _pipe(guidance_scale=3.0, guidance_norm="rescale")
    x_t, t = _randn(B, C, H, W), torch.tensor([0.8, 0.5, 0.2])
    pos, neg = torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3)
    got, _ = pipe._guided_teacher_x0(x_t, t, pos, neg, 3.0, {}, {}, None)
    cond = pipe.teacher(x_t, t, pos)
    uncond = pipe.teacher(x_t, t, neg)
    expected = normalize_guidance(cond + 2.0 * (cond - uncond), cond, x_t, "rescale")
    torch.testing.assert_close(got, expected)


def test_per_sample_guidance_scale():
    cond, uncond = _randn(B, C, H, W, seed=1), _randn(B, C, H, W, seed=2)
    scales = torch.tensor([1.0, 2.5, 7.0])
    got = classifier_free_guidance(cond, uncond, scales)
    for i, s in enumerate(scales.tolist()):
        torch.testing.assert_close(got[i], cond[i] + (s - 1) * (cond[i] - uncond[i]))


def test_guidance_range_draws_per_sample_and_matches_a_fixed_scale_when_degenerate():
    pipe = _pipe(guidance_scale_range=(3.0, 10.0))
    torch.manual_seed(0)
    draws = pipe._draw_guidance_scale(4000, torch.device("cpu"))
    assert draws.min() >= 3.0 and draws.max() <= 10.0
    # U(3, 10): mean 6.5, std 7 / sqrt(12) = 2.02; 4000 draws put the mean within 0.1 (3 s.e.).
    assert abs(draws.mean().item() - 6.5) < 0.1 and draws.unique().numel() > 3900

    x0, noise = _randn(B, C, H, W, seed=3), _randn(B, C, H, W, seed=4)
    pos, neg = torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3)
    losses = []
    for cfg in ({"guidance_scale_range": (4.0, 4.0)}, {"guidance_scale": 4.0}):
        pipe = _pipe(**cfg)
        torch.manual_seed(7)
        # The range draws one extra tensor: draw the same one for the fixed scale.
        if "guidance_scale" in cfg:
            torch.rand(B, dtype=torch.float64)
        losses.append(pipe.compute_student_loss(x0, noise, pos, negative_encoder_hidden_states=neg))
    torch.testing.assert_close(losses[0]["total"], losses[1]["total"])
    with pytest.raises(ValueError, match=r"guidance_scale=\(3.0, 10.0\) needs negative"):
        _pipe(guidance_scale_range=(3.0, 10.0)).compute_student_loss(x0, noise, pos)


# -- IDA --------------------------------------------------------------------------------------


def test_ida_full_networks_lerp_every_parameter():
    fake, student = Affine(0.4, 0.05), Affine(0.5, 0.2)
    align_fake_score(fake, student, 0.03)
    assert fake.a.item() == pytest.approx(0.97 * 0.4 + 0.03 * 0.5, abs=1e-7)
    assert fake.b.item() == pytest.approx(0.97 * 0.05 + 0.03 * 0.2, abs=1e-7)
    assert student.a.item() == pytest.approx(0.5)  # the student is untouched
    with pytest.raises(ValueError, match="no parameter 'weight'"):
        align_fake_score(nn.Linear(2, 2), Affine(0.0, 0.0), 0.03)


def test_ida_through_the_pipeline_runs_only_when_enabled():
    for ratio, expected in ((0.0, 0.4), (0.25, 0.75 * 0.4 + 0.25 * 0.5)):
        pipe = _pipe(ida_ratio=ratio)
        pipe.apply_ida()
        assert pipe.fake_score.a.item() == pytest.approx(expected, abs=1e-7)


def test_blend_low_rank_is_the_best_rank_k_approximation():
    out, inp, k, r = 12, 9, 3, 0.03
    b_f, a_f = _randn(out, k, seed=1), _randn(k, inp, seed=2)
    b_s, a_s = _randn(out, k, seed=3), _randn(k, inp, seed=4)
    b, a = blend_low_rank(b_f, a_f, b_s, a_s, r)
    assert b.shape == (out, k) and a.shape == (k, inp)
    blend = (1 - r) * b_f @ a_f + r * b_s @ a_s  # rank 2k
    u, s, vh = torch.linalg.svd(blend)
    best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young
    torch.testing.assert_close(b @ a, best, rtol=1e-4, atol=1e-5)
    # Exact when the blend has rank <= k: same A, or r = 1 (the student's delta).
    b, a = blend_low_rank(b_f, a_f, b_s, a_f, r)
    torch.testing.assert_close(b @ a, ((1 - r) * b_f + r * b_s) @ a_f, rtol=1e-4, atol=1e-5)
    b, a = blend_low_rank(b_f, a_f, b_s, a_s, 1.0)
    torch.testing.assert_close(b @ a, b_s @ a_s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["shared_lora", "separate_lora"])
def test_ida_lora_blends_the_adapter_deltas(layout):
    from fastgen_diffusers.lora import FAKE_SCORE_ADAPTER, LoraSettings, build_dmd_networks
    from fastgen_diffusers.plugins.sd3 import SD3Wrapper

    torch.manual_seed(0)
    teacher = SD3Wrapper(SD3Transformer2DModel(**TINY_SD3_CONFIG))
    nets = build_dmd_networks(teacher, layout, LoraSettings(rank=2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for role in (nets.student, nets.fake_score):
            for name, p in role.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def deltas(role) -> dict[str, torch.Tensor]:
        params = dict(role.named_parameters())
        return {
            name.split(".lora_B.")[0]: p.detach().clone()
            @ params[name.replace("lora_B", "lora_A")].detach()
            for name, p in params.items()
            if "lora_B" in name
        }

    before_fake, before_student = deltas(nets.fake_score), deltas(nets.student)
    base_before = {n: p.detach().clone() for n, p in nets.teacher.named_parameters()}
    align_fake_score(nets.fake_score, nets.student, 0.03)
    after = deltas(nets.fake_score)
    assert after.keys() == before_fake.keys() and len(after) > 0
    for name, got in after.items():
        blend = 0.97 * before_fake[name] + 0.03 * before_student[name]
        u, s, vh = torch.linalg.svd(blend)
        torch.testing.assert_close(got, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    assert deltas(nets.student).keys() == before_student.keys()
    for name, delta in deltas(nets.student).items():
        torch.testing.assert_close(delta, before_student[name], rtol=0, atol=0)
    for name, p in nets.teacher.named_parameters():  # the base (the teacher) is untouched
        torch.testing.assert_close(p, base_before[name], rtol=0, atol=0)
    assert FAKE_SCORE_ADAPTER in next(iter(dict(nets.fake_score.named_parameters())))

    # A LoRA student with a full fake score (student_lora) has no delta to blend: refused.
    with pytest.raises(ValueError, match="LoRA student"):
        align_fake_score(copy.deepcopy(teacher), nets.student, 0.03)


# -- ISG --------------------------------------------------------------------------------------


def test_pseudo_huber_formula():
    a, b = torch.tensor([0.0, 1.0, -3.0]), torch.tensor([0.0005, -1.0, 0.0])
    c = 1e-3
    expected = sum(((x - y) ** 2 + c * c) ** 0.5 - c for x, y in zip(a.tolist(), b.tolist())) / 3
    assert pseudo_huber_loss(a, b, c).item() == pytest.approx(expected, rel=1e-6)


def test_next_rung():
    t_list = [0.999, 0.9, 0.75, 0.5, 0.0]
    got = next_rung(torch.tensor([0.999, 0.9, 0.75, 0.5]), t_list)
    torch.testing.assert_close(got, torch.tensor([0.9, 0.75, 0.5, 0.0]))


def test_isg_loss_against_direct_formula():
    # Margin 0.49 leaves no room inside either segment, so t_mid is the midpoint (no draw).
    t_list = [0.999, 0.5, 0.0]
    pipe = _pipe(
        guidance_scale=2.0,
        student_sample_steps=2,
        sample_t_cfg={"t_list": t_list},
        isg_weight=1.0,
        isg_margin=0.49,
    )
    x, t = _randn(B, C, H, W, seed=1), torch.tensor([0.999, 0.5, 0.5])
    pos, neg = torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3)
    gen = pipe.student(x, t, pos)
    got = pipe._isg_loss(x, t, gen, pos, neg, 2.0, {}, {})

    def euler(x0, x_from, t_from, t_to):  # x + (t_to - t_from) v with v = (x - x0) / t
        t_from, t_to = t_from.reshape(-1, 1, 1, 1), t_to.reshape(-1, 1, 1, 1)
        return x_from + (t_to - t_from) * (x_from - x0) / t_from

    t_prev = torch.tensor([0.5, 0.0, 0.0])
    t_mid = (t + t_prev) / 2
    cond, uncond = pipe.teacher(x, t, pos), pipe.teacher(x, t, neg)
    x_mid = euler(cond + (cond - uncond), x, t, t_mid)
    target = euler(pipe.student(x_mid, t_mid, pos), x_mid, t_mid, t_prev)
    own = euler(gen, x, t, t_prev)
    expected = (torch.sqrt((own - target) ** 2 + 1e-6) - 1e-3).mean()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    got.backward()
    assert pipe.student.a.grad is not None and pipe.teacher.a.grad is None

    torch.manual_seed(0)
    x0, noise = _randn(B, C, H, W, seed=3), _randn(B, C, H, W, seed=4)
    losses = pipe.compute_student_loss(x0, noise, pos, negative_encoder_hidden_states=neg)
    assert set(losses) == {"vsd", "isg", "total"}
    torch.testing.assert_close(losses["total"], losses["vsd"] + losses["isg"])


# -- backward-simulation mix, GAN per rung, config ----------------------------------------------


def test_backward_simulation_mix_uses_real_latents_on_the_other_iterations():
    t_list = [0.999, 0.75, 0.5, 0.25, 0.0]
    common = {"student_sample_steps": 4, "sample_t_cfg": {"t_list": t_list}}
    x0, noise = _randn(B, C, H, W, seed=3), _randn(B, C, H, W, seed=4)
    pos = torch.tensor([1.0, -1.0, 0.5])
    pipe = _pipe(backward_simulation=True, backward_simulation_prob=0.0, **common)
    torch.manual_seed(0)
    x, t = pipe._student_input(x0, noise, pos, {})
    assert set(t.tolist()) <= set(torch.tensor(t_list[:-1]).tolist())
    torch.testing.assert_close(x, add_noise(x0, noise, t))  # noised real latents
    with pytest.raises(ValueError, match="backward_simulation_prob=0.0 < 1"):
        pipe._student_input(None, noise, pos, {})
    # prob 0.5: both kinds of iteration occur (unrolled inputs are not the noised latents).
    pipe = _pipe(backward_simulation=True, backward_simulation_prob=0.5, **common)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(20):
        x, t = pipe._student_input(x0, noise, pos, {})
        kinds.add(bool(torch.allclose(x, add_noise(x0, noise, t))))
    assert kinds == {True, False}
    with pytest.raises(ValidationError, match="set backward_simulation: true"):
        DMDConfig(backward_simulation_prob=0.5, **common)
    # A run that mixes needs a dataset with images; one that always unrolls does not.
    from fastgen_diffusers.training.preflight import needs_media

    assert needs_media(DMDConfig(backward_simulation=True, backward_simulation_prob=0.5, **common))
    assert not needs_media(DMDConfig(backward_simulation=True, **common))


def test_gan_generator_weight_per_sample():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.3]])
    t = torch.tensor([0.999, 0.75, 0.5])
    weight = (1 - t) ** 2
    per_sample = torch.nn.functional.softplus(-logits).mean(dim=1)
    torch.testing.assert_close(gan_gen_loss(logits, weight), (weight * per_sample).mean())
    torch.testing.assert_close(gan_gen_loss(logits), per_sample.mean())
    with pytest.raises(ValueError, match=r"weight must be \[3\]"):
        gan_gen_loss(logits, weight[:2])


def test_stabilizers_default_off_and_validate():
    cfg = DMDConfig()
    assert cfg.guidance_norm is None and cfg.guidance_scale_range is None
    assert cfg.ida_ratio == 0.0 and cfg.isg_weight == 0.0
    assert cfg.backward_simulation_prob == 1.0 and cfg.gan_rung_weighting == "constant"
    with pytest.raises(ValidationError, match=r"guidance_scale_range=\[5.0, 3.0\]"):
        DMDConfig(guidance_scale_range=(5.0, 3.0))
    with pytest.raises(ValidationError, match="ida_ratio"):
        DMDConfig(ida_ratio=1.5)


def test_model_card_lists_the_stabilizers_that_are_on():
    from fastgen_diffusers import load_dmd_config
    from fastgen_diffusers.training.model_card import _recipe_rows

    cfg = load_dmd_config("general/distillation/dmd2_sd35_large")
    rows = dict(_recipe_rows(cfg, cfg.sample_t_cfg.t_list, "sde"))
    assert rows["teacher CFG scale per sample"] == "U(3, 10)"
    assert rows["IDA ratio"] == 0.03 and rows["ISG weight"] == 1.0
    assert rows["backward simulation"] == "0.5 of the iterations, else real latents"
    plain = dict(_recipe_rows(DMDConfig(), [0.999, 0.0], "sde"))
    assert not {"IDA ratio", "ISG weight", "guidance norm", "GAN weight per rung"} & set(plain)
