"""Exact deduplication of identical SD3 text tokens: the collapsed forward (one token per run of
identical rows, weighted by ``log n`` in attention) equals the full forward, with gradients.

Tolerance: fp32, relative 1e-5 (atol 1e-6 on outputs of magnitude ~1). The collapsed attention
differs from the full one only in float rounding: ``n * e^s`` computed as ``e^(s + log n)``
(one rounding of ``log n``, ~1e-7 relative) and a shorter softmax sum; measured ~1e-7 on the
tiny models and 2.6e-6 absolute on the digits teacher (outputs ~3).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from tiny_pipelines import TINY_SD3_CONFIG

from fastgen_diffusers.plugins import sd3
from fastgen_diffusers.plugins.common import identical_token_runs

pytestmark = pytest.mark.usefixtures("single_thread")

TEACHER = Path(__file__).resolve().parents[1] / "embedded" / "digits-sd3"
TOL = dict(rtol=1e-5, atol=1e-6)
TINY = {**TINY_SD3_CONFIG, "sample_size": 16, "num_layers": 3}
VARIANTS = {"sd3": {}, "sd35": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}}


def text_with_runs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``[B, 12, 32]``: 3 distinct tokens, a run of 3 equal tokens, 1 token, 5 zeros."""
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randn(batch, 5, 32, generator=g)
    return torch.cat(
        [
            distinct[:, :3],
            distinct[:, 3:4].expand(-1, 3, -1),
            distinct[:, 4:],
            torch.zeros(batch, 5, 32),
        ],
        dim=1,
    )


def assert_grad_close(grad: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Relative to the whole gradient's norm: a weight gradient sums many products, so an
    element near zero carries the rounding of the large ones (seen: 1.5e-6 on 0.04)."""
    error = float((grad - ref).norm() / ref.norm().clamp_min(1e-12))
    assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"


def text_tokens_seen(wrapper: sd3.SD3Wrapper, *args) -> tuple[torch.Tensor, int]:
    """The wrapper's output and how many text tokens its transformer embedded."""
    seen = []
    handle = wrapper.transformer.context_embedder.register_forward_hook(
        lambda module, inp, out: seen.append(inp[0].shape[1])
    )
    try:
        return wrapper(*args), seen[0]
    finally:
        handle.remove()


def test_identical_token_runs_are_shared_by_every_sample():
    tokens = text_with_runs()
    starts, counts = identical_token_runs(tokens)
    assert starts.tolist() == [0, 1, 2, 3, 6, 7] and counts.tolist() == [1, 1, 1, 3, 1, 5]
    # A row equal to its neighbour in one sample only is not collapsed.
    other = tokens.clone()
    other[1, 4] += 1.0
    starts, counts = identical_token_runs(other)
    assert counts.tolist() == [1, 1, 1, 1, 1, 1, 1, 5]
    # Both prompts of a CFG pair share runs only where both have them.
    assert identical_token_runs(tokens, other)[1].tolist() == [1, 1, 1, 1, 1, 1, 1, 5]
    assert identical_token_runs(torch.randn(2, 6, 4)) is None
    assert identical_token_runs(torch.full((1, 4, 2), float("nan"))) is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_collapsed_forward_and_gradients_equal_the_full_ones(variant):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TINY, **VARIANTS[variant])
    full = sd3.SD3Wrapper(copy.deepcopy(transformer), dedup_text_tokens=False)
    dedup = sd3.SD3Wrapper(transformer)  # default: on in float32
    assert all(
        isinstance(p, JointAttnProcessor2_0) for p in full.transformer.attn_processors.values()
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([0.3, 0.8])
    ehs, pooled = text_with_runs(), torch.randn(2, 24, generator=g)

    x_full, x_dedup = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_full, seen_full = text_tokens_seen(full, x_full, t, ehs, pooled)
    out_dedup, seen_dedup = text_tokens_seen(dedup, x_dedup, t, ehs, pooled)
    assert (seen_full, seen_dedup) == (12, 6)
    torch.testing.assert_close(out_dedup, out_full, **TOL)

    weights = torch.randn(out_full.shape, generator=g)
    (out_full * weights).sum().backward()
    (out_dedup * weights).sum().backward()
    torch.testing.assert_close(x_dedup.grad, x_full.grad, **TOL)
    grads_full = dict(full.transformer.named_parameters())
    for name, param in dedup.transformer.named_parameters():
        ref = grads_full[name].grad
        if ref is None:  # the last block's text-stream output is unused
            assert param.grad is None or param.grad.abs().max() == 0, name
            continue
        assert_grad_close(param.grad, ref, name)

    # The GAN features (captured image streams) and their gradient to the input match too.
    feats = {}
    for name, wrapper in (("full", full), ("dedup", dedup)):
        capture = sd3.attach_feature_capture(wrapper)
        xi = x.clone().requires_grad_()
        with capture.record() as features:
            wrapper(xi, t, ehs, pooled)
        sum((f * f).mean() for f in features).backward()
        feats[name] = (features, xi.grad)
        capture.remove()
    for a, b in zip(feats["dedup"][0], feats["full"][0]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(feats["dedup"][1], feats["full"][1], **TOL)

    # Distinct tokens: nothing collapses, the stock numbers.
    ehs_distinct = torch.randn(2, 12, 32, generator=g)
    with torch.no_grad():
        out, seen = text_tokens_seen(dedup, x, t, ehs_distinct, pooled)
        torch.testing.assert_close(out, full(x, t, ehs_distinct, pooled), rtol=0, atol=1e-6)
    assert seen == 12


def test_lora_adapted_attention_and_export_keep_the_stock_processor(tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TINY)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "add_k_proj", "add_v_proj"])
    )
    for name, param in transformer.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters change the output
            torch.nn.init.normal_(param, std=0.5)
    full = sd3.SD3Wrapper(copy.deepcopy(transformer), dedup_text_tokens=False)
    dedup = sd3.SD3Wrapper(transformer)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.5, 0.9])
    ehs, pooled = text_with_runs(seed=3), torch.randn(2, 24, generator=g)
    out_full, _ = text_tokens_seen(full, x, t, ehs, pooled)
    out_dedup, seen = text_tokens_seen(dedup, x, t, ehs, pooled)
    assert seen == 6
    torch.testing.assert_close(out_dedup, out_full, **TOL)
    out_full.square().mean().backward()
    out_dedup.square().mean().backward()
    lora_full = {n: p.grad for n, p in full.transformer.named_parameters() if "lora_" in n}
    lora_dedup = {n: p.grad for n, p in dedup.transformer.named_parameters() if "lora_" in n}
    assert lora_full and lora_full.keys() == lora_dedup.keys()
    for name, grad in lora_dedup.items():
        assert_grad_close(grad, lora_full[name], name)

    # save_pretrained writes weights and config only: a reload runs the stock processor.
    plain = SD3Transformer2DModel(**TINY)
    sd3.SD3Wrapper(plain)
    plain.save_pretrained(tmp_path / "student")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "student")
    assert {type(p) for p in reloaded.attn_processors.values()} == {JointAttnProcessor2_0}


