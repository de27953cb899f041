"""The model-call convention every network in the library follows.

``model(hidden_states=x_t, timestep=t, encoder_hidden_states=..., **model_kwargs)`` with ``t``
the continuous RF time in [0, 1] (``[B]``) and ``x_t`` in the VAE latent layout; the model
returns its native prediction in that layout as a Tensor, a tuple whose first item is one, or an
object with ``.sample``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "extract_prediction"]


def extract_prediction(out: Any) -> torch.Tensor:
    """The prediction Tensor out of a model output (Tensor, tuple, or ``.sample`` object)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(
        f"Model output of type {type(out).__name__} is neither a Tensor, a tuple whose first "
        "item is a Tensor, nor an object with a .sample Tensor"
    )


def call_model(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    num_train_timesteps: int | None = None,
) -> torch.Tensor:
    """Call ``model`` in the pipeline convention and return its native prediction.

    ``num_train_timesteps`` rescales ``t`` to ``num_train_timesteps * t`` for raw diffusers
    modules; family wrappers rescale themselves and leave it ``None``.
    """
    kwargs = dict(model_kwargs or {})
    timestep = t if num_train_timesteps is None else t * float(num_train_timesteps)
    kwargs.update(hidden_states=x_t, timestep=timestep)
    if encoder_hidden_states is not None:
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    out = extract_prediction(model(**kwargs))
    if out.shape != x_t.shape:
        raise ValueError(
            f"{type(model).__name__} returned shape {tuple(out.shape)} for input "
            f"{tuple(x_t.shape)}; predictions must be in the latent layout"
        )
    return out
