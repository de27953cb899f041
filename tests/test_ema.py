"""ExponentialMovingAverage: schedules, dtypes, state round trip, wrapper prefixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen_diffusers import EMAConfig, ExponentialMovingAverage


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.norm = nn.BatchNorm1d(2).to(dtype)  # has buffers (running stats, counter)


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_constant_schedule_averages_parameters_and_copies_buffers():
    model = Net()
    _set(model, 0.0)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.9))
    ema.update(model, iteration=0)  # start_iter: initialise
    _set(model, 1.0)
    model.norm.running_mean.fill_(5.0)
    ema.update(model, iteration=1)
    state = ema.state_dict()
    torch.testing.assert_close(state["lin.weight"], torch.full((2, 3), 0.1))
    torch.testing.assert_close(state["norm.running_mean"], torch.full((2,), 5.0))
    _set(model, 2.0)
    ema.update(model, iteration=2)  # 0.9 * 0.1 + 0.1 * 2
    torch.testing.assert_close(ema.state_dict()["lin.weight"], torch.full((2, 3), 0.29))


def test_start_iter_skips_then_initialises():
    model = Net()
    _set(model, 1.0)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5, start_iter=3))
    _set(model, 7.0)
    for it in (1, 2):
        ema.update(model, iteration=it)
    torch.testing.assert_close(ema.state_dict()["lin.bias"], torch.full((2,), 1.0))
    ema.update(model, iteration=3)
    torch.testing.assert_close(ema.state_dict()["lin.bias"], torch.full((2,), 7.0))


@pytest.mark.parametrize(
    "config, iteration, expected",
    [
        (EMAConfig(type="constant", decay=0.99), 10, 0.99),
        (EMAConfig(type="power", gamma=6.94), 10, (1 - 1 / 10) ** 7.94),
        (EMAConfig(type="power", gamma=6.94), 1, 0.0),
        # EDM: halflife_nimg = min(500k, it * bs * rampup) = min(500000, 100*4*0.05=20)
        (EMAConfig(type="halflife", batch_size=4), 100, 0.5 ** (4 / 20)),
        (EMAConfig(type="halflife", batch_size=4, rampup_ratio=None), 100, 0.5 ** (4 / 5e5)),
        (EMAConfig(type="halflife", batch_size=4, halflife_kimg=0.01), 10**6, 0.5 ** (4 / 10)),
    ],
)
def test_schedules(config, iteration, expected):
    ema = ExponentialMovingAverage(Net(), config)
    assert ema.beta(iteration) == pytest.approx(expected, rel=1e-12)


def test_fp32_shadows_for_a_bf16_model():
    model = Net(torch.bfloat16)
    _set(model, 1.0)
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.999))
    ema.update(model, iteration=0)
    assert ema.state_dict()["lin.weight"].dtype == torch.float32
    assert ema.state_dict()["norm.running_var"].dtype == torch.bfloat16  # buffers: live dtype
    _set(model, 1.0 + 2**-6)
    for it in range(1, 11):
        ema.update(model, iteration=it)
    # fp32 accumulates 1 + 2^-6 (1 - 0.999^10); a bf16 shadow would stay stuck at 1.0
    expected = 1 + 2**-6 * (1 - 0.999**10)
    assert ema.state_dict()["lin.weight"][0, 0].item() == pytest.approx(expected, rel=1e-6)
    live_dtype = ExponentialMovingAverage(model, EMAConfig(dtype=None))
    assert live_dtype.state_dict()["lin.weight"].dtype == torch.bfloat16


def test_state_dict_round_trip_and_copy_to():
    model = Net()
    ema = ExponentialMovingAverage(model, EMAConfig(decay=0.5))
    ema.update(model, iteration=0)
    _set(model, 3.0)
    ema.update(model, iteration=1)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}

    restored = ExponentialMovingAverage(Net(), EMAConfig(decay=0.5))
    restored.load_state_dict(saved)
    for key, value in saved.items():
        torch.testing.assert_close(restored.state_dict()[key], value)
    # a loaded state is initialised: the next update averages instead of re-copying
    _set(model, 5.0)
    restored.update(model, iteration=2)
    torch.testing.assert_close(restored.state_dict()["lin.bias"], 0.5 * saved["lin.bias"] + 2.5)

    target = Net(torch.bfloat16)
    ema.copy_to(target)
    torch.testing.assert_close(target.lin.weight.float(), saved["lin.weight"], rtol=2**-7, atol=0)
    assert target.lin.weight.dtype == torch.bfloat16


def test_load_state_dict_rejects_a_mismatched_state():
    ema = ExponentialMovingAverage(Net(), EMAConfig())
    state = dict(ema.state_dict())
    state.pop("lin.bias")
    with pytest.raises(KeyError, match="missing.*lin.bias"):
        ema.load_state_dict(state)
    state = dict(ema.state_dict())
    state["lin.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match="lin.weight.*shape"):
        ema.load_state_dict(state)


def test_wrapper_prefixes_are_stripped():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = Net()
    wrapped = Net()
    wrapped.lin = checkpoint_wrapper(wrapped.lin)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    ema = ExponentialMovingAverage(wrapped, EMAConfig(decay=0.0))
    assert "lin.weight" in ema.state_dict()
    ema.update(wrapped, iteration=1)
    ema.copy_to(plain)  # the clean names load into an unwrapped model
    torch.testing.assert_close(plain.lin.weight, wrapped.lin._checkpoint_wrapped_module.weight)


def test_trainable_only_skips_frozen_parameters():
    model = Net()
    model.lin.weight.requires_grad_(False)
    ema = ExponentialMovingAverage(model, EMAConfig(), trainable_only=True)
    assert "lin.weight" not in ema.state_dict() and "lin.bias" in ema.state_dict()
    with pytest.raises(TypeError, match="EMAConfig"):
        ExponentialMovingAverage(model, {"decay": 0.9})
