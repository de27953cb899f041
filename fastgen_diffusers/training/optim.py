"""The optimizer class behind ``--optimizer``: AdamW, or torchao's 8-bit AdamW.

``adamw8bit`` keeps both Adam moments in 8 bits with one scale per block of 256 values
(``torchao.optim.AdamW8bit``): 2 bytes per trained parameter instead of 8. torchao runs it on
CPU and GPU alike and its states are DTensor-aware (FSDP2); tensors under 4096 values keep fp32
moments.

Example::

    from fastgen_diffusers.training.optim import optimizer_class

    opt = optimizer_class("adamw8bit")(params, lr=1e-5, betas=(0.0, 0.999))
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["OPTIMIZERS", "check_optimizer", "optimizer_class"]

OPTIMIZERS = ("adamw", "adamw8bit")


def check_optimizer(name: str) -> None:
    """Refuse an ``--optimizer`` the installed libraries cannot run, with a message."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise ValueError(
            "--optimizer adamw8bit needs torchao (torchao.optim.AdamW8bit): "
            "pip install 'fastgen_diffusers[quant]'"
        )


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``name`` (``"adamw"`` or ``"adamw8bit"``)."""
    check_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW
    from torchao.optim import AdamW8bit

    return AdamW8bit
