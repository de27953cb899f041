"""Feature capture protocol and discriminator heads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastgen_diffusers as fgd
from fastgen_diffusers.features import (
    attach_feature_capture,
    detach_feature_capture,
    get_feature_capture,
)


def test_record_returns_block_outputs_in_block_order(tiny_dit):
    model = tiny_dit(0)
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach()))
    capture = attach_feature_capture(model, [2, 0])
    assert capture.feature_indices == (0, 2)
    x, t = torch.randn(2, 4, 6, 10), torch.rand(2)
    with capture.record() as feats:
        model(x, t)
    assert len(feats) == 2
    torch.testing.assert_close(feats[0], outputs[0])
    torch.testing.assert_close(feats[1], outputs[2])
    # outside record() nothing is stored
    model(x, t)
    assert capture._store == {}


def test_capture_is_found_through_wrappers(tiny_dit):
    model = tiny_dit(0)
    capture = attach_feature_capture(model, [1])

    class Wrapper(nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

    ddp_like = nn.Module()
    ddp_like.module = Wrapper(model)
    assert get_feature_capture(ddp_like) is capture
    assert get_feature_capture(torch.compile(model)) is capture
    assert get_feature_capture(tiny_dit(1)) is None
    # attaching through a wrapper hooks the wrapped model's blocks
    again = attach_feature_capture(ddp_like, [0])
    assert get_feature_capture(model) is again and not model.blocks[1]._forward_hooks


def test_checkpointed_recompute_does_not_record_twice(tiny_dit):
    model = tiny_dit(0)
    capture = attach_feature_capture(model, [1])
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.rand(2)
    with capture.record() as feats:
        out = checkpoint(model, x, t, use_reentrant=False)[0]
    (out.sum() + feats[0].sum()).backward()  # recompute happens outside record()
    assert len(feats) == 1 and x.grad is not None


def test_capture_errors(tiny_dit):
    model = tiny_dit(0)
    with pytest.raises(ValueError, match=r"feature_indices \[5\] out of range.*3 blocks"):
        attach_feature_capture(model, [1, 5])
    with pytest.raises(ValueError, match="at least one block"):
        attach_feature_capture(model, [])
    with pytest.raises(ValueError, match="no block list"):
        attach_feature_capture(nn.Linear(2, 2), [0])
    capture = attach_feature_capture(model, [0])
    with pytest.raises(RuntimeError, match="recorded no output for blocks"):
        with capture.record():
            pass
    with pytest.raises(RuntimeError, match="ran twice"):
        with capture.record():
            model(torch.randn(1, 4, 4, 4), torch.rand(1))
            model(torch.randn(1, 4, 4, 4), torch.rand(1))
    detach_feature_capture(model)
    assert get_feature_capture(model) is None and not model.blocks[0]._forward_hooks


def test_input_hook_fills_meta(tiny_dit):
    model = tiny_dit(0)

    def grid_transform(output, capture):
        h, w = capture.meta["grid"]
        assert output.shape[-2:] == (h, w)
        return output

    capture = attach_feature_capture(model, [0], transform=grid_transform)
    capture.add_input_hook(
        model, lambda args, kwargs, cap: cap.meta.__setitem__("grid", args[0].shape[-2:])
    )
    with capture.record() as feats:
        model(torch.randn(1, 4, 3, 5), torch.rand(1))
    assert feats[0].shape == (1, 8, 3, 5)
    detach_feature_capture(model)
    assert not model._forward_pre_hooks_with_kwargs and not model._forward_pre_hooks


def test_image_discriminator_shapes_and_gradient():
    torch.manual_seed(0)
    disc = fgd.ImageDiTDiscriminator(16, 3)
    feats = [torch.randn(2, 16, 6, 10, requires_grad=True) for _ in range(3)]
    logits = disc(feats)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(f.grad is not None for f in feats)
    head = disc.heads[0]
    assert isinstance(head[0], nn.Conv2d) and head[0].kernel_size == (4, 4)
    assert head[0].stride == (2, 2) and isinstance(head[1], nn.GroupNorm)
    assert isinstance(head[2], nn.LeakyReLU) and head[2].negative_slope == 0.2
    assert head[3].kernel_size == (1, 1) and head[3].out_channels == 1
    # per-head logit is the global mean of the 1x1 conv map
    with torch.no_grad():
        expected = head(feats[0]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logits[:, 0].detach(), expected)


def test_video_discriminator_and_per_map_channels():
    disc = fgd.VideoDiTDiscriminator([8, 12])
    logits = disc([torch.randn(2, 8, 1, 4, 6), torch.randn(2, 12, 3, 4, 4)])
    assert logits.shape == (2, 2)
    with pytest.raises(ValueError, match="expects 2 feature maps, got 1"):
        disc([torch.randn(2, 8, 1, 4, 6)])
    with pytest.raises(ValueError, match=r"feature 1 must be \[B, 12"):
        disc([torch.randn(2, 8, 1, 4, 6), torch.randn(2, 8, 1, 4, 6)])
    with pytest.raises(ValueError, match="num_features"):
        fgd.ImageDiTDiscriminator(8)


def test_bf16_features_into_fp32_discriminator():
    disc = fgd.ImageDiTDiscriminator(8, 1)
    out = disc([torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)])
    assert out.dtype == torch.float32


def test_loss_library_imports_no_diffusers_accelerate_or_peft():
    code = (
        "import sys, fastgen_diffusers, fastgen_diffusers.sampling, fastgen_diffusers.methods; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'accelerate', 'peft')];"
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
