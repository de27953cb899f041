"""Speed options give the numbers of the plain run: regionally compiled blocks (1e-5) and fused
/ foreach AdamW (1e-6 after three steps: the same update formula, reassociated).

The compile test traces with dynamo and AOT autograd (``aot_eager``): the graphs, guards and
the collapsed-token path through compiled blocks, without inductor's C++ code generation (~50 s
of CPU here). ``benchmarks/speed_options.py --only compile`` runs the inductor path."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel
from tiny_pipelines import TINY_SD3_CONFIG

from fastgen_diffusers.plugins import sd3
from fastgen_diffusers.plugins.common import compile_blocks
from fastgen_diffusers.training import parse_args

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = TINY_SD3_CONFIG


def test_compiled_blocks_match_eager_with_collapsed_tokens():
    torch.manual_seed(0)
    eager = sd3.SD3Wrapper(SD3Transformer2DModel(**TINY))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == TINY["num_layers"]
    assert compile_blocks(compiled) == 0  # shared or already compiled blocks: once
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.2, 0.7])
    text = torch.cat([torch.randn(2, 3, 32, generator=g), torch.zeros(2, 5, 32)], dim=1)
    pooled = torch.randn(2, 24, generator=g)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = eager(xe, t, text, pooled), compiled(xc, t, text, pooled)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)


def test_adam_kernels_give_the_same_updates():
    torch.manual_seed(0)
    start = [torch.randn(5, 7), torch.randn(11)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = {}
    for kind, kwargs in {
        "loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }.items():
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01, **kwargs)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results[kind] = params
    for kind in ("foreach", "fused"):
        for a, b in zip(results[kind], results["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_speed_flags_parse_with_their_defaults():
    base = ["--pretrained_model_name_or_path", "x", "--recipe", "r", "--dataset_name", "d"]
    args = parse_args(base)
    assert (args.compile_blocks, args.adam_implementation) == (False, "auto")
    args = parse_args(base + ["--compile_blocks", "--adam_implementation", "foreach"])
    assert (args.compile_blocks, args.adam_implementation) == (True, "foreach")
    with pytest.raises(SystemExit):
        parse_args(base + ["--adam_implementation", "fast"])
