"""LoRA students and fake scores through peft, and one shared base for all three DMD2 roles.

Four layouts of the networks :class:`~fastgen_diffusers.DMDPipeline` needs:

=================  =====================================================================
``full``           full student + full fake score: two trainable copies + frozen teacher
``student_lora``   LoRA student (on its own frozen copy) + full fake score
``separate_lora``  LoRA student + LoRA fake score, each on its own frozen copy
``shared_lora``    one copy of the teacher's weights: the teacher is that base with adapters
                   off, the student is adapter ``student``, the fake score adapter
                   ``fake_score``
=================  =====================================================================

Each LoRA network is an :class:`AdapterRole`: a view of a peft-adapted model whose forward runs
with one adapter (or none), whose ``parameters()`` are that adapter's weights only (so an
optimizer, an EMA, DDP or a checkpoint of the view covers exactly the role), and which switches
adapters without touching ``requires_grad``: peft's ``set_adapter`` / ``disable_adapters`` flip
it, and autograd silently drops the gradient of a parameter whose ``requires_grad`` was switched
off between its forward and the backward. With gradient checkpointing, recomputation in the
backward runs with the adapter of the original forward (see :func:`enable_gradient_checkpointing`).

Example::

    from fastgen_diffusers.lora import LoraSettings, build_dmd_networks, save_student_lora
    from fastgen_diffusers.plugins.sd3 import SD3Wrapper

    nets = build_dmd_networks(SD3Wrapper(pipe.transformer), "shared_lora", LoraSettings(rank=64))
    dmd = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    student_opt = torch.optim.AdamW(nets.student.parameters(), lr=1e-5)
    ...
    save_student_lora(nets.student, "output/")  # pipe.load_lora_weights("output/") loads it
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compat import enable_peft_layer_adapters, set_peft_layer_adapter
from .factory import create_fake_score
from .features import detach_feature_capture, unwrap_module
from .io import atomic_path

__all__ = [
    "FAKE_SCORE_ADAPTER",
    "LAYOUTS",
    "MERGED_LORA_WEIGHT_NAME",
    "STUDENT_ADAPTER",
    "TEACHER_LORA_ADAPTER",
    "AdapterRole",
    "DMDNetworks",
    "LoraSettings",
    "UserLora",
    "add_adapters",
    "build_dmd_networks",
    "default_target_modules",
    "enable_gradient_checkpointing",
    "fuse_student",
    "lora_weight_names",
    "fuse_user_lora",
    "merged_lora_state_dict",
    "save_merged_lora",
    "save_student_lora",
    "student_lora_state_dict",
    "use_adapter",
]

LAYOUTS = ("full", "student_lora", "separate_lora", "shared_lora")
STUDENT_ADAPTER = "student"
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FAKE_SCORE_ADAPTER = "fake_score"
TEACHER_LORA_ADAPTER = "teacher_lora"
# Not ``pytorch_lora_weights.safetensors``: ``load_lora_weights(folder)`` keeps finding the
# student adapter alone, and the merged LoRA loads with ``weight_name=``.
MERGED_LORA_WEIGHT_NAME = "merged_lora_weights.safetensors"

_STATE_ATTR = "_fastgen_adapter_state"


@dataclass
class LoraSettings:
    """LoRA hyperparameters shared by the student and fake-score adapters.

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (scale ``alpha / rank``); ``None`` means ``rank`` (scale 1).
        dropout: dropout on the LoRA branch.
        init: peft's ``init_lora_weights`` (``True``: B = 0, so a new adapter starts as the
            teacher; ``"gaussian"``, ``"pissa"``, ...).
        target_modules: module-name suffixes to adapt; ``None`` takes the family default
            (:func:`default_target_modules`).
    """

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    init: bool | str = True
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self, model: nn.Module) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights=self.init,
            target_modules=list(self.target_modules or default_target_modules(model)),
        )


def _family_class(module: nn.Module) -> Any:
    """The registered family whose transformer class ``module`` is an instance of (FSDP2's
    ``FSDP<Class>`` subclass included), else ``None``."""
    # Imported here: the family modules import diffusers, which only adapter users need.
    from .plugins.registry import family_for_transformer

    return family_for_transformer(type(module))


def _adapted_model(model: nn.Module) -> nn.Module:
    """The innermost module holding the weights (the diffusers transformer inside a wrapper)."""
    modules = list(unwrap_module(model))
    for candidate in modules:
        if _family_class(candidate) is not None:
            return candidate
    return modules[-1]


def _expert_models(model: nn.Module) -> list[nn.Module]:
    """The diffusers transformers holding the weights: one, or each expert's for a network of
    several experts (a module with an ``experts()`` method, e.g. Wan 2.2 A14B's ``WanExperts``),
    in the order of the pipeline's components."""
    inner = _adapted_model(model)
    experts = getattr(inner, "experts", None)
    if callable(experts):
        return [_adapted_model(e) for e in experts()]
    return [inner]


def _unknown_family(message: str) -> ValueError:
    from .plugins.registry import registered_families

    known = sorted({cls.transformer_class.__name__ for cls in registered_families().values()})
    return ValueError(f"{message} (known families: {', '.join(known)})")


def default_target_modules(model: nn.Module) -> list[str]:
    """The family's default LoRA targets (``Family.lora_target_modules``): attention
    projections and feed-forwards."""
    inner = _expert_models(model)[0]
    family = _family_class(inner)
    if family is None:
        raise _unknown_family(
            f"No default LoRA targets for {type(inner).__name__}; pass target_modules"
        )
    return list(family.lora_target_modules)


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_params(model: nn.Module, adapter: str) -> set[int]:
    ids: set[int] = set()
    for layer in _tuner_layers(model):
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and adapter in holder:
                item = holder[adapter]
                ids.update(
                    id(p) for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())
                )
    return ids


