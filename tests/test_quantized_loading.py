"""Loading a transformer straight into its quantized base (``--quantize_base`` at load time):
the same model as ``from_pretrained`` + ``quantize_base``, without a full-precision copy."""

from __future__ import annotations

import ctypes
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel
from tiny_pipelines import save_tiny_flux, save_tiny_sd3, save_tiny_wan

from fastgen_diffusers import quantized_loading
from fastgen_diffusers.quantize import (
    FrozenQuantizedLinear,
    quantizable_linears,
    quantize_base,
    quantize_linear,
)
from fastgen_diffusers.quantized_loading import load_quantized_transformer, safetensors_files

FAMILIES = {
    "sd3": (SD3Transformer2DModel, save_tiny_sd3),
    "flux": (FluxTransformer2DModel, save_tiny_flux),
    "wan": (WanTransformer3DModel, save_tiny_wan),
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in model.state_dict().items():
        inner = value.dequantize() if hasattr(value, "dequantize") else value
        out[name] = inner
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_from_pretrained_then_quantize(tmp_path, family, dtype):
    cls, save = FAMILIES[family]
    root = save(tmp_path / family)
    reference = cls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype).eval()
    quantize_base(reference, "int8")
    loaded = load_quantized_transformer(cls, root, torch_dtype=dtype, method="int8")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(isinstance(m, FrozenQuantizedLinear) for _, m in quantizable_linears(loaded))
    a, b = _state(reference), _state(loaded)
    assert a.keys() == b.keys()
    for name in a:  # the same bytes: int8 data and scales computed from the same weights
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    buffers = dict(reference.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name


def test_sharded_checkpoint_and_mismatch(tmp_path):
    root = save_tiny_sd3(tmp_path / "sd3")
    model = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded / "transformer", max_shard_size="20KB")
    files = safetensors_files(sharded / "transformer")
    assert files is not None and len(files) > 1
    loaded = load_quantized_transformer(SD3Transformer2DModel, sharded, method="int8")
    reference = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer")
    quantize_base(reference, "int8")
    a, b = _state(reference), _state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A config that does not match the weights: a message naming the tensors, nothing loaded.
    config = json.loads((sharded / "transformer" / "config.json").read_text())
    config["num_layers"] += 1
    (sharded / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match SD3Transformer2DModel.*missing"):
        load_quantized_transformer(SD3Transformer2DModel, sharded, method="int8")
    # A .bin checkpoint: the caller loads it the usual way.
    binary = tmp_path / "binary"
    model.save_pretrained(binary / "transformer", safe_serialization=False)
    assert load_quantized_transformer(SD3Transformer2DModel, binary, method="int8") is None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _live_bytes() -> int:
    """Bytes malloc has handed out and not taken back (torch's CPU tensors included)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_never_holds_the_full_precision_model(tmp_path, monkeypatch):
    # Blocks dominate this model (as in every real transformer): 4 blocks of ~0.8M parameters.
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
        caption_projection_dim=256, pooled_projection_dim=32, pos_embed_max_size=8,
    )  # fmt: skip
    model = SD3Transformer2DModel.from_config(config)
    model.save_pretrained(tmp_path / "m" / "transformer")
    full = sum(p.numel() * 4 for p in model.parameters())
    layer = max(m.weight.numel() * 4 for _, m in quantizable_linears(model))
    del model
    peak = 0
    before = _live_bytes()

    def watched(linear: torch.nn.Linear, method: str) -> None:
        nonlocal peak
        peak = max(peak, _live_bytes() - before)
        quantize_linear(linear, method)
        peak = max(peak, _live_bytes() - before)

    monkeypatch.setattr(quantized_loading, "quantize_linear", watched)
    loaded = load_quantized_transformer(SD3Transformer2DModel, tmp_path / "m", method="int8")
    assert loaded is not None and peak > 0
    # While the blocks load: the int8 layers so far plus about one layer in fp32, where
    # from_pretrained + quantize_base holds the whole fp32 model (1.0 x full) first.
    assert peak < 0.4 * full + 2 * layer < 0.7 * full, (peak, full, layer)


def test_training_loads_the_base_quantized_and_trains_as_before(tmp_path, monkeypatch):
    from diffusers.models.modeling_utils import ModelMixin
    from test_train_dmd2 import SD3_RECIPE, args_for, losses, write_prompts, write_recipe

    from fastgen_diffusers.training import setup, train

    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", SD3_RECIPE)
    data = write_prompts(tmp_path / "prompts.jsonl")
    flags = ("--use_lora", "--rank", "4", "--quantize_base", "int8", "--max_train_steps", "2")
    loaded = []
    original = ModelMixin.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(spy))
    train(args_for(model, recipe, data, tmp_path / "layerwise", *flags))
    assert "SD3Transformer2DModel" not in loaded and "AutoencoderKL" in loaded
    # The same run through from_pretrained + quantize_base.
    monkeypatch.setattr(setup, "load_quantized_transformers", lambda run, family: {})
    train(args_for(model, recipe, data, tmp_path / "whole", *flags))
    assert "SD3Transformer2DModel" in loaded
    a, b = losses(tmp_path / "layerwise"), losses(tmp_path / "whole")
    assert a.keys() == b.keys() == {1, 2}
    # The weights are equal bit for bit (above); from_pretrained's tensors are views into the
    # memory-mapped file at unaligned offsets, which changes the fp32 summation order of some
    # kernels: agreement to float32 rounding, not bits.
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert value == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_hub_id_with_a_sharded_variant_from_the_cache(tmp_path, monkeypatch):
    # A Hub id resolves through huggingface_hub's snapshot_download (offline here: the files are
    # already in the cache, laid out as the Hub client stores them).
    import huggingface_hub.constants

    root = save_tiny_sd3(tmp_path / "sd3")
    model = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer")
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--org--tiny-sd3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "transformer"
    model.save_pretrained(snapshot, variant="fp16", max_shard_size="20KB")
    assert len(safetensors_files(snapshot, "fp16")) > 1 and safetensors_files(snapshot) is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_quantized_transformer(
        SD3Transformer2DModel,
        "org/tiny-sd3",
        variant="fp16",
        cache_dir=str(tmp_path / "cache"),
        method="int8",
    )
    quantize_base(model, "int8")
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
