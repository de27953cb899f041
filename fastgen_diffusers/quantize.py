"""A quantized frozen base for the LoRA layouts: the teacher's weights stored in int8 (or fp8).

In the LoRA layouts the frozen weights dominate memory. :func:`quantize_base` stores the
``nn.Linear`` weights of the transformer's repeated blocks as torchao tensor subclasses
(``Int8WeightOnlyConfig``: int8 with one scale per output row; ``Float8WeightOnlyConfig`` on a
GPU with fp8 support); peft 0.21 then wraps them in ``TorchaoLoraLinear`` and trains the student
and fake-score adapters in full precision on top. Embedders, norms and the output projection
stay in the weights' dtype.

The quantized layers run through :class:`FrozenQuantizedLinear`: torchao's weight-only linear
multiplies by a full-precision copy of the weight, and autograd would keep that copy for the input
gradient (every block, in every forward with a graph: more memory than the unquantized base).
The layer instead dequantizes the weight again in its backward and keeps nothing but the int8
tensor.

Why torchao: peft 0.21 trains LoRA over its int8 weights (``peft/tuners/lora/torchao.py``), it
runs on the CPU (so the tests exercise the real layers), and it installs from PyPI without
pulling another torch. bitsandbytes' 8-bit / NF4 layers need CUDA, and peft refuses torchao's
4-bit weights (``TorchaoLoraLinear`` supports int8 only), so ``nf4`` is refused here.

Example::

    from fastgen_diffusers.quantize import check_quantize_base, quantize_base

    check_quantize_base("int8", layout="shared_lora")   # before anything loads
    quantize_base(transformer, "int8")                   # then add the adapters
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FrozenQuantizedLinear",
    "QUANTIZE_CHOICES",
    "QUANTIZED_LAYOUTS",
    "check_quantize_base",
    "quantizable_linears",
    "quantize_base",
    "quantize_linear",
    "stored_bytes",
]

QUANTIZE_CHOICES = ("none", "int8", "fp8", "nf4")
# Layouts whose frozen weights are not copied into a trained full-weight network.
QUANTIZED_LAYOUTS = ("separate_lora", "shared_lora")
# Block containers of the supported transformers (SD3, Flux, Wan, Qwen-Image).
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
_BLOCK_LISTS_SET = frozenset(_BLOCK_LISTS)


def _fp8_device_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def check_quantize_base(value: str, layout: str) -> None:
    """Refuse a ``--quantize_base`` value the layout, the installed libraries or the device
    cannot do, with a message naming it (call before loading anything)."""
    if value not in QUANTIZE_CHOICES:
        raise ValueError(
            f"--quantize_base {value!r}: expected one of {', '.join(QUANTIZE_CHOICES)}"
        )
    if value == "none":
        return
    if value == "nf4":
        raise ValueError(
            "--quantize_base nf4 is not available: peft 0.21 trains LoRA over torchao's int8 "
            "weights only (its TorchaoLoraLinear refuses 4-bit), and bitsandbytes' NF4 layers "
            "need CUDA and are not sharded by FSDP2; use --quantize_base int8"
        )
    if layout not in QUANTIZED_LAYOUTS:
        raise ValueError(
            f"--quantize_base {value} needs a LoRA layout over a frozen base "
            f"(--use_lora --lora_layout {' or '.join(QUANTIZED_LAYOUTS)}); layout {layout!r} "
            "trains full copies of the teacher's weights, which cannot be quantized"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(
            f"--quantize_base {value} needs torchao: pip install 'fastgen_diffusers[quant]'"
        )
    if value == "fp8" and not _fp8_device_ok():
        raise ValueError(
            "--quantize_base fp8 needs a CUDA GPU with fp8 support (compute capability >= 8.9, "
            "e.g. L4, L40S, H100); this machine has none: use --quantize_base int8"
        )


class _QuantizedLinearFunction(torch.autograd.Function):
    """``F.linear`` over a frozen quantized weight whose backward dequantizes again instead of
    keeping the dequantized copy alive between forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        # The weight is frozen and never modified in place: a plain reference is enough.
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight = ctx.weight.dequantize().to(grad.dtype)
        return grad.matmul(weight), None, None


class FrozenQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a frozen torchao quantized tensor: the same output as
    ``F.linear``, with only the quantized weight (not a full-precision copy) held for backward.
    :func:`quantize_base` gives the quantized layers this class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return _QuantizedLinearFunction.apply(x, self.weight, self.bias)


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers inside the transformer's repeated blocks (what
    :func:`quantize_base` stores quantized), with their names."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _BLOCK_LISTS_SET & set(name.split(".")):
            yield name, module


def _torchao_config(method: str) -> Any:
    if method not in ("int8", "fp8"):
        raise ValueError(f"quantize_base: method {method!r}; expected 'none', 'int8' or 'fp8'")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if method == "int8" else Float8WeightOnlyConfig()


def quantize_linear(linear: nn.Linear, method: str) -> None:
    """Store one frozen ``nn.Linear``'s weight as ``method`` (in place, on its device) and give
    it the :class:`FrozenQuantizedLinear` forward."""
    from torchao.quantization import quantize_

    config = _torchao_config(method)
    with torch.no_grad():  # the weights are frozen: no autograd history through the conversion
        quantize_(linear, config)
    linear.__class__ = FrozenQuantizedLinear


def quantize_base(model: nn.Module, method: str) -> int:
    """Store the block linears of ``model`` (in place) as ``method`` (``"int8"``, ``"fp8"``;
    ``"none"`` does nothing). Call before the LoRA adapters are added; layers already
    quantized (:func:`~fastgen_diffusers.quantized_loading.load_quantized_transformer`) are
    kept. Returns how many layers are quantized."""
    if method == "none":
        return 0
    _torchao_config(method)  # refuses an unknown method before anything changes
    layers = [m for _, m in quantizable_linears(model)]
    for module in layers:
        if not isinstance(module, FrozenQuantizedLinear):
            quantize_linear(module, method)
    return len(layers)


def stored_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers of ``model`` occupy (quantized weights counted by their
    inner tensors: data and scales)."""

    def nbytes(t: torch.Tensor) -> int:
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
            names, _ = flatten()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t.data if isinstance(t, nn.Parameter) else t)
    return total