@pytest.fixture(scope="module")
def digits_pipe():
    pipe = StableDiffusion3Pipeline.from_pretrained(TEACHER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_teacher_collapsed_equals_full_in_wrapper_and_stock_pipeline(digits_pipe):
    pipe = digits_pipe
    emb = sd3.encode_prompt(pipe, ["a handwritten digit 3", "a handwritten digit 8"])
    ehs, pooled = emb["prompt_embeds"], emb["pooled_prompt_embeds"]
    assert ehs.shape[1] == 16 + 256 and ehs[:, 16:].abs().max() == 0  # T5 gives zeros
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)  # 32x32 pixels
    t = torch.tensor([0.4, 0.95])
    full = sd3.SD3Wrapper(copy.deepcopy(pipe.transformer), dedup_text_tokens=False)
    with torch.no_grad():
        ref = full(x, t, ehs, pooled)
        out, seen = text_tokens_seen(sd3.SD3Wrapper(pipe.transformer), x, t, ehs, pooled)
    assert seen < 16 + 2  # every zero T5 token (and repeated CLIP padding) collapsed
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # The stock pipeline with collapsed prompt embeddings (as digits_eval.py report runs it).
    call = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    images = pipe(
        prompt_embeds=ehs,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=emb["negative_prompt_embeds"],
        negative_pooled_prompt_embeds=emb["negative_pooled_prompt_embeds"],
        generator=torch.Generator().manual_seed(5),
        **call,
    ).images
    kwargs = sd3.collapse_prompt_embeds(pipe, ehs, emb["negative_prompt_embeds"])
    assert kwargs["prompt_embeds"].shape[1] < 18
    collapsed = pipe(
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=emb["negative_pooled_prompt_embeds"],
        generator=torch.Generator().manual_seed(5),
        **kwargs,
        **call,
    ).images
    torch.testing.assert_close(collapsed, images, rtol=0, atol=1e-5)