def add_adapters(model: nn.Module, settings: LoraSettings, names: Sequence[str]) -> nn.Module:
    """Inject one LoRA adapter per name into ``model`` (in place) and make exactly the adapters
    trainable: base weights frozen, every adapter ``requires_grad=True`` (set once, never
    flipped, so DDP registers all of them and no gradient is dropped)."""
    inner = _adapted_model(model)
    config = settings.peft_config(model)
    for name in names:
        for expert in _expert_models(model):  # each expert its own adapter of that name
            with warnings.catch_warnings():
                # peft warns that a second adapter joins the first: that is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                if hasattr(expert, "add_adapter") and hasattr(expert, "_hf_peft_config_loaded"):
                    # diffusers models: their own path, which records peft_config for saving
                    expert.add_adapter(copy.deepcopy(config), adapter_name=name)
                else:
                    inject_adapter_in_model(copy.deepcopy(config), expert, adapter_name=name)
            if not _adapter_params(expert, name):
                raise ValueError(
                    f"LoRA target_modules {config.target_modules} matched no layer of "
                    f"{type(expert).__name__}"
                )
    adapter_ids = set().union(*(_adapter_params(inner, n) for n in names))
    for param in inner.parameters():
        param.requires_grad_(id(param) in adapter_ids)
    _set_state(inner, None)
    return model


def _set_state(model: nn.Module, adapter: str | None) -> None:
    for layer in _tuner_layers(model):
        # Not peft's set_adapter / enable_adapters: they also flip requires_grad.
        set_peft_layer_adapter(layer, adapter)
    object.__setattr__(model, _STATE_ATTR, adapter)


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run ``model`` with ``adapter`` active (``None``: adapters off) inside the block, then
    restore the previous state. ``requires_grad`` is left untouched."""
    inner = _adapted_model(model)
    previous = getattr(inner, _STATE_ATTR, None)
    _set_state(inner, adapter)
    try:
        yield
    finally:
        _set_state(inner, previous)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on the diffusers model's gradient checkpointing with an adapter-aware checkpoint.

    Recomputation happens in the backward, after other roles may have switched the shared
    model's adapter: the checkpoint records the adapter active at forward time and restores it
    for the recomputation (non-reentrant ``torch.utils.checkpoint`` with ``context_fn``).
    """
    inner = _adapted_model(model)  # holds the active adapter (of every expert)

    def adapter_checkpoint(block: nn.Module, *args: Any) -> Any:
        adapter = getattr(inner, _STATE_ATTR, None)

        def context_fn() -> tuple[Any, Any]:
            return contextlib.nullcontext(), use_adapter(inner, adapter)

        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context_fn)

    adapter_checkpoint._fastgen_adapter_aware = True  # type: ignore[attr-defined]
    for expert in _expert_models(model):
        expert.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_checkpoint)


