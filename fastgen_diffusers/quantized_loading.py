"""Load a transformer straight into a quantized frozen base, one layer at a time.

``from_pretrained`` followed by :func:`~fastgen_diffusers.quantize.quantize_base` holds the whole
transformer in full precision first: 24 GB of bf16 for FLUX.1-dev, on a 24 GB GPU whose quantized
base needs 12. :func:`load_quantized_transformer` builds the model on the meta device and reads
the checkpoint's safetensors files tensor by tensor (plain reads, no memory map, so the host's
resident memory follows what is live); each block linear goes to the device and is quantized
there before the next is read. Peak: the quantized base plus one layer in full precision, on the
device and on the host.

The result equals ``cls.from_pretrained(path, subfolder=..., torch_dtype=...)`` followed by
``quantize_base`` (same dtypes, the model's ``_keep_in_fp32_modules`` in fp32, ``eval()`` mode).

Example::

    from diffusers import FluxTransformer2DModel
    from fastgen_diffusers.quantized_loading import load_quantized_transformer

    transformer = load_quantized_transformer(
        FluxTransformer2DModel, "black-forest-labs/FLUX.1-dev", subfolder="transformer",
        torch_dtype=torch.bfloat16, method="int8", device="cuda",
    )
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quantize import quantizable_linears, quantize_linear

__all__ = ["empty_transformer", "load_quantized_transformer", "safetensors_files"]

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _variant(name: str, variant: str | None) -> str:
    # diffusers' naming: diffusion_pytorch_model.fp16.safetensors, ...safetensors.index.fp16.json
    if variant is None:
        return name
    head, tail = name.rsplit(".", 1)
    return f"{head}.{variant}.{tail}"


def safetensors_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path] | None:
    """The safetensors files of a diffusers model folder (sharded: from its index), or
    ``None`` when the folder holds none (a ``.bin`` checkpoint)."""
    folder = Path(folder)
    index = folder / _variant(_INDEX, variant)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / _variant(_WEIGHTS, variant)
    return [single] if single.is_file() else None


def _model_folder(
    path: str | os.PathLike,
    subfolder: str,
    *,
    revision: str | None,
    variant: str | None,
    cache_dir: str | None,
) -> Path:
    """The local folder of ``path``'s ``subfolder``: the directory itself, else the Hub
    snapshot of only that subfolder's config and weights."""
    local = Path(os.path.expanduser(str(path)))
    if local.is_dir():
        return local / subfolder
    from huggingface_hub import snapshot_download

    # Only the files from_pretrained would read: one file, or the shards of the index
    # (diffusion_pytorch_model[.fp16]-00001-of-00003.safetensors).
    stem = f"{subfolder}/diffusion_pytorch_model{'.' + variant if variant else ''}"
    patterns = [f"{subfolder}/config.json", f"{subfolder}/{_variant(_INDEX, variant)}"]
    patterns += [f"{stem}.safetensors", f"{stem}-*.safetensors"]
    root = snapshot_download(
        str(path), revision=revision, cache_dir=cache_dir, allow_patterns=patterns
    )
    return Path(root) / subfolder


def _read_header(handle: Any) -> tuple[dict[str, Any], int]:
    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_tensor(handle: Any, entry: dict[str, Any], base: int) -> torch.Tensor:
    start, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    if end > start:
        handle.seek(base + start)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if handle.readinto(buffer) != end - start:
            raise ValueError(f"{handle.name}: truncated tensor data")
    return tensor


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def empty_transformer(cls: type, config: Any) -> nn.Module:
    """``cls.from_config(config)`` with its parameters on the meta device (no memory, no
    weights) and its buffers computed (rotary tables: no checkpoint carries them)."""
    from accelerate import init_empty_weights

    # Some parameters are drawn on the CPU before init_empty_weights moves them to the meta
    # device (Wan's scale_shift_table: torch.randn): keep the caller's random stream where an
    # ordinary load leaves it (the LoRA initialisation draws from it later).
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def load_quantized_transformer(
    cls: type,
    path: str | os.PathLike,
    *,
    subfolder: str = "transformer",
    torch_dtype: torch.dtype = torch.float32,
    method: str = "int8",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
) -> nn.Module | None:
    """``cls`` (a diffusers transformer class) from ``path`` (a local pipeline folder or a Hub
    id) with its block linears stored as ``method`` (see
    :func:`~fastgen_diffusers.quantize.quantize_base`), loaded one layer at a time onto
    ``device``. ``None`` when the checkpoint has no safetensors weights (load it the usual way
    and quantize after). A checkpoint that does not match the model's config raises
    ``ValueError`` naming the tensors."""
    folder = _model_folder(path, subfolder, revision=revision, variant=variant, cache_dir=cache_dir)
    files = safetensors_files(folder, variant)
    if files is None:
        return None
    model = empty_transformer(cls, cls.load_config(folder))
    keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or [])
    device = torch.device(device)

    def target(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            dtype = torch.float32 if keep_fp32 & set(name.split(".")) else torch_dtype
            tensor = tensor.to(dtype)
        return tensor.to(device)

    where: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for file in files:
        with open(file, "rb") as handle:
            header, base = _read_header(handle)
        for name, entry in header.items():
            where[name] = (file, entry, base)
    expected = {n for n, _ in model.named_parameters()} | {
        n for n, b in model.named_buffers() if b.is_meta
    }
    missing = sorted(expected - where.keys())
    unexpected = sorted(where.keys() - {n for n, _ in model.state_dict().items()})
    if missing or unexpected:
        raise ValueError(
            f"{folder}: the checkpoint does not match {cls.__name__}'s config "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    handles: dict[Path, Any] = {}
    try:

        def read(name: str) -> torch.Tensor:
            file, entry, base = where[name]
            if file not in handles:
                handles[file] = open(file, "rb")  # noqa: SIM115 - closed below
            return _read_tensor(handles[file], entry, base)

        done: set[str] = set()
        # Block linears first, each quantized as soon as it is on the device.
        for module_name, linear in quantizable_linears(model):
            for attr, _ in list(linear.named_parameters(recurse=False)):
                name = f"{module_name}.{attr}"
                _set_tensor(model, name, target(name, read(name)))
                done.add(name)
            quantize_linear(linear, method)
        for name in where.keys() - done:
            _set_tensor(model, name, target(name, read(name)))
    finally:
        for handle in handles.values():
            handle.close()
    for module in model.modules():  # buffers no checkpoint carries (rotary tables)
        for attr, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if buffer.is_floating_point() and not keep_fp32:  # as from_pretrained casts
                buffer = buffer.to(torch_dtype)
            module._buffers[attr] = buffer.to(device)
    model.register_to_config(_name_or_path=str(path))
    model.requires_grad_(False)
    return model.eval()
