"""Implicit distribution alignment (IDA, SenseFlow, Ge et al., ICLR 2026).

After each student update the fake score is pulled toward the student,
``phi <- (1 - r) phi + r theta``, so the fake distribution keeps tracking the generator's (the
inner optimum of DMD's min-max game) instead of lagging behind it; SenseFlow uses r = 0.03.

- Full networks (layout ``full``): every parameter of the fake score is blended with the
  student's parameter of the same name, elementwise (sharded DTensors blend shard by shard).
- LoRA fake score and LoRA student on the same base weights (``separate_lora``,
  ``shared_lora``): blending the factors ``A`` and ``B`` separately would not blend the deltas
  (``B A`` is bilinear: ``((1-r) B_f + r B_s)((1-r) A_f + r A_s)`` carries the cross terms
  ``r (1-r)(B_f A_s + B_s A_f)``, which are neither network's delta). Instead the fake adapter
  is set to the best rank-k approximation (k its rank) of the blended delta
  ``(1 - r) B_f A_f + r B_s A_s``, computed from the factors (QR of ``[B_f, B_s]`` and
  ``[A_f; A_s]^T``, SVD of the small 2k x 2k core), with the singular values split evenly
  between the new ``B`` and ``A``. Exact whenever the blend has rank <= k (e.g. while the
  fake and student deltas share a subspace).
- ``student_lora`` (LoRA student, full fake score) is refused: the student's effective weights
  would have to be materialised on every adapted layer.

Example::

    dmd.compute_student_loss(...)["total"].backward(); student_opt.step()
    align_fake_score(fake_score, student, ratio=0.03)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .utils import is_dtensor

__all__ = ["align_fake_score", "blend_low_rank"]


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full-size ``value`` into ``param`` (this rank's shard of it when sharded)."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.data.copy_(value)


@torch.no_grad()
def blend_low_rank(
    b_fake: torch.Tensor,
    a_fake: torch.Tensor,
    b_student: torch.Tensor,
    a_student: torch.Tensor,
    ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of rank ``k = a_fake.shape[0]`` whose product is the best rank-k
    approximation (Frobenius) of ``(1 - ratio) b_fake @ a_fake + ratio b_student @ a_student``.

    Shapes: ``b_* [out, k]``, ``a_* [k, in]``. Computed in fp32 from the factors, without
    forming the ``[out, in]`` matrix.
    """
    rank = a_fake.shape[0]
    if not (b_fake.shape == b_student.shape and a_fake.shape == a_student.shape):
        raise ValueError(
            "blend_low_rank needs adapters of the same shapes, got B "
            f"{tuple(b_fake.shape)} / {tuple(b_student.shape)} and A {tuple(a_fake.shape)} / "
            f"{tuple(a_student.shape)}"
        )
    left = torch.cat([b_fake.float(), b_student.float()], dim=1)  # [out, 2k]
    right = torch.cat([(1 - ratio) * a_fake.float(), ratio * a_student.float()], dim=0)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    root = s[:rank].sqrt()
    b_new = (q_left @ u[:, :rank]) * root
    a_new = root[:, None] * (vh[:rank] @ q_right.T)
    return b_new.to(b_fake.dtype), a_new.to(a_fake.dtype)


def _lora_layers(module: nn.Module) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def _align_lora(fake_score: Any, student: Any, ratio: float) -> None:
    # AdapterRole views (lora.py, which this module does not import: it needs peft)
    fake_adapter: str = fake_score.adapter
    student_adapter: str = student.adapter
    fake_layers = _lora_layers(fake_score.module)
    student_layers = _lora_layers(student.module)
    for name, layer in fake_layers.items():
        if fake_adapter not in layer.lora_A:
            continue
        other = student_layers.get(name)
        if other is None or student_adapter not in other.lora_A:
            raise ValueError(
                f"ida_ratio: the fake score's LoRA layer {name!r} has no student adapter "
                f"{student_adapter!r} to align with (fake and student must adapt the same layers)"
            )
        if layer.scaling[fake_adapter] != other.scaling[student_adapter]:
            raise ValueError(
                f"ida_ratio: LoRA layer {name!r} scales the fake adapter by "
                f"{layer.scaling[fake_adapter]} and the student's by "
                f"{other.scaling[student_adapter]}; IDA needs the same rank and alpha"
            )
        a_f = layer.lora_A[fake_adapter].weight
        b_f = layer.lora_B[fake_adapter].weight
        a_s = other.lora_A[student_adapter].weight
        b_s = other.lora_B[student_adapter].weight
        shape_b, shape_a = b_f.shape, a_f.shape
        b_new, a_new = blend_low_rank(
            _full(b_f).reshape(shape_b[0], -1),
            _full(a_f).reshape(shape_a[0], -1),
            _full(b_s).reshape(shape_b[0], -1),
            _full(a_s).reshape(shape_a[0], -1),
            ratio,
        )
        _assign(b_f, b_new.reshape(shape_b))
        _assign(a_f, a_new.reshape(shape_a))


@torch.no_grad()
def align_fake_score(fake_score: nn.Module, student: nn.Module, ratio: float) -> None:
    """IDA step: ``fake <- (1 - ratio) fake + ratio student`` (see the module docstring for
    LoRA networks). ``fake_score`` and ``student`` may be wrapped in DDP."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ida ratio must be in [0, 1], got {ratio}")
    fake, stud = _unwrap(fake_score), _unwrap(student)
    fake_lora = getattr(fake, "adapter", None) is not None
    student_lora = getattr(stud, "adapter", None) is not None
    if fake_lora and student_lora:
        _align_lora(fake, stud, ratio)
        return
    if fake_lora or student_lora:
        raise ValueError(
            "ida_ratio > 0 needs the fake score and the student in the same form (both full "
            "networks, or both LoRA adapters on the same base: lora_layout full, "
            "separate_lora or shared_lora); got a "
            f"{'LoRA' if fake_lora else 'full'} fake score and a "
            f"{'LoRA' if student_lora else 'full'} student"
        )
    student_params = dict(stud.named_parameters())
    for name, param in fake.named_parameters():
        source = student_params.get(name)
        if source is None or source.shape != param.shape:
            raise ValueError(
                f"ida_ratio: the student has no parameter {name!r} of shape "
                f"{tuple(param.shape)} to align the fake score's with (they must be copies of "
                "the same network)"
            )
        param.data.lerp_(source.data.to(param.dtype), ratio)