def _check_checkpointing(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not getattr(func, "_fastgen_adapter_aware", False):
                raise RuntimeError(
                    "Gradient checkpointing on a model shared by several adapters must restore "
                    "the adapter when recomputing: enable it with "
                    "fastgen_diffusers.lora.enable_gradient_checkpointing(model), not the "
                    "model's own enable_gradient_checkpointing()"
                )


class AdapterRole(nn.Module):
    """One DMD2 role of a peft-adapted model: the model run with ``adapter`` (``None``: base).

    ``parameters()`` / ``named_parameters()`` / ``state_dict()`` cover the role's own weights
    (the adapter's, or the base weights for ``adapter=None``) under the model's parameter
    names. ``train()`` / ``eval()`` switch only the adapter's dropout, so freezing the teacher
    role does not put the shared model in eval mode. Move the model itself between devices.
    """

    def __init__(self, module: nn.Module, adapter: str | None) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)  # not a submodule: see parameters()
        self.adapter = adapter
        inner = _adapted_model(module)
        if adapter is not None and not _adapter_params(inner, adapter):
            raise ValueError(f"{type(inner).__name__} has no LoRA adapter named {adapter!r}")

    def _role_ids(self) -> set[int]:
        inner = _adapted_model(self.module)
        if self.adapter is not None:
            return _adapter_params(inner, self.adapter)
        adapters = {n for layer in _tuner_layers(inner) for n in layer.lora_A}
        adapter_ids = (
            set().union(*(_adapter_params(inner, n) for n in adapters)) if adapters else set()
        )
        return {id(p) for p in self.module.parameters()} - adapter_ids

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        ids = self._role_ids()
        for name, param in self.module.named_parameters(remove_duplicate=remove_duplicate):
            if id(param) in ids:
                yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def state_dict(self, *args: Any, prefix: str = "", keep_vars: bool = False, **kwargs: Any):
        return OrderedDict(
            (prefix + name, p if keep_vars else p.detach()) for name, p in self.named_parameters()
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"{self!r}: state dict does not match the role's weights; missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in own:
                    own[name].copy_(value)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True) -> AdapterRole:
        self.training = mode
        if self.adapter is not None:
            for layer in _tuner_layers(_adapted_model(self.module)):
                dropout = getattr(layer, "lora_dropout", {})
                if self.adapter in dropout:
                    dropout[self.adapter].train(mode)
        return self

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _check_checkpointing(self.module)
        with use_adapter(self.module, self.adapter):
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, module={type(self.module).__name__}"


@dataclass
class DMDNetworks:
    """The three networks of one layout, ready for :class:`~fastgen_diffusers.DMDPipeline`.

    ``base`` is the model carrying both adapters in the ``shared_lora`` layout (move it to the
    device, shard it, checkpoint it), else ``None``. ``initial_weights`` is set when the networks
    were built on the meta device from a ``source`` (see :func:`build_dmd_networks`): for each
    role (``"student"``, ``"fake_score"``, ``"teacher"``), the full state dict and buffers of the
    model that holds the role's weights (the LoRA base for an adapter role), to load into it once
    it is materialised or sharded.
    """

    student: nn.Module
    teacher: nn.Module
    fake_score: nn.Module
    layout: str
    base: nn.Module | None = None
    initial_weights: dict[str, dict[str, torch.Tensor]] | None = None


def _frozen_copy(teacher: nn.Module, share_storage: bool = False) -> nn.Module:
    clone = _storage_sharing_copy(teacher) if share_storage else copy.deepcopy(teacher)
    detach_feature_capture(clone)
    clone.requires_grad_(False)
    return clone


