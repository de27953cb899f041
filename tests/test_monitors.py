"""Collapse and saturation monitors: each statistic against its formula, the warning rules, and
a collapsed versus a healthy generator on the 2-D Gaussian mixture."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastgen_diffusers.losses import vsd_loss
from fastgen_diffusers.monitors import (
    CollapseMonitor,
    MonitorThresholds,
    pairwise_rms,
    prompt_fingerprints,
    prompt_groups,
    saturation_fraction,
    vsd_weight,
)
from fastgen_diffusers.toys import GaussianMixture

pytestmark = pytest.mark.usefixtures("single_thread")


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(((a.double() - b.double()) ** 2).mean().item())


def test_pairwise_rms_matches_the_pair_loop():
    x = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    pairs = list(itertools.combinations(range(5), 2))
    expected = sum(_rms(x[i], x[j]) for i, j in pairs) / len(pairs)
    assert pairwise_rms(x) == pytest.approx(expected, rel=1e-12)
    groups = torch.tensor([0, 1, 0, 1, 0])
    within = [(i, j) for i, j in pairs if groups[i] == groups[j]]  # 3 + 1 pairs, pooled
    assert len(within) == 4
    expected = sum(_rms(x[i], x[j]) for i, j in within) / 4
    assert pairwise_rms(x, groups) == pytest.approx(expected, rel=1e-12)
    assert pairwise_rms(x, torch.arange(5)) is None  # no prompt has two rows
    assert pairwise_rms(x[:1]) is None
    with pytest.raises(ValueError, match=r"group_ids must have shape \(5,\), got \(4,\)"):
        pairwise_rms(x, torch.zeros(4))


def test_prompt_groups_follow_equal_conditioning():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ehs = torch.stack([a[0], b[0], a[0], b[0]])
    pooled = torch.stack([a[1], b[1], a[1], a[1]])  # row 3 differs in the pooled embedding only
    ids = prompt_groups(ehs, pooled).tolist()
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3
    assert prompt_groups(ehs, None).tolist() == prompt_groups(ehs).tolist()
    # fingerprints (what ranks gather) group the rows the same way, across calls too
    fp = torch.cat(
        [prompt_fingerprints(ehs[:2], pooled[:2]), prompt_fingerprints(ehs[2:], pooled[2:])]
    )
    fp_ids = torch.unique(fp, return_inverse=True)[1].tolist()
    assert fp_ids[0] == fp_ids[2] and len({fp_ids[0], fp_ids[1], fp_ids[3]}) == 3
    with pytest.raises(ValueError, match="at least one conditioning tensor"):
        prompt_groups(None)


def test_saturation_and_latent_statistics_against_formulas():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 2, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    x = torch.randn(8, 2, 4, 4, generator=g) * 4.0
    count = 0
    for c in range(2):
        rc = ref[:, c].double()
        mean, std = rc.mean(), rc.std()  # per channel, unbiased, over batch and space
        count += int(((x[:, c].double() - mean).abs() > 3 * std).sum())
    assert saturation_fraction(x, ref, k=3.0) == pytest.approx(count / x.numel(), abs=1e-15)
    assert 0 < count < x.numel()
    with pytest.raises(ValueError, match="same channels"):
        saturation_fraction(x, ref[:, :1])

    monitor = CollapseMonitor()
    m = monitor.measure(student_x0=x, reference_x0=ref)
    assert m["monitor/mean"] == pytest.approx(x.double().mean().item(), rel=1e-12)
    assert m["monitor/std"] == pytest.approx(x.double().std().item(), rel=1e-12)
    assert m["monitor/std_ratio"] == pytest.approx(x.double().std().item() / ref.double().std())
    assert m["monitor/saturation"] == pytest.approx(count / x.numel())
    assert m["monitor/ref_saturation"] == saturation_fraction(ref, ref)
    assert "monitor/diversity_prompt" not in m  # no prompt groups given
    assert m["monitor/diversity_batch_ratio"] == pytest.approx(
        pairwise_rms(x) / pairwise_rms(ref), rel=1e-12
    )


def test_vsd_weight_and_step_match_the_vsd_loss():
    g = torch.Generator().manual_seed(2)
    gen, teacher, fake = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    w = 1.0 / ((gen - teacher).abs().mean(dim=(1, 2, 3)) + 1e-6)
    torch.testing.assert_close(vsd_weight(gen, teacher), w)
    m = CollapseMonitor().measure(student_x0=gen, teacher_x0=teacher, fake_x0=fake, grad_norm=2.5)
    assert m["monitor/vsd_weight"] == pytest.approx(w.mean().item(), rel=1e-6)
    step = w.view(3, 1, 1, 1) * (fake - teacher)
    assert m["monitor/vsd_step"] == pytest.approx(step.pow(2).mean().sqrt().item(), rel=1e-6)
    assert m["monitor/grad_norm"] == 2.5
    # The VSD loss is 0.5 |step|^2 / numel around the sample: the same step.
    loss = vsd_loss(gen, teacher, fake).item()
    assert loss == pytest.approx(0.5 * step.pow(2).mean().item(), rel=1e-5)


def _gmm_batches(n_checks: int, collapsed: bool):
    """Batches of a one-prompt generator on the 8-mode mixture, with fresh data as reference."""
    mixture = GaussianMixture()
    g = torch.Generator().manual_seed(7)
    for _ in range(n_checks):
        reference = mixture.sample(64, generator=g)
        if collapsed:
            samples = mixture.modes[0] + mixture.std * torch.randn(64, 2, generator=g)
        else:
            samples = mixture.sample(64, generator=g)
        yield samples, reference


def test_collapsed_gaussian_mixture_generator_warns_once(capsys):
    monitor = CollapseMonitor()
    groups = torch.zeros(64, dtype=torch.long)  # one prompt
    messages, ratios = [], []
    for step, (samples, ref) in enumerate(_gmm_batches(6, collapsed=True)):
        metrics = monitor.update(step, student_x0=samples, reference_x0=ref, group_ids=groups)
        ratios.append(metrics["monitor/diversity_prompt_ratio"])
        messages += monitor.new_warnings
        assert metrics["monitor/alarm/diversity"] == float(step >= 2)  # patience 3
    # One mode of std 0.08 against 8 modes on a radius-2 circle: RMS pair distances of about
    # 0.11 against 1.9.
    assert max(ratios) < 0.1
    diversity = [m for m in messages if "diversity" in m]
    assert len(diversity) == 1  # once, at the third check in a row
    (message,) = diversity
    assert "step 2" in message and "diversity_prompt_ratio below 0.3" in message
    assert f"{ratios[2]:.4g}" in message and "lower the guidance scale" in message
    assert monitor.alarms == ["diversity"]


def test_healthy_gaussian_mixture_generator_does_not_warn():
    monitor = CollapseMonitor()
    groups = torch.zeros(64, dtype=torch.long)
    for step, (samples, ref) in enumerate(_gmm_batches(6, collapsed=False)):
        metrics = monitor.update(step, student_x0=samples, reference_x0=ref, group_ids=groups)
        assert 0.8 < metrics["monitor/diversity_prompt_ratio"] < 1.25  # same distribution
        assert monitor.new_warnings == []
    assert monitor.alarms == [] and not monitor.warned


def test_saturation_grad_norm_and_fake_trend_warnings():
    g = torch.Generator().manual_seed(3)
    monitor = CollapseMonitor(patience=2)
    messages = []
    for step in range(4):
        ref = torch.randn(16, 4, 4, 4, generator=g)
        saturated = torch.randn(16, 4, 4, 4, generator=g) * 5.0  # ~55% beyond 3 std
        for loss in (1.0, 1.0) if step == 0 else (4.0, 4.0):
            monitor.observe_fake_score_loss(loss)
        norm = 1.0 if step < 3 else 100.0
        metrics = monitor.update(step, student_x0=saturated, reference_x0=ref, grad_norm=norm)
        messages += monitor.new_warnings
    assert metrics["monitor/fake_score_trend"] == pytest.approx(4.0)
    names = {m.split(": ")[1].split(" = ")[0]: m for m in messages}
    # Saturation and spread are past from the first check: warned at the second. The trend is
    # 1 at the first check (its own baseline), 4 after: warned at the third. The grad norm at
    # step 3 is 100x the median of the 3 earlier checks, but needs a second check past it.
    assert sorted(names) == ["fake_score_trend", "saturation", "std_ratio"]
    assert names["saturation"].startswith("WARNING collapse monitor, step 1: saturation = 0.")
    assert "saturation above 0.05" in names["saturation"]
    assert "std_ratio outside [0.5, 2]" in names["std_ratio"]
    assert names["fake_score_trend"].startswith("WARNING collapse monitor, step 2:")
    assert "--fake_score_learning_rate" in names["fake_score_trend"]
    assert metrics["monitor/alarm/grad_norm"] == 0.0
    monitor.update(4, student_x0=saturated, reference_x0=ref, grad_norm=float("nan"))
    (message,) = monitor.new_warnings
    assert "grad_norm = nan (grad_norm above 10" in message and "--max_grad_norm" in message
    monitor.update(5, student_x0=saturated, reference_x0=ref, grad_norm=float("nan"))
    assert monitor.new_warnings == []  # each diagnostic once
    # no fake-score loss since step 3: the trend's last state stands
    assert monitor.alarms == ["fake_score_trend", "grad_norm", "saturation", "std_ratio"]


def test_bad_settings_and_shapes_are_named():
    with pytest.raises(ValueError, match="diversity_ratio must be a finite value > 0, got -1"):
        CollapseMonitor(diversity_ratio=-1)
    with pytest.raises(ValueError, match="patience must be an int >= 1, got 0"):
        MonitorThresholds(patience=0)
    with pytest.raises(ValueError, match=r"reference_x0 \(2, 3\) must match student_x0 \(2, 4\)"):
        CollapseMonitor().measure(student_x0=torch.zeros(2, 4), reference_x0=torch.zeros(2, 3))


def test_log_step_prints_each_warning_once_and_keeps_history_out_of_losses_jsonl(tmp_path, capsys):
    import json
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from fastgen_diffusers.training.loop import log_step

    tracked: list[tuple[int, dict]] = []
    run = SimpleNamespace(
        accelerator=SimpleNamespace(log=lambda logs, step: tracked.append((step, logs))),
        is_main=True,
        log_dir=tmp_path / "logs",
    )
    monitor = CollapseMonitor()
    bar = tqdm(total=8, disable=True)
    for step in range(1, 9):
        logs = {"student/total": 0.5, "monitor/diversity_prompt_ratio": 0.1}
        if step % 2 == 0:  # a fake-score turn: no check, feeds the trend
            logs = {"fake_score/total": 0.2, "fake_score/fake_score": 0.2}
        log_step(run, logs, step, bar, monitor)
    out = capsys.readouterr().out
    assert out.count("WARNING collapse monitor") == 1  # third check (step 5), printed once
    assert "step 5: diversity = 0.1 (diversity_prompt_ratio below 0.3" in out
    checks = dict(tracked)
    assert checks[5]["monitor/alarm/diversity"] == 1.0 and checks[3]["monitor/alarm/diversity"] == 0
    assert checks[3]["monitor/fake_score_trend"] == 1.0  # its own first window
    rows = [
        json.loads(line) for line in (tmp_path / "logs" / "losses.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert not any("alarm" in k or "trend" in k for r in rows for k in r)
    assert rows[4]["monitor/diversity_prompt_ratio"] == 0.1
