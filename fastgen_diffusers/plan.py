"""Will it fit? Per-GPU memory of a DMD2 run, planned before anything loads.

    python -m fastgen_diffusers.plan --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --recipe general/distillation/dmd2_flux1_dev --use_lora --lora_layout shared_lora \\
        --resolution 1024 --mixed_precision bf16 --gradient_checkpointing --gpu_memory 24GB

The transformer is built on the meta device from its ``transformer/config.json`` alone (a Hub id
fetches only config files; the teachers of the built-in recipes ship in ``plan_configs/``), so
no weight is read and no memory is used. Weights, gradients, optimizer states, EMA and the
discriminator are counted from the parameters. Activations are measured, not guessed: the real
diffusers model runs forward and backward on the meta device at the run's real shapes, and a
``TorchDispatchMode`` tallies every tensor the ops allocate and when it is freed (storages
deduplicated, the weights and parameter gradients excluded), giving the bytes saved for
backward and the peak during forward + backward, with and without gradient checkpointing.

Attention is modelled as flash / memory-efficient attention (what the GPU kernels and torch's
CPU flash kernel do): it saves its output and a float32 log-sum-exp per query, never the
``tokens x tokens`` score matrix.

The heaviest step is the student step with GAN and CFG (``DMDPipeline.compute_student_loss``):
the student's forward keeps its graph, the teacher's conditional forward keeps its graph for
the GAN features, the unconditional teacher and fake-score forwards run without grad while
both graphs are alive, then one backward runs through the teacher and the student::

    act = max(S_student + S_teacher + max(N, P_teacher - S_teacher), P_student)

with ``S`` the bytes saved by a forward, ``P`` the peak of its forward + backward and ``N`` the
peak of a forward without grad. Under FSDP2 (``--num_gpus N > 1``) frozen and trained weights,
gradients and optimizer states are divided by N, and two unsharded blocks (the one computing
and the prefetched one) are added. The fit check adds 1 GiB for the CUDA context and
communication buffers and 5% for allocator fragmentation.

A pipeline whose ``model_index.json`` names a ``transformer_2`` of the same config (Wan 2.2
A14B) trains every network per expert: weights, gradients (a batch may hold rows of both),
optimizer states, EMA and discriminator are counted twice. Activations are one expert's on one
GPU (each row runs through one expert); under FSDP2 every rank runs both experts, one row more.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "MemoryPlan",
    "PlanSettings",
    "format_plan",
    "load_experts",
    "load_transformer_config",
    "main",
    "measure_activations",
    "parse_memory",
    "plan_memory",
    "preflight",
]

GiB = 2**30
CONFIG_DIR = Path(__file__).parent / "plan_configs"
RUNTIME_OVERHEAD = 1 * GiB  # CUDA context, NCCL buffers
FRAGMENTATION = 0.05
_DTYPES = {"no": torch.float32, None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_memory(text: str) -> int:
    """``"24GB"`` / ``"24G"`` / ``"24GiB"`` / ``"24"`` -> bytes (GB read as GiB, as GPUs are
    sold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu_memory {text!r}: expected a size such as 24GB or 80")
    return int(float(match.group(1)) * GiB)


# -- the transformer's config ---------------------------------------------------------------


def _shipped_config(name: str) -> Path | None:
    path = CONFIG_DIR / f"{name.replace('/', '--')}.json"
    return path if path.is_file() else None


def load_transformer_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The transformer's ``config.json``: from a local pipeline folder (``transformer/``) or
    transformer folder, a shipped copy for the built-in recipes' teachers, or the Hub (that
    one file, through ``hf_hub_download``)."""
    local = Path(name_or_path)
    if local.is_dir():
        for candidate in (local / "transformer" / "config.json", local / "config.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise ValueError(
            f"{name_or_path!r} has neither transformer/config.json nor config.json: expected a "
            "diffusers pipeline or transformer folder"
        )
    shipped = _shipped_config(name_or_path)
    if shipped is not None and revision is None:
        return json.loads(shipped.read_text())
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(name_or_path, "transformer/config.json", revision=revision)
    return json.loads(Path(path).read_text())


def _has_second_expert(model_index: dict[str, Any]) -> bool:
    component = model_index.get("transformer_2")
    return isinstance(component, list) and any(part is not None for part in component)


def load_experts(name_or_path: str, revision: str | None = None) -> int:
    """How many transformers of the same config the pipeline runs: 2 when its
    ``model_index.json`` names a ``transformer_2`` (Wan 2.2 A14B's low-noise expert), else 1. Read
    from a local pipeline folder, a shipped copy (``plan_configs/<id>.model_index.json``) or the
    Hub (that one file); a transformer folder, or a Hub repo without the file, is one expert."""
    local = Path(name_or_path)
    if local.is_dir():
        index = local / "model_index.json"
        return 2 if index.is_file() and _has_second_expert(json.loads(index.read_text())) else 1
    shipped = _shipped_config(name_or_path)
    if shipped is not None and revision is None:
        index = shipped.with_name(shipped.stem + ".model_index.json")
        return 2 if index.is_file() and _has_second_expert(json.loads(index.read_text())) else 1
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(name_or_path, "model_index.json", revision=revision)
    except EntryNotFoundError:
        return 1
    return 2 if _has_second_expert(json.loads(Path(path).read_text())) else 1


def build_meta_transformer(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The diffusers transformer of ``config`` on the meta device (no memory, no weights)."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"transformer _class_name {name!r} is not a diffusers model class")
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to(device="meta", dtype=dtype).requires_grad_(False)


def _family_kind(model: nn.Module) -> str:
    name = type(model).__name__
    for kind in ("SD3", "Flux", "Wan", "QwenImage"):
        if name.startswith(kind):
            return kind
    raise ValueError(f"No memory plan for {name}: expected an SD3, Flux, Wan or Qwen-Image model")


def default_text_length(model: nn.Module) -> int:
    """Prompt tokens the family's pipeline passes (SD3: 77 CLIP + 256 T5)."""
    return {"SD3": 333, "Flux": 512, "Wan": 512, "QwenImage": 512}[_family_kind(model)]


def model_inputs(
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    num_frames: int | None,
    text_length: int,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Meta-device inputs of the raw transformer at the run's shapes (the family's latent
    layout: VAE factor 8, Wan 2.2 TI2V-5B's 48-channel VAE 16, 4x temporal for Wan)."""
    cfg = model.config
    kind = _family_kind(model)

    def meta(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dt)

    t = meta(batch, dt=torch.float32)
    if kind == "SD3":
        return {
            "hidden_states": meta(batch, cfg.in_channels, height // 8, width // 8),
            "encoder_hidden_states": meta(batch, text_length, cfg.joint_attention_dim),
            "pooled_projections": meta(batch, cfg.pooled_projection_dim),
            "timestep": t,
        }
    if kind == "Flux":
        h, w = height // 16, width // 16
        kwargs: dict[str, Any] = {
            "hidden_states": meta(batch, h * w, cfg.in_channels),
            "encoder_hidden_states": meta(batch, text_length, cfg.joint_attention_dim),
            "pooled_projections": meta(batch, cfg.pooled_projection_dim),
            "timestep": t,
            "img_ids": meta(h * w, 3, dt=torch.float32),
            "txt_ids": meta(text_length, 3, dt=torch.float32),
        }
        if cfg.guidance_embeds:
            kwargs["guidance"] = t
        return kwargs
    if kind == "Wan":
        spatial = 16 if cfg.in_channels == 48 else 8  # Wan 2.2 TI2V-5B's VAE
        frames = (num_frames or 81) - 1
        shape = (batch, cfg.in_channels, frames // 4 + 1, height // spatial, width // spatial)
        hidden = meta(*shape)
        timestep: torch.Tensor = t
        if cfg.in_channels == 48:  # TI2V-5B: one timestep per token (expand_timesteps)
            tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
            timestep = meta(batch, tokens, dt=torch.float32)
        return {
            "hidden_states": hidden,
            "timestep": timestep,
            "encoder_hidden_states": meta(batch, text_length, cfg.text_dim),
        }
    h, w = height // 16, width // 16
    return {
        "hidden_states": meta(batch, h * w, cfg.in_channels),
        "encoder_hidden_states": meta(batch, text_length, cfg.joint_attention_dim),
        "encoder_hidden_states_mask": meta(batch, text_length, dt=torch.int64),
        "timestep": t,
        "img_shapes": [[(1, h, w)]] * batch,
    }


# -- measuring activations on the meta device -----------------------------------------------


class _FlashAttention(torch.autograd.Function):
    """Flash / memory-efficient attention's memory: output and a float32 log-sum-exp saved."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _attention_as_flash() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` replaced by :class:`_FlashAttention` (meta tensors
    only) for the duration: the recomputation of gradient checkpointing runs inside the
    backward, where a function mode would not reach it."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def flash(*args: Any, **kw: Any) -> Any:
        q, k, v = (list(args) + [kw.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
        return _FlashAttention.apply(q, k, v)

    functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


class _MemoryTally(TorchDispatchMode):
    """Bytes of the tensors ops allocate, live and peak: each storage counted once, released
    when the last tensor seen on it is freed (autograd's saved tensors keep theirs alive)."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.ignore:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def reset_peak(self) -> None:
        self.peak = self.current


@dataclass(frozen=True)
class Activations:
    """Bytes measured for one forward (+ backward) of one network."""

    saved: int  # alive after the forward with grad: what the backward needs
    peak_train: int  # peak during forward + backward
    peak_no_grad: int  # peak during a forward without grad


def _storage_keys(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}


def measure_activations(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    gradient_checkpointing: bool = False,
) -> Activations:
    """Run ``model`` (on the meta device, with whichever parameters require grad) forward and
    backward on ``inputs`` and tally the activation bytes. Parameter gradients are dropped as
    they arrive (they are counted with the weights, not here). When no parameter requires grad
    the input latents do (the teacher's GAN pass: the gradient reaches the student through its
    input)."""
    params = [p for p in model.parameters() if p.requires_grad]
    handles = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
    inputs = dict(inputs)
    if not params:
        inputs["hidden_states"] = inputs["hidden_states"].detach().requires_grad_(True)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    ignore = _storage_keys(model) | {
        t.untyped_storage()._cdata for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)
    }
    try:
        with _attention_as_flash():
            with torch.no_grad(), _MemoryTally(ignore) as tally:
                _forward(model, inputs)
            peak_no_grad = tally.peak
            with _MemoryTally(ignore) as tally:
                out = _forward(model, inputs)
                saved = tally.current
                loss = out.float().square().mean()
                loss.backward()
                del out, loss
            peak_train = tally.peak
    finally:
        for h in handles:
            h.remove()
        if gradient_checkpointing:
            _disable_checkpointing(model)
    return Activations(saved=saved, peak_train=peak_train, peak_no_grad=peak_no_grad)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs, return_dict=False)
    return out[0] if isinstance(out, tuple) else out


def _enable_checkpointing(model: nn.Module) -> None:
    from .lora import _tuner_layers, enable_gradient_checkpointing

    if _tuner_layers(model):
        enable_gradient_checkpointing(model)
    else:
        model.enable_gradient_checkpointing()


def _disable_checkpointing(model: nn.Module) -> None:
    model.disable_gradient_checkpointing()


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """What decides the memory of a run (the training flags of the same names)."""

    layout: str = "full"
    rank: int = 16
    num_gpus: int = 1
    height: int = 1024
    width: int = 1024
    num_frames: int | None = None
    train_batch_size: int = 1
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    quantize_base: str = "none"
    optimizer: str = "adamw"
    text_length: int | None = None
    gan: bool = True
    cfg: bool = True
    ema: bool = True
    target_modules: tuple[str, ...] | None = None


@dataclass
class MemoryPlan:
    """Bytes per GPU of the heaviest step, by category."""

    settings: PlanSettings
    model_class: str
    num_params: int
    lines: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    step: str = "student"
    notes: list[str] = field(default_factory=list)
    experts: int = 1

    def fits(self, gpu_memory: int) -> bool:
        return self.peak * (1 + FRAGMENTATION) + RUNTIME_OVERHEAD <= gpu_memory


class _Planner:
    """Plans for one transformer config; activation measurements cached across settings."""

    def __init__(self, config: dict[str, Any], experts: int = 1) -> None:
        if experts not in (1, 2):
            raise ValueError(f"experts={experts}: expected 1, or 2 (Wan 2.2 A14B)")
        self.config = config
        self.experts = experts
        self._models: dict[Any, nn.Module] = {}
        self._acts: dict[Any, Activations] = {}

    def _model(self, dtype: torch.dtype, lora_rank: int | None, targets: Any) -> nn.Module:
        key = (dtype, lora_rank, targets)
        if key not in self._models:
            model = build_meta_transformer(self.config, dtype)
            if lora_rank is not None:
                from .lora import LoraSettings, add_adapters

                settings = LoraSettings(
                    rank=lora_rank, target_modules=list(targets) if targets else None
                )
                add_adapters(model, settings, ["student"])
            self._models[key] = model
        return self._models[key]

    def activations(self, s: PlanSettings, role: str) -> Activations:
        """``role``: ``"lora"`` / ``"full"`` (a trained network) or ``"frozen"``."""
        dtype = _DTYPES[s.mixed_precision]
        gc = s.gradient_checkpointing and (role != "frozen" or s.layout == "shared_lora")
        key = (role, gc, s.rank if role == "lora" else None, s.height, s.width, s.num_frames)
        key += (s.train_batch_size, s.text_length, dtype, s.target_modules)
        if key not in self._acts:
            lora_rank = s.rank if role == "lora" else None
            model = self._model(dtype, lora_rank, s.target_modules)
            for name, p in model.named_parameters():
                p.requires_grad_(role == "full" or (role == "lora" and "lora_" in name))
            text = s.text_length or default_text_length(model)
            inputs = model_inputs(
                model, s.train_batch_size, s.height, s.width, s.num_frames, text, dtype
            )
            from .lora import use_adapter

            with use_adapter(model, "student" if role == "lora" else None):
                self._acts[key] = measure_activations(model, inputs, gradient_checkpointing=gc)
            model.requires_grad_(False)
        return self._acts[key]

    def plan(self, s: PlanSettings) -> MemoryPlan:
        from .quantize import quantizable_linears

        dtype = _DTYPES[s.mixed_precision]
        base = self._model(dtype, None, None)
        weight_size = torch.empty((), dtype=dtype).element_size()
        n = sum(p.numel() for p in base.parameters())
        frozen_copy = n * weight_size
        quantized = 0
        if s.quantize_base != "none":
            quantized = sum(m.weight.numel() for _, m in quantizable_linears(base))
            rows = sum(m.out_features for _, m in quantizable_linears(base))
            frozen_copy -= quantized * (weight_size - 1) - rows * weight_size
        lora_model = self._model(dtype, s.rank, s.target_modules) if s.layout != "full" else None
        adapter = 0
        if lora_model is not None:
            adapter = sum(p.numel() for name, p in lora_model.named_parameters() if "lora_" in name)
        # Two experts (Wan 2.2 A14B): every network is a pair of transformers of this config
        # (two teachers, two students, two fakes, adapters per expert), each with its own
        # weights, gradients, optimizer state, EMA and discriminator heads.
        experts = self.experts
        copies = {"full": 1, "student_lora": 2, "separate_lora": 3, "shared_lora": 1}[s.layout]
        student_params = n if s.layout == "full" else adapter
        fake_params = n if s.layout in ("full", "student_lora") else adapter
        trained = student_params + fake_params
        full_copy_quantized = s.layout in ("full", "student_lora")
        frozen = frozen_copy * copies if not full_copy_quantized else n * weight_size * copies
        disc_params = self._discriminator_params() if s.gan else 0
        shard = max(s.num_gpus, 1)
        lines: dict[str, int] = {}
        lines["frozen weights"] = math.ceil(experts * frozen / shard)
        lines["trained weights (fp32)"] = math.ceil(experts * trained * 4 / shard)
        lines["gradients (student step)"] = math.ceil(experts * student_params * 4 / shard)
        lines["optimizer state"] = math.ceil(
            experts * _optimizer_bytes(s.optimizer, student_params + fake_params) / shard
        )
        lines["EMA (fp32, full on every GPU)"] = experts * student_params * 4 if s.ema else 0
        lines["discriminator (+grads, optimizer)"] = experts * (
            disc_params * 8 + _optimizer_bytes(s.optimizer, disc_params)
        )
        if shard > 1:
            lines["FSDP2 unsharded blocks (2)"] = 2 * self._largest_block(base) * weight_size
        if s.quantize_base != "none" and not full_copy_quantized:
            # A quantized layer dequantizes its weight for each matmul (forward, and again in
            # backward: FrozenQuantizedLinear keeps no copy for the input gradient), so one
            # layer's full-precision weight is alive at a time.
            largest = max((m.weight.numel() for _, m in quantizable_linears(base)), default=0)
            lines["dequantized weight (one layer)"] = largest * weight_size
        student_role = "full" if s.layout == "full" else "lora"
        shapes = s
        if experts > 1 and shard > 1:
            # On several ranks every rank runs both experts, one extra row through the expert it
            # has no sample for (WanExperts), both graphs alive: the batch's activations plus
            # one row's. On one GPU each row goes through one expert: the one-expert figure.
            shapes = dataclasses.replace(s, train_batch_size=s.train_batch_size + 1)
        act_s = self.activations(shapes, student_role)
        act_t = self.activations(shapes, "frozen")
        if s.gan:
            extra = max(act_t.peak_no_grad, act_t.peak_train - act_t.saved)
            student_step = max(act_s.saved + act_t.saved + extra, act_s.peak_train)
        else:
            student_step = max(act_s.saved + act_t.peak_no_grad, act_s.peak_train)
        fake_role = "full" if s.layout in ("full", "student_lora") else "lora"
        act_f = self.activations(shapes, fake_role)
        fake_step = max(act_f.peak_train, act_t.peak_no_grad)
        fake_grads = math.ceil(experts * fake_params * 4 / shard)
        plan = MemoryPlan(s, type(base).__name__, n * experts, experts=experts)
        if fake_step + fake_grads > student_step + lines["gradients (student step)"]:
            plan.step = "fake score"
            lines["gradients (student step)"] = fake_grads
            lines = {k.replace("student step", "fake-score step"): v for k, v in lines.items()}
            lines["activations (fake-score step)"] = fake_step
        else:
            lines["activations (student step: GAN + CFG)" if s.gan else "activations"] = (
                student_step
            )
        plan.lines = lines
        plan.peak = sum(lines.values())
        if experts > 1:
            plan.notes.append(
                f"{experts} experts (transformer, transformer_2): every network counted per expert"
            )
        if s.quantize_base != "none" and full_copy_quantized:
            plan.notes.append(f"layout {s.layout} trains full copies: nothing quantized")
        return plan

    def _discriminator_params(self) -> int:
        # One small head per captured block: channels = the transformer's inner dim.
        base = self._model(torch.float32, None, None)
        try:
            from .plugins.registry import family_for_transformer

            family = family_for_transformer(type(base))
            module = sys.modules[family.__module__]
            disc = module.build_discriminator(base)
            return sum(p.numel() for p in disc.parameters())
        except Exception:  # a family without a discriminator builder: count it as nothing
            return 0

    @staticmethod
    def _largest_block(model: nn.Module) -> int:
        """Parameters of the largest repeated block."""
        sizes = [
            sum(p.numel() for p in block.parameters())
            for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
            for block in getattr(model, name, [])
        ]
        return max(sizes, default=0)


def _optimizer_bytes(optimizer: str, params: int) -> int:
    if optimizer == "adamw8bit":
        return params * 2 + math.ceil(params / 256) * 2 * 4  # 8-bit moments + fp32 block scales
    return params * 8


def plan_memory(
    config: dict[str, Any],
    settings: PlanSettings,
    planner: _Planner | None = None,
    experts: int = 1,
) -> MemoryPlan:
    """The per-GPU memory of a run of ``settings`` on the transformer of ``config`` (``experts``:
    2 for a pipeline with ``transformer_2`` of the same config, Wan 2.2 A14B)."""
    return (planner or _Planner(config, experts)).plan(settings)


_CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("--gradient_checkpointing", {"gradient_checkpointing": True}),
    ("--optimizer adamw8bit", {"optimizer": "adamw8bit"}),
    ("--use_lora --lora_layout shared_lora", {"layout": "shared_lora"}),
    ("--quantize_base int8", {"quantize_base": "int8"}),
    ("--rank 8", {"rank": 8}),
    ("2 GPUs (FSDP2)", {"num_gpus": 2}),
    ("4 GPUs (FSDP2)", {"num_gpus": 4}),
    ("8 GPUs (FSDP2)", {"num_gpus": 8}),
    ("--train_batch_size 1", {"train_batch_size": 1}),
]


def cheapest_fit(
    planner: _Planner, settings: PlanSettings, gpu_memory: int
) -> tuple[str, MemoryPlan] | None:
    """The fewest changes (in the order of :data:`_CHANGES`: cheaper first) that make the run
    fit ``gpu_memory``, or ``None``."""
    useful = []
    for label, change in _CHANGES:
        if all(getattr(settings, k) == v for k, v in change.items()):
            continue
        if "rank" in change and (settings.layout == "full" or settings.rank <= 8):
            continue
        if change.get("num_gpus", 10**6) <= settings.num_gpus:
            continue
        useful.append((label, change))
    for size in range(1, 5):
        for combo in itertools.combinations(useful, size):
            if sum("num_gpus" in c for _, c in combo) > 1:
                continue
            merged: dict[str, Any] = {}
            for _, change in combo:
                merged.update(change)
            if merged.get("quantize_base", "none") != "none":
                if merged.get("layout", settings.layout) not in ("separate_lora", "shared_lora"):
                    continue
            candidate = dataclasses.replace(settings, **merged)
            result = planner.plan(candidate)
            if result.fits(gpu_memory):
                return " + ".join(label for label, _ in combo), result
    return None


def format_plan(plan: MemoryPlan, gpu_memory: int | None = None, fix: Any = None) -> str:
    s = plan.settings
    size = f"{s.height}x{s.width}" + (f"x{s.num_frames}f" if s.num_frames else "")
    experts = f"{plan.experts} experts, " if plan.experts > 1 else ""
    head = (
        f"{plan.model_class} ({experts}{plan.num_params / 1e9:.2f}B parameters), "
        f"layout {s.layout}"
        + (f" rank {s.rank}" if s.layout != "full" else "")
        + f", {s.num_gpus} GPU(s), {size}, batch {s.train_batch_size}/GPU, "
        f"{s.mixed_precision or 'fp32'}, "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
        f"base {s.quantize_base}, {s.optimizer}"
    )
    out = [head, f"per GPU, heaviest step ({plan.step} step):"]
    for name, value in plan.lines.items():
        out.append(f"  {name:<42} {value / GiB:8.2f} GiB")
    out.append(f"  {'peak':<42} {plan.peak / GiB:8.2f} GiB")
    out.extend(f"  note: {note}" for note in plan.notes)
    if gpu_memory is not None:
        need = plan.peak * (1 + FRAGMENTATION) + RUNTIME_OVERHEAD
        verdict = "fits" if plan.fits(gpu_memory) else "does NOT fit"
        out.append(
            f"{verdict} in {gpu_memory / GiB:.0f} GiB (needs {need / GiB:.1f} GiB with 1 GiB "
            "CUDA context and 5% fragmentation)"
        )
        if not plan.fits(gpu_memory):
            if fix is None:
                out.append("no combination of the usual changes fits: more or larger GPUs")
            else:
                label, fixed = fix
                out.append(f"cheapest change that fits: {label} -> {fixed.peak / GiB:.2f} GiB")
    return "\n".join(out)


# -- command line ---------------------------------------------------------------------------


def _recipe_flags(recipe: str | None) -> dict[str, bool]:
    if recipe is None:
        return {"gan": True, "cfg": True, "ema": True}
    from .loader import load_dmd_config

    cfg = load_dmd_config(recipe)
    return {
        "gan": cfg.gan_loss_weight_gen > 0,
        "cfg": cfg.guidance_scale is not None,
        "ema": cfg.ema is not None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastgen_diffusers.plan",
        description="Per-GPU memory of a DMD2 run, planned from the transformer's config.",
    )
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--revision", default=None)
    p.add_argument("--recipe", default=None, help="Recipe (decides GAN, CFG and EMA).")
    p.add_argument("--use_lora", action="store_true")
    p.add_argument(
        "--lora_layout",
        default="shared_lora",
        choices=["student_lora", "separate_lora", "shared_lora"],
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs sharing the run under FSDP2.")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--quantize_base", default="none", choices=["none", "int8", "fp8", "nf4"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--text_length", type=int, default=None, help="Prompt tokens (family's).")
    p.add_argument("--gpu_memory", default=None, help="e.g. 24GB: say whether it fits.")
    return p


def settings_from_args(args: Any, num_gpus: int) -> PlanSettings:
    height = args.height or args.resolution
    width = args.width or args.resolution
    return PlanSettings(
        layout=args.lora_layout if args.use_lora else "full",
        rank=args.rank,
        num_gpus=num_gpus,
        height=height,
        width=width,
        num_frames=args.num_frames,
        train_batch_size=args.train_batch_size,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        quantize_base=args.quantize_base,
        optimizer=args.optimizer,
        text_length=getattr(args, "text_length", None),
        target_modules=tuple(args.lora_target_modules)
        if getattr(args, "lora_target_modules", None)
        else None,
        **_recipe_flags(args.recipe),
    )


def _report(args: Any, num_gpus: int, gpu_memory: int | None) -> str:
    config = load_transformer_config(args.pretrained_model_name_or_path, args.revision)
    planner = _Planner(config, load_experts(args.pretrained_model_name_or_path, args.revision))
    settings = settings_from_args(args, num_gpus)
    plan = planner.plan(settings)
    fix = None
    if gpu_memory is not None and not plan.fits(gpu_memory):
        fix = cheapest_fit(planner, settings, gpu_memory)
    return format_plan(plan, gpu_memory, fix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        if args.quantize_base != "none":
            from .quantize import check_quantize_base

            check_quantize_base(
                "int8" if args.quantize_base == "fp8" else args.quantize_base,
                args.lora_layout if args.use_lora else "full",
            )
        print(_report(args, args.num_gpus, gpu_memory))
    except ValueError as err:
        parser.error(str(err))
    return 0


def preflight(args: Any) -> bool:
    """Checks that need no weights, before a training run loads anything: ``--quantize_base``
    and ``--optimizer`` must be possible here. With ``--dry_run``, print the memory plan
    (this machine's GPU count and memory) and return ``True``: the run stops there."""
    from .quantize import check_quantize_base
    from .training.errors import UserError
    from .training.optim import check_optimizer

    try:
        check_quantize_base(args.quantize_base, args.layout)
        check_optimizer(args.optimizer)
    except ValueError as err:  # a value this machine's libraries cannot run: one message
        raise UserError(str(err)) from err
    if not args.dry_run:
        return False
    num_gpus = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_memory = None
    if torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    print(_report(args, num_gpus, gpu_memory))
    return True


if __name__ == "__main__":
    sys.exit(main())