def _storage_sharing_copy(module: nn.Module) -> nn.Module:
    """A structural copy whose parameters and buffers are new tensor objects over the same
    storage: no weight bytes are copied, and changing a copy's ``.data`` (``.to("meta")``,
    ``.float()``) leaves ``module`` as it was."""
    memo: dict[int, Any] = {}
    for tensor in module.parameters():
        memo[id(tensor)] = nn.Parameter(tensor.data, requires_grad=tensor.requires_grad)
    for tensor in module.buffers():
        memo[id(tensor)] = tensor.detach()
    return copy.deepcopy(module, memo)


def _role_base(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, AdapterRole) else net


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **model.state_dict()}


def build_dmd_networks(
    teacher: nn.Module,
    layout: str = "full",
    lora: LoraSettings | None = None,
    *,
    source: nn.Module | None = None,
) -> DMDNetworks:
    """Build student, teacher and fake score from a loaded teacher in one of :data:`LAYOUTS`.

    Students and LoRA fake scores start equal to the teacher (copies, or zero-initialised
    LoRA). In ``shared_lora`` no copy is made: ``teacher`` itself becomes the shared base.

    With ``teacher`` on the meta device (the sharded set-up: every rank builds empty networks,
    nothing full-sized is allocated) the copies are meta copies. ``source``, on the one process
    that read the weights, is the same model with its weights (e.g. on the host): the layout is
    then also built over copies of ``source`` that share its storage (no weight bytes copied;
    the adapters initialised exactly as without ``source``), and their weights are returned in
    ``initial_weights``, to load into the meta networks after sharding
    (:func:`~fastgen_diffusers.factory.load_from_rank0`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {', '.join(LAYOUTS)}")
    lora = lora or LoraSettings()
    on_meta = any(p.is_meta for p in teacher.parameters())
    if source is not None and not on_meta:
        raise ValueError("build_dmd_networks(source=...) expects the teacher on the meta device")
    initial = None
    if source is not None:
        # Built first, with the random stream of a run without sharding (adapter initialisation).
        host = _build(source, layout, lora, share_storage=True)
        initial = {
            role: _full_state(_role_base(getattr(host, role)))
            for role in ("student", "fake_score", "teacher")
        }
    if on_meta:
        # Adapters on the meta device still draw their (discarded) initial values: keep the
        # random stream where the run without sharding has it.
        with torch.random.fork_rng(devices=[]):
            nets = _build(teacher, layout, lora, share_storage=False)
        # peft puts a second adapter next to the first one's weights, not the base's: every
        # network stays empty until its weights are loaded into its shards.
        for role in ("student", "fake_score", "teacher"):
            for module in _role_base(getattr(nets, role)).modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and not param.is_meta:
                        module._parameters[name] = nn.Parameter(
                            param.to("meta"), requires_grad=param.requires_grad
                        )
    else:
        nets = _build(teacher, layout, lora, share_storage=False)
    nets.initial_weights = initial
    return nets


def _build(teacher: nn.Module, layout: str, lora: LoraSettings, share_storage: bool) -> DMDNetworks:
    def trainable_copy(model: nn.Module) -> nn.Module:
        if not share_storage:
            return create_fake_score(model)  # a trainable deep copy
        return create_fake_score(_frozen_copy(model, share_storage=True), deep_copy=False)

    def frozen_copy(model: nn.Module) -> nn.Module:
        return _frozen_copy(model, share_storage=share_storage)

    if layout == "full":
        student = trainable_copy(teacher)
        return DMDNetworks(student, teacher, trainable_copy(teacher), layout)
    if layout == "student_lora":
        base = add_adapters(frozen_copy(teacher), lora, [STUDENT_ADAPTER])
        return DMDNetworks(
            AdapterRole(base, STUDENT_ADAPTER), teacher, trainable_copy(teacher), layout
        )
    if layout == "separate_lora":
        student_base = add_adapters(frozen_copy(teacher), lora, [STUDENT_ADAPTER])
        fake_base = add_adapters(frozen_copy(teacher), lora, [FAKE_SCORE_ADAPTER])
        return DMDNetworks(
            AdapterRole(student_base, STUDENT_ADAPTER),
            teacher,
            AdapterRole(fake_base, FAKE_SCORE_ADAPTER),
            layout,
        )
    if share_storage:  # the source itself stays as it was read
        teacher = frozen_copy(teacher)
    add_adapters(teacher, lora, [STUDENT_ADAPTER, FAKE_SCORE_ADAPTER])
    return DMDNetworks(
        AdapterRole(teacher, STUDENT_ADAPTER),
        AdapterRole(teacher, None),
        AdapterRole(teacher, FAKE_SCORE_ADAPTER),
        layout,
        base=teacher,
    )


# -- export -----------------------------------------------------------------------------------


def student_lora_state_dict(
    student: AdapterRole,
    gathered: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    *,
    expert: int = 0,
) -> dict[str, torch.Tensor]:
    """The student adapter in diffusers' LoRA key format (``...lora_A.weight``, no adapter
    name), on the CPU.

    ``gathered``: the role's ``state_dict()`` with full tensors (an FSDP2-sharded model's
    adapter gathered onto one process), used instead of the model's own weights.
    ``dtype``: the returned tensors' dtype (default: as trained).
    ``expert``: for a network of several experts, which one's adapter (0: ``transformer``,
    1: ``transformer_2``).
    """
    inner = _expert_models(student.module)[expert]
    if gathered is None:
        state = get_peft_model_state_dict(inner, adapter_name=student.adapter)
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    prefix = next(name for name, m in student.module.named_modules() if m is inner)
    prefix = f"{prefix}." if prefix else ""
    tag = f".{student.adapter}."
    experts = _expert_models(student.module)
    others = [
        name
        for name, m in student.module.named_modules()
        if m is not inner and any(m is e for e in experts)
    ]
    out = {}
    for key, value in gathered.items():
        if any(key.startswith(f"{name}.") for name in others):
            continue  # another expert's adapter
        if not key.startswith(prefix) or tag not in key:
            raise KeyError(f"{key!r} is not a weight of adapter {student.adapter!r}")
        out[key[len(prefix) :].replace(tag, ".")] = value.detach().to("cpu", dtype).contiguous()
    return out


def _lora_metadata(student: AdapterRole, expert: int = 0) -> dict[str, Any]:
    # The adapter's LoraConfig, as diffusers' own training scripts store it: load_lora_weights
    # rebuilds the adapter (rank, alpha, targets) from it.
    inner = _expert_models(student.module)[expert]
    return inner.peft_config[student.adapter].to_dict()


def lora_weight_names(student: AdapterRole) -> list[str]:
    """The file names :func:`save_student_lora` writes: ``pytorch_lora_weights.safetensors``,
    and for a second expert (Wan 2.2 A14B's ``transformer_2``)
    ``pytorch_lora_weights_transformer_2.safetensors``, loaded with
    ``pipe.load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)``."""
    names = [DEFAULT_LORA_WEIGHT_NAME]
    for i in range(1, len(_expert_models(student.module))):
        names.append(f"pytorch_lora_weights_transformer_{i + 1}.safetensors")
    return names


def save_student_lora(
    student: AdapterRole,
    save_directory: str | os.PathLike,
    weight_name: str = "pytorch_lora_weights.safetensors",
    gathered: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the student adapter where ``Pipeline.load_lora_weights(save_directory)`` finds it,
    with its adapter metadata (rank, alpha, targets). The file is written under a temporary
    name and renamed, so an interrupted save leaves no partial file. Returns the file's path.
    ``gathered``, ``dtype``: see :func:`student_lora_state_dict`.

    A student of several experts (Wan 2.2 A14B) writes one file per expert, each in the format
    for ``transformer`` (``weight_name`` for the first, :func:`lora_weight_names` for the
    others; the second loads with ``load_into_transformer_2=True``); the first path is returned.
    """
    names = lora_weight_names(student)
    names[0] = weight_name
    os.makedirs(save_directory, exist_ok=True)
    for expert, name in enumerate(names):
        inner = _expert_models(student.module)[expert]
        family = _family_class(inner)
        if family is None:
            raise _unknown_family(f"No diffusers LoRA format for {type(inner).__name__}")
        _write_lora_file(
            family,
            os.path.join(save_directory, name),
            student_lora_state_dict(student, gathered, dtype, expert=expert),
            _lora_metadata(student, expert),
        )
    return os.path.join(save_directory, names[0])


