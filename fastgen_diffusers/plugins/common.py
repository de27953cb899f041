"""What every family plugin shares: the wrapper base, config access, the student's stock
scheduler config, and folding block tokens back into feature maps.

Family modules (``sd3``, ``flux``, ``wan``, ``qwen_image``) stay one file each and import from
here only logic that is the same in two or more of them; everything a family decides for itself
(its call convention, token layout, messages) stays in its module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..features import FeatureCapture, unwrap_module
from ..sampling import validate_t_list

__all__ = [
    "JOINT_ATTENTION_LORA_TARGETS",
    "TransformerWrapper",
    "cfg_get",
    "compile_blocks",
    "config_of",
    "find_transformer",
    "flow_match_sigmas",
    "flow_match_student_config",
    "identical_token_runs",
    "inner_dim",
    "latent_grid_hook",
    "scaled_initial_latents",
    "tokens_to_map",
    "validate_sample_type",
]

# LoRA targets of the joint (image + text stream) attention of SD3, Flux and Qwen-Image blocks:
# the diffusers DreamBooth LoRA scripts' defaults.
JOINT_ATTENTION_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


# -- the wrapper base ---------------------------------------------------------------------------


class TransformerWrapper(nn.Module):
    """Base of the family wrappers: holds the diffusers transformer as ``self.transformer`` and
    exposes its ``config``, ``dtype`` and gradient-checkpointing switches.

    Subclasses implement ``forward(hidden_states=x_t, timestep=t in [0, 1], ...)`` and read the
    timestep through :meth:`_check_timestep`.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        # The range check syncs the device, so it runs on the first call only: a doubly scaled
        # t (config.num_train_timesteps set with a wrapper) is wrong from step one.
        self._timestep_checked = False

    @property
    def config(self) -> Any:
        """The transformer's config."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype; inputs are cast to it.

        diffusers' ``dtype`` skips ``_keep_in_fp32_modules`` and honours layerwise casting: the
        compute dtype of a bf16 load is bf16 although some weights stay fp32.
        """
        return self.transformer.dtype

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the transformer's layers compute in on ``device``: the autocast dtype inside
        an autocast region for ``device.type`` (fp32 weights under ``--mixed_precision bf16``
        compute in bf16), else the weights' dtype :attr:`dtype`."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.dtype

    def _pipeline_rounded_t(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the Flux and Qwen-Image pipelines pass it: the scheduler's ``1000 t``
        (float32) cast to the latents' dtype, then divided by 1000 in that dtype.

        The latents' dtype of the stock pipeline is the dtype its transformer computes in, so the
        rounding follows :meth:`compute_dtype`: under bf16 autocast a model with fp32 weights
        sees what the stock pipeline's bf16 model sees (t = 0.74925 -> 0.746094 instead of 0.75).
        """
        return (t * 1000.0).to(self.compute_dtype(t.device)) / 1000.0

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.disable_gradient_checkpointing()

    def _check_timestep(
        self, timestep: torch.Tensor | float, batch: int, device: torch.device, *, scaling: str
    ) -> torch.Tensor:
        """``timestep`` as float32 ``[batch]`` (a scalar or ``[1]`` broadcasts).

        On the first call (outside ``torch.compile`` tracing) it also checks that ``t`` lies in
        [0, 1]; ``scaling`` says in the error who scales ``t`` to the transformer's range.
        """
        t = torch.as_tensor(timestep, device=device).float()
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(()).expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"timestep must be [B={batch}] or a scalar, got {tuple(t.shape)}")
        if not self._timestep_checked and not torch.compiler.is_compiling():
            t_min, t_max = float(t.min()), float(t.max())
            if t_max > 1.0 + 1e-4 or t_min < -1e-4:
                raise ValueError(
                    f"{type(self).__name__} takes the RF time t in [0, 1] and {scaling}; got t "
                    f"in [{t_min}, {t_max}] (leave DistillationConfig.num_train_timesteps null "
                    "with the wrapper)"
                )
            self._timestep_checked = True
        return t


# -- config access ------------------------------------------------------------------------------


def cfg_get(config: Any, key: str) -> Any:
    """``config[key]`` for a mapping (diffusers' ``FrozenDict``), else ``config.key``."""
    if isinstance(config, Mapping):
        return config[key]
    return getattr(config, key)


def find_transformer(
    model: nn.Module,
    matches: Callable[[nn.Module], bool],
    error: type[Exception],
    message: str,
) -> nn.Module:
    """The first module ``matches`` accepts among ``model`` and the modules it wraps (the family
    wrapper's ``.transformer``, DDP's ``.module``, ``torch.compile``'s ``._orig_mod``, ...).

    Raises ``error(f"{type(model).__name__} {message}")`` when there is none.
    """
    for module in unwrap_module(model):
        if matches(module):
            return module
    raise error(f"{type(model).__name__} {message}")


def config_of(
    source: Any, find: Callable[[nn.Module], nn.Module], expected: str | None = None
) -> Any:
    """The transformer config behind ``source``.

    A mapping is the config itself; a module (wrapper, raw transformer, DDP / compile wrapper)
    gives the config of the transformer ``find`` returns; a pipeline (anything with a
    ``.transformer``) gives its transformer's. Anything else is returned as a config read by
    attribute (:func:`cfg_get`), or, with ``expected`` (what the caller accepts, for the
    message), raises ``TypeError``.
    """
    if isinstance(source, Mapping):
        return source
    if isinstance(source, nn.Module):
        return find(source).config
    transformer = getattr(source, "transformer", None)  # a pipeline
    if transformer is not None:
        return transformer.config
    if expected is None:
        return source
    raise TypeError(f"Expected {expected}, got {type(source).__name__}")


def inner_dim(config: Any) -> int:
    """The transformer's hidden width, ``num_attention_heads * attention_head_dim``."""
    return int(cfg_get(config, "num_attention_heads")) * int(cfg_get(config, "attention_head_dim"))


# -- feature maps -------------------------------------------------------------------------------


def latent_grid_hook(key: str, patch_size: Sequence[int]) -> Callable[..., None]:
    """A :meth:`FeatureCapture.add_input_hook` hook that notes the token grid of the latents
    ``[B, C, *sizes]`` (``hidden_states``, by keyword or first) under ``capture.meta[key]``:
    ``sizes // patch_size`` per axis."""
    patch = tuple(int(p) for p in patch_size)

    def hook(args: tuple, kwargs: dict, capture: FeatureCapture) -> None:
        latents = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(latents, torch.Tensor) and latents.ndim == 2 + len(patch):
            capture.meta[key] = tuple(size // p for size, p in zip(latents.shape[2:], patch))

    return hook


def tokens_to_map(tokens: torch.Tensor, grid: Sequence[int], kind: str = "image") -> torch.Tensor:
    """Fold block tokens ``[B, N, D]``, flattened row-major over ``grid`` (``(h, w)`` or
    ``(f, h, w)``), back into a map ``[B, D, *grid]``.

    ``kind`` names the tokens in the error raised when ``N`` is not the grid's size.
    """
    grid = tuple(int(g) for g in grid)
    batch, num_tokens, channels = tokens.shape
    if num_tokens != math.prod(grid):
        raise ValueError(
            f"block output has {num_tokens} {kind} tokens, expected "
            f"{' x '.join(str(g) for g in grid)} = {math.prod(grid)} (the token grid of the "
            "transformer input)"
        )
    return tokens.reshape(batch, *grid, channels).movedim(-1, 1)


# -- the distilled student in a stock pipeline -------------------------------------------------


def validate_sample_type(sample_type: str) -> str:
    """``"ode"`` or ``"sde"`` (the student's transition), else ``ValueError``."""
    if sample_type not in ("ode", "sde"):
        raise ValueError(f"sample_type={sample_type!r}; expected 'ode' or 'sde'")
    return sample_type


def flow_match_student_config(
    t_list: Sequence[float],
    sample_type: str = "ode",
    base_config: Mapping[str, Any] | None = None,
    *,
    num_train_timesteps: int = 1000,
) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config that leaves custom ``sigmas`` as given, for
    pipelines that pass ``sigmas=t_list[:-1]`` (SD3, Flux, Qwen-Image).

    ``set_timesteps(sigmas=...)`` shifts custom sigmas (statically with ``shift``, dynamically
    with ``mu``), stretches them with ``shift_terminal`` and may convert them to Karras /
    exponential / beta; all of that (and ``invert_sigmas``) is switched off, so the schedule is
    ``t_list`` (the scheduler appends the final 0). ``sample_type="sde"`` sets
    ``stochastic_sampling=True``. ``base_config`` keeps its other keys, except private ones
    (diffusers resets the keys ``_use_default_values`` lists to their defaults on load, which
    would undo these overrides) and ``use_flow_sigmas`` (``FluxPipeline`` drops custom sigmas
    when it is set).
    """
    validate_t_list(t_list)
    validate_sample_type(sample_type)
    config = {
        k: v
        for k, v in dict(base_config or {}).items()
        if not k.startswith("_") and k != "use_flow_sigmas"
    }
    config.update(
        _class_name="FlowMatchEulerDiscreteScheduler",
        num_train_timesteps=int(num_train_timesteps),
        shift=1.0,
        use_dynamic_shifting=False,
        shift_terminal=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        invert_sigmas=False,
        stochastic_sampling=sample_type == "sde",
    )
    return config


def scaled_initial_latents(noise: torch.Tensor, t_list: Sequence[float]) -> torch.Tensor:
    """``t_list[0] * noise``, multiplied in float64 and cast back as
    :func:`~fastgen_diffusers.sampling.sample_student` does: where the student starts. Stock
    pipelines use given ``latents`` unscaled, so pass these (in the pipeline's layout)."""
    t_list = validate_t_list(t_list)
    return (noise.to(torch.float64) * t_list[0]).to(noise.dtype)


def flow_match_sigmas(
    scheduler_config: Mapping[str, Any], num_steps: int, image_seq_len: int
) -> list[float]:
    """The sigmas a ``FlowMatchEulerDiscreteScheduler`` built from ``scheduler_config`` visits
    in ``num_steps`` steps (dynamic shifting resolved for ``image_seq_len`` tokens, as the
    pipelines compute ``mu``), ending with 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler_config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {}
    if config.get("use_dynamic_shifting"):
        # The pipelines' own helper (Flux, SD3, Qwen-Image copy it): the same float operations,
        # so the teacher's reference visits exactly the sigmas the stock pipeline does.
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs["mu"] = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    scheduler.set_timesteps(num_steps, **kwargs)
    return [float(s) for s in scheduler.sigmas]


# -- identical text tokens ----------------------------------------------------------------------


def identical_token_runs(*token_batches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs of consecutive identical rows of ``[B, L, D]`` token batches, shared by every
    sample of every batch: ``(starts, counts)`` (``[L']`` each, ``L' < L``), or ``None`` when
    no two neighbouring rows are equal in all samples.

    Row ``i`` joins the run of row ``i - 1`` only if the two are bitwise equal in every sample
    (NaNs never match), so ``tokens[:, starts]`` with multiplicities ``counts`` describes each
    sample exactly; e.g. SD3 prompts encoded without T5 end in 256 zero rows, one run.
    """
    first = token_batches[0]
    if first.ndim != 3 or first.shape[1] < 2:
        return None
    same = torch.ones(first.shape[1] - 1, dtype=torch.bool, device=first.device)
    for tokens in token_batches:
        if tokens.shape[1:] != first.shape[1:]:
            return None
        same &= (tokens[:, 1:] == tokens[:, :-1]).all(dim=-1).all(dim=0)
    if not bool(same.any()):
        return None
    new_run = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    starts = new_run.nonzero().squeeze(1)
    counts = torch.diff(starts, append=starts.new_tensor([first.shape[1]]))
    return starts, counts


# -- regional compilation -----------------------------------------------------------------------

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile each repeated transformer block of ``model`` in place (``nn.Module.compile``):
    regional compilation, one graph reused by every block of a kind, so compile time does not
    grow with depth. Looks through wrappers (``.transformer``, DDP's ``.module``, peft).
    Returns how many blocks were compiled (already compiled ones are skipped, so networks
    sharing blocks compile them once)."""
    compiled = 0
    for module in unwrap_module(model):
        for name in _BLOCK_LISTS:
            blocks = getattr(module, name, None)
            if not isinstance(blocks, nn.ModuleList):
                continue
            for block in blocks:
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile(**compile_kwargs)
                    compiled += 1
        if compiled:
            break
    return compiled