def _write_lora_file(
    family: Any, final: str, state: Mapping[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """``save_lora_weights`` in the family's format to ``final``, under a temporary name then
    renamed, so an interrupted save leaves no partial file."""
    with atomic_path(final) as tmp:  # diffusers writes <save_directory>/<weight_name>
        family.lora_loader_class.save_lora_weights(
            str(tmp.parent),
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
            weight_name=tmp.name,
        )


def fuse_student(student: AdapterRole) -> nn.Module:
    """A plain diffusers transformer with the student adapter merged into its weights (a copy:
    the training model is left as it is). Save it with ``save_pretrained``."""
    experts = _expert_models(student.module)
    if len(experts) > 1:
        raise ValueError(
            f"fuse_student merges one transformer; this student has {len(experts)} experts: "
            "export it with save_student_lora (one file per expert)"
        )
    inner = _adapted_model(student.module)
    fused = copy.deepcopy(inner)
    detach_feature_capture(fused)
    object.__setattr__(fused, _STATE_ATTR, None)
    for layer in _tuner_layers(fused):
        enable_peft_layer_adapters(layer)
        layer.merge(adapter_names=[student.adapter])
    fused.unload_lora()  # swaps every LoRA layer for its (now merged) base layer
    fused.requires_grad_(False)
    return fused


# -- the user's LoRA on the teacher --------------------------------------------------------------


@dataclass
class UserLora:
    """A diffusers-format LoRA fused into the teacher (``--teacher_lora``), kept for export.

    ``layers`` maps each adapted module's name (in the transformer) to ``(A, B)`` on the CPU in
    float32, with peft's ``alpha / r`` scaling and the user's ``scale`` folded into ``B``: the
    module's weight gained ``B @ A``.
    """

    source: str
    scale: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        """The largest rank over the adapted modules."""
        return max(a.shape[0] for a, _ in self.layers.values())


def fuse_user_lora(
    transformer: nn.Module,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    **load_kwargs: Any,
) -> UserLora:
    """Fuse a diffusers-format LoRA (file, folder, Hub repo id or state dict) into
    ``transformer``'s weights at ``scale``, in place, and return it as a :class:`UserLora`.

    The LoRA is read with the family's ``lora_loader_class.lora_state_dict`` (which converts the
    formats the stock pipeline's ``load_lora_weights`` accepts) and loaded with diffusers'
    ``load_lora_adapter``, so it is the adapter the stock pipeline would build; its product is
    then added to the weights and the LoRA layers removed: ``transformer`` is a plain model
    again, with nothing trainable added. ``load_kwargs`` go to ``lora_state_dict`` (e.g.
    ``weight_name``, ``cache_dir``).
    """
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be finite, got {scale}")
    family = _family_class(transformer)
    if family is None:
        raise _unknown_family(f"No diffusers LoRA loader for {type(transformer).__name__}")
    if _tuner_layers(transformer):
        raise ValueError(f"{type(transformer).__name__} already carries LoRA layers")
    source = str(lora) if not isinstance(lora, Mapping) else "<state dict>"
    loaded = family.lora_loader_class.lora_state_dict(
        lora, return_lora_metadata=True, **load_kwargs
    )
    state, metadata = loaded[0], loaded[-1]
    if not any(k.startswith("transformer.") for k in state):
        raise ValueError(
            f"LoRA {source!r} has no transformer weights (keys such as {sorted(state)[:3]}); "
            f"expected a diffusers LoRA of a {family.transformer_class.__name__}"
        )
    transformer.load_lora_adapter(
        state, prefix="transformer", adapter_name=TEACHER_LORA_ADAPTER, metadata=metadata
    )
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer) or TEACHER_LORA_ADAPTER not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), nn.Linear) or module.use_dora.get(
            TEACHER_LORA_ADAPTER, False
        ):
            raise ValueError(
                f"LoRA {source!r}: module {name!r} is not a plain LoRA on a Linear layer "
                f"({type(module.get_base_layer()).__name__}); expected LoRA on linear layers"
            )
        a = module.lora_A[TEACHER_LORA_ADAPTER].weight.detach().float().cpu()
        b = module.lora_B[TEACHER_LORA_ADAPTER].weight.detach().float().cpu()
        layers[name] = (a.clone(), b * (module.scaling[TEACHER_LORA_ADAPTER] * scale))
    with torch.no_grad():
        transformer.fuse_lora(lora_scale=scale, adapter_names=[TEACHER_LORA_ADAPTER])
    transformer.unload_lora()
    transformer.requires_grad_(False)
    return UserLora(source=source, scale=float(scale), layers=layers)


def merged_lora_state_dict(
    user: UserLora,
    student_state: Mapping[str, torch.Tensor],
    student_scaling: float,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One LoRA equal to the user's LoRA (at its scale) plus the student adapter.

    The two are stacked along the rank: ``A = [A_user; A_student]``,
    ``B = [B_user s_user; B_student s_student]`` (scalings folded into ``B``), so that
    ``B @ A = s_user B_user A_user + s_student B_student A_student`` exactly, and the merged
    adapter has scaling 1 (``lora_alpha = r``). Every module gets the same rank, the user's
    largest plus the student's; a module only one of them adapts gets zeros for the other.

    ``student_state``: :func:`student_lora_state_dict`'s keys (``<module>.lora_A.weight``).
    Returns the state dict in the same key format and the adapter metadata for
    ``save_lora_weights``.
    """
    student: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in student_state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                student.setdefault(key[: -len(suffix)], {})[part] = value.detach().float().cpu()
                break
        else:
            raise KeyError(f"{key!r} is not a LoRA A or B weight")
    r_user = user.rank
    r_student = max(v["lora_A"].shape[0] for v in student.values())
    rank = r_user + r_student
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(user.layers) | set(student)):
        a_user, b_user = user.layers.get(name, (None, None))
        mod = student.get(name)
        ref_a = a_user if a_user is not None else mod["lora_A"]  # type: ignore[index]
        ref_b = b_user if b_user is not None else mod["lora_B"]  # type: ignore[index]
        a = torch.zeros(rank, ref_a.shape[1])
        b = torch.zeros(ref_b.shape[0], rank)
        if a_user is not None and b_user is not None:
            a[: a_user.shape[0]] = a_user
            b[:, : b_user.shape[1]] = b_user
        if mod is not None:
            a[r_user : r_user + mod["lora_A"].shape[0]] = mod["lora_A"]
            b[:, r_user : r_user + mod["lora_B"].shape[1]] = mod["lora_B"] * student_scaling
        out[f"{name}.lora_A.weight"] = a.to(dtype) if dtype is not None else a
        out[f"{name}.lora_B.weight"] = b.to(dtype) if dtype is not None else b
    names = sorted({k.rsplit(".lora_", 1)[0] for k in out})
    metadata = LoraConfig(r=rank, lora_alpha=rank, target_modules=names).to_dict()
    return out, metadata


def save_merged_lora(
    student: AdapterRole,
    user: UserLora,
    save_directory: str | os.PathLike,
    weight_name: str = MERGED_LORA_WEIGHT_NAME,
    gathered: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write :func:`merged_lora_state_dict` of the user's LoRA and the student adapter where
    ``pipe.load_lora_weights(save_directory, weight_name=weight_name)`` finds it (written under a
    temporary name, then renamed). ``gathered``, ``dtype``: see :func:`student_lora_state_dict`.
    """
    inner = _adapted_model(student.module)
    family = _family_class(inner)
    if family is None:
        raise _unknown_family(f"No diffusers LoRA format for {type(inner).__name__}")
    config = inner.peft_config[student.adapter]
    scaling = float(config.lora_alpha) / float(config.r)
    if config.rank_pattern or config.alpha_pattern or getattr(config, "use_rslora", False):
        raise ValueError("save_merged_lora expects one rank and alpha for the whole adapter")
    state, metadata = merged_lora_state_dict(
        user, student_lora_state_dict(student, gathered), scaling, dtype
    )
    os.makedirs(save_directory, exist_ok=True)
    final = os.path.join(save_directory, weight_name)
    _write_lora_file(family, final, state, metadata)
    return final
