"""How the training run spreads the DMD2 networks over processes: the one place it happens.

Without FSDP, accelerate wraps each trained network in DDP (a LoRA role view included) and the
frozen teacher is replicated. With an accelerate FSDP2 config (``fsdp_version: 2``):

- every transformer block is its own FSDP unit (the config's
  ``fsdp_transformer_layer_cls_to_wrap``, or the diffusers model's ``_no_split_modules``),
  resharded after each forward;
- a full student / fake score is its own sharded model; a LoRA role is a view of a base model,
  so the base is sharded once and each role's optimizer is built over the role's shards
  (``shared_lora``: one base, two adapters, two optimizers; the teacher is that base with
  adapters off); each optimizer is then prepared with its (already sharded) model;
- the frozen teacher of the other layouts is sharded with accelerate's ``fsdp2_prepare_model``
  (same mesh and mixed-precision policy, no optimizer);
- the discriminator (a few small heads) is one FSDP unit, sharded like the rest, so its
  gradients are reduce-scattered and its optimizer state split; it computes in fp32;
- weights come from rank 0: the other ranks build the teacher transformer on the meta device
  (:func:`load_pipeline`) and receive their shards by broadcast right after sharding
  (:func:`~fastgen_diffusers.factory.load_from_rank0`, buffers included), so the host holds
  one full copy, not one per rank. The discriminator and LoRA weights come from rank 0 too.
- ``fsdp_offload_params: true``: the shards are materialised on the host (FSDP2 keeps them,
  their gradients and hence the optimizer states there and copies each unit to the accelerator
  for its compute); buffers, which FSDP does not manage, go to the accelerator;
- activation checkpointing and compilation (a dynamo backend, or ``--compile_blocks``) are
  applied per block before sharding.

Example::

    pipe = load_pipeline(accelerator, family, path, torch_dtype=torch.bfloat16)
    nets = build_dmd_networks(family.wrap(pipe.transformer), "shared_lora", lora)
    prepared = prepare_networks(
        accelerator,
        nets,
        make_optimizer=lambda role, params: torch.optim.AdamW(params, lr=1e-5),
        make_scheduler=lambda role, opt: get_scheduler("constant", optimizer=opt),
    )
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ..compat import accelerator_models_and_optimizers
from ..factory import load_from_rank0
from ..lora import AdapterRole, DMDNetworks

__all__ = [
    "SUPPORTED_FSDP_OPTIONS",
    "PreparedNetworks",
    "check_accelerate_options",
    "full_state_dict",
    "is_fsdp2",
    "load_pipeline",
    "pipeline_to",
    "prepare_networks",
    "take_host_transformer",
    "take_host_transformers",
    "teacher_transformers_with_weights",
    "unsharded_class",
]


def is_fsdp2(accelerator: Accelerator) -> bool:
    """True when accelerate runs FSDP2 (``fsdp_version: 2`` in the accelerate config)."""
    return accelerator.distributed_type == DistributedType.FSDP and bool(
        getattr(accelerator, "is_fsdp2", False)
    )


def unsharded_class(module: nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps in a subclass named ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"{type(module).__name__} has no unsharded base class")


# -- loading --------------------------------------------------------------------------------------


def load_pipeline(accelerator: Accelerator, family: Any, path: str, **kwargs: Any):
    """The teacher pipeline. Under FSDP2 every rank builds the transformer on the meta device
    (buffers such as rotary tables are still computed, since no state dict carries them) and
    the main process also reads its weights onto the host (CPU): :func:`take_host_transformer`
    hands them to the set-up, which loads them into the shards once they exist. Nothing
    full-sized reaches an accelerator; the host holds one copy on the machine."""
    if not is_fsdp2(accelerator):
        return family.load_pipeline(path, **kwargs)
    import diffusers

    from ..quantized_loading import empty_transformer

    revision = kwargs.get("revision")
    index = family.pipeline_class.load_config(path, revision=revision)
    empty, classes = {}, {}
    for name in family.transformer_components:  # Wan 2.2 A14B: transformer and transformer_2
        library, class_name = index[name]
        cls = classes[name] = getattr(diffusers, class_name)
        config = cls.load_config(path, subfolder=name, revision=revision)
        empty[name] = empty_transformer(cls, config)
        empty[name].to(kwargs.get("torch_dtype") or torch.float32)
    pipe = family.load_pipeline(path, **empty, **kwargs)
    if accelerator.is_main_process:
        hosts = []
        for name, cls in classes.items():
            host = cls.from_pretrained(
                path,
                subfolder=name,
                revision=revision,
                variant=kwargs.get("variant"),
                torch_dtype=kwargs.get("torch_dtype") or torch.float32,
            )
            host.requires_grad_(False)
            hosts.append(host)
        object.__setattr__(pipe, _HOST_ATTR, hosts)
    return pipe


_HOST_ATTR = "_fastgen_host_transformer"


def teacher_transformers_with_weights(pipe: Any) -> list[nn.Module]:
    """The teacher's transformers that hold weights in this process: the pipeline's
    transformers without FSDP2; under FSDP2 the host copies on the main process (the
    meta-device transformers hold none), and nothing on the other ranks."""
    found = [getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)]
    found += pipe.__dict__.get(_HOST_ATTR) or []
    return [m for m in found if m is not None and not any(p.is_meta for p in m.parameters())]


def take_host_transformers(pipe: Any) -> list[nn.Module] | None:
    """The transformers' weights (``Family.transformer_components``, in that order) the main
    process read onto the host in :func:`load_pipeline` (FSDP2), removed from ``pipe`` so that
    they are freed once loaded into the shards; ``None`` on the other ranks and without
    FSDP2."""
    return pipe.__dict__.pop(_HOST_ATTR, None)


def take_host_transformer(pipe: Any) -> nn.Module | None:
    """:func:`take_host_transformers` of a one-transformer pipeline."""
    hosts = take_host_transformers(pipe)
    return None if hosts is None else hosts[0]


def pipeline_to(pipe: Any, device: torch.device) -> None:
    """``pipe.to(device)`` for every component that holds weights (a meta-device transformer
    waits for its shards instead)."""
    for component in pipe.components.values():
        if not isinstance(component, nn.Module):
            continue
        if any(p.is_meta for p in component.parameters()):
            continue
        component.to(device)


# -- sharding -------------------------------------------------------------------------------------


def _block_classes(plugin: Any, model: nn.Module) -> list[str]:
    """Class names of ``model``'s transformer blocks: the config's, else the diffusers models'
    ``_no_split_modules``; only names that occur in ``model``."""
    present = {type(m).__name__ for m in model.modules()}
    wanted = list(plugin.transformer_cls_names_to_wrap or [])
    if not any(name in present for name in wanted):
        wanted = [
            name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])
        ]
    return sorted({name for name in wanted if name in present})


@contextlib.contextmanager
def _wrapping(plugin: Any, model: nn.Module) -> Iterator[None]:
    """Per-block FSDP units for ``model``: accelerate keeps one wrap policy for all models and
    refuses a model without the named block class (the discriminator has none). An already
    sharded model gets no policy (accelerate leaves it as it is)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    saved = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
    names = [] if isinstance(model, FSDPModule) else _block_classes(plugin, model)
    plugin.auto_wrap_policy = transformer_auto_wrap_policy if names else None
    plugin.transformer_cls_names_to_wrap = names or None
    try:
        yield
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved


@contextlib.contextmanager
def _precision(plugin: Any, full: bool) -> Iterator[None]:
    """fp32 compute and gradient reduction for ``full``: the discriminator's inputs (teacher
    features taken without grad) never require grad, and FSDP2 then reduces its gradients in
    the low-precision dtype without casting them back to the fp32 parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    saved = plugin.mixed_precision_policy
    if full and saved is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy()
    try:
        yield
    finally:
        plugin.mixed_precision_policy = saved


def _before_sharding(accelerator: Accelerator, plugin: Any, base: nn.Module) -> None:
    """accelerate's activation checkpointing and torch.compile, applied here because
    accelerate applies them only to a model it shards itself (these are sharded first).

    ``fsdp_activation_checkpointing``: the model's own gradient checkpointing over each
    transformer block, adapter-aware (a recomputation runs with the adapter of its forward).
    A dynamo backend: each transformer block compiled on its own (repeated blocks share one
    compiled graph), before ``fully_shard``, so FSDP's hooks stay outside the graphs."""
    from accelerate.utils import DynamoBackend

    from ..lora import enable_gradient_checkpointing

    if plugin.activation_checkpointing and hasattr(base, "enable_gradient_checkpointing"):
        if not any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
            enable_gradient_checkpointing(base)
    dynamo = accelerator.state.dynamo_plugin
    if dynamo.backend != DynamoBackend.NO:
        names = set(_block_classes(plugin, base))
        for module in base.modules():
            if type(module).__name__ in names:
                module.compile(**dynamo.to_kwargs())


@contextlib.contextmanager
def _no_accelerate_compile(accelerator: Accelerator) -> Iterator[None]:
    """accelerate would compile an already sharded model as a whole (and checkpoint it under
    ``_orig_mod.`` names): its blocks are compiled before sharding instead."""
    from accelerate.utils import DynamoBackend

    dynamo = accelerator.state.dynamo_plugin
    saved = dynamo.backend
    dynamo.backend = DynamoBackend.NO
    try:
        yield
    finally:
        dynamo.backend = saved


# -- accelerate options ---------------------------------------------------------------------------

#: The accelerate FSDP options this run honours, and the values it accepts.
SUPPORTED_FSDP_OPTIONS = """\
fsdp_version: 2 (required)
fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (each transformer block its own unit)
fsdp_transformer_layer_cls_to_wrap: optional (default: the model's _no_split_modules)
fsdp_reshard_after_forward: true (fsdp_sharding_strategy: FULL_SHARD)
fsdp_state_dict_type: SHARDED_STATE_DICT or FULL_STATE_DICT
fsdp_offload_params: true or false (true: parameter shards, their gradients and the
  optimizer states live on the host; each block is copied to the accelerator for its compute)
fsdp_activation_checkpointing: true or false (true: each transformer block checkpointed)
fsdp_cpu_ram_efficient_loading, fsdp_sync_module_states: any value (set-up is always
  host-side on the main process, networks built on the meta device)
dynamo_config.dynamo_backend: any (each transformer block compiled before sharding)
mixed_precision: no or bf16"""


def check_accelerate_options(accelerator: Accelerator) -> None:
    """Refuse, at start, accelerate options this run would otherwise ignore or get wrong: one
    message naming the config key, its value and what is supported (see
    :data:`SUPPORTED_FSDP_OPTIONS`)."""

    def refuse(key: str, value: Any, expected: str) -> None:
        raise ValueError(
            f"accelerate config {key}: {value} is not supported by this training script; "
            f"expected {expected}. Supported FSDP options:\n{SUPPORTED_FSDP_OPTIONS}"
        )

    if accelerator.mixed_precision == "fp16":
        # One GradScaler cannot serve the student's and the fake score's optimizers, whose
        # steps alternate; bf16 needs no loss scaling.
        refuse(
            "mixed_precision (or --mixed_precision)",
            "fp16",
            "bf16 (same memory, no loss scaling) or no",
        )
    if accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    ):
        refuse("distributed_type", accelerator.distributed_type, "MULTI_GPU (DDP) or FSDP")
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        refuse("fsdp_config.fsdp_version", plugin.fsdp_version, "2")
    policy = getattr(plugin.auto_wrap_policy, "__name__", plugin.auto_wrap_policy)
    if policy != "transformer_auto_wrap_policy":
        name = "NO_WRAP" if policy is None else policy
        refuse("fsdp_config.fsdp_auto_wrap_policy", name, "TRANSFORMER_BASED_WRAP")
    if plugin.reshard_after_forward is not True:
        refuse(
            "fsdp_config.fsdp_reshard_after_forward (fsdp_sharding_strategy)",
            plugin.reshard_after_forward,
            "true (FULL_SHARD)",
        )
    state_dict_type = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
    if state_dict_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        refuse(
            "fsdp_config.fsdp_state_dict_type",
            state_dict_type,
            "SHARDED_STATE_DICT or FULL_STATE_DICT",
        )
    if plugin.ignored_modules is not None:
        refuse("fsdp_config.fsdp_ignored_modules", plugin.ignored_modules, "none (all sharded)")
    if getattr(plugin, "activation_checkpointing_offload", False):
        refuse("fsdp_config.fsdp_activation_checkpointing_offload", "true", "false")


@dataclass
class PreparedNetworks:
    """The networks as the loop uses them, and what accelerate prepared.

    ``student`` / ``fake_score`` / ``teacher`` / ``discriminator`` are what the DMD pipeline
    calls. ``sync_module[role]`` is the prepared module holding that role's trained weights
    (for ``no_sync``).
    """

    student: nn.Module
    fake_score: nn.Module
    teacher: nn.Module
    discriminator: nn.Module | None
    optimizers: dict[str, Any]
    schedulers: dict[str, Any]
    sync_module: dict[str, nn.Module] = field(default_factory=dict)
    fsdp2: bool = False
    sharded: list[nn.Module] = field(default_factory=list)

    def reshard(self) -> None:
        """Put every FSDP2 unit back in its sharded state (a no-op without FSDP2).

        The root units stay gathered after a forward that no backward follows (a frozen or
        no-grad pass); while gathered, ``named_parameters()`` yields full tensors, not the
        shards the optimizers, the EMA and the state dicts work on. Called after every
        iteration and before validation and export.
        """
        from torch.distributed.fsdp import FSDPModule

        for base in self.sharded:
            for module in base.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def prepare_networks(
    accelerator: Accelerator,
    nets: DMDNetworks,
    make_optimizer: Callable[[str, list[nn.Parameter]], torch.optim.Optimizer],
    make_scheduler: Callable[[str, torch.optim.Optimizer], Any],
    discriminator: nn.Module | None = None,
) -> PreparedNetworks:
    """Prepare every network with accelerate: DDP (default) or FSDP2 (see the module docstring).

    ``make_optimizer(role, params)`` / ``make_scheduler(role, optimizer)`` build the optimizer
    and LR schedule of each trained role (``"student"``, ``"fake_score"``, and
    ``"discriminator"`` when given) over that network's ``parameters()`` (a LoRA view: its
    adapter's weights). Under FSDP2 they are called after sharding, over the sharded
    parameters.
    """
    networks = {"student": nets.student, "fake_score": nets.fake_score}
    if discriminator is not None:
        networks["discriminator"] = discriminator
    if not is_fsdp2(accelerator):
        return _prepare_ddp(accelerator, nets, networks, make_optimizer, make_scheduler)
    return _prepare_fsdp2(accelerator, nets, networks, make_optimizer, make_scheduler)


def _prepare_ddp(accelerator, nets, networks, make_optimizer, make_scheduler) -> PreparedNetworks:
    prepared, opts, scheds = {}, {}, {}
    for role, model in networks.items():
        opt = make_optimizer(role, list(model.parameters()))
        prepared[role], opts[role], scheds[role] = accelerator.prepare(
            model, opt, make_scheduler(role, opt)
        )
    return PreparedNetworks(
        student=prepared["student"],
        fake_score=prepared["fake_score"],
        teacher=nets.teacher,
        discriminator=prepared.get("discriminator"),
        optimizers=opts,
        schedulers=scheds,
        sync_module=dict(prepared),
    )


def _base_of(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, AdapterRole) else model


def _initial_weights(nets: DMDNetworks, networks: dict[str, nn.Module], base: nn.Module):
    """The main process's full weights for ``base``: from the networks' ``initial_weights``
    (built on the meta device, :func:`~fastgen_diffusers.lora.build_dmd_networks`), else the
    module's own (a network built with its weights, e.g. the discriminator). Captured before
    sharding replaces the parameters."""
    roles = {"teacher": nets.teacher, **networks}
    for role, net in roles.items():
        if _base_of(net) is base and nets.initial_weights and role in nets.initial_weights:
            return nets.initial_weights[role]
    if any(t.is_meta for t in [*base.parameters(), *base.buffers()]):
        raise ValueError(
            f"{type(base).__name__} is on the meta device and no weights were given for it: "
            "build the networks with build_dmd_networks(..., source=<the loaded teacher>)"
        )
    return {**dict(base.named_buffers()), **base.state_dict()}


def _prepare_fsdp2(accelerator, nets, networks, make_optimizer, make_scheduler) -> PreparedNetworks:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    # Every network is built on the meta device (the main process also holds the teacher's
    # weights on the host): load_from_rank0 fills every rank's shards after sharding.
    # (accelerate's own cpu_ram_efficient_loading assumes every state-dict entry is sharded,
    # which a persistent buffer such as SD3's positional table is not.)
    plugin.cpu_ram_efficient_loading = False
    offload = _offload_policy(accelerator, plugin)
    # Offloaded shards must be materialised on the host (FSDP2 copies each unit to the
    # accelerator for its forward / backward); buffers are not FSDP's and stay on the device.
    shard_device = torch.device("cpu") if offload else accelerator.device
    main = accelerator.is_main_process
    bases = {id(_base_of(m)): _base_of(m) for m in [nets.teacher, *networks.values()]}
    for base in bases.values():
        source = _initial_weights(nets, networks, base) if main else None
        full_precision = base is networks.get("discriminator")
        _before_sharding(accelerator, plugin, base)
        with _wrapping(plugin, base), _precision(plugin, full_precision):
            fsdp2_prepare_model(accelerator, base)
        if offload:
            # Buffers on the device before load_from_rank0 broadcasts them (NCCL sends device
            # tensors only).
            if any(t.is_meta for t in [*base.parameters(), *base.buffers()]):
                base.to_empty(device=shard_device)
            _buffers_to(base, accelerator.device)
        load_from_rank0(base, source, device=shard_device)
        del source
        # Blocks reshard after each forward; the root unit (embeddings, output head) stays
        # gathered as accelerate sets it: a GAN loss backpropagates through the frozen
        # teacher's blocks and root without ever reaching the root's output, so the root would
        # never be gathered again for that backward.
    nets.initial_weights = None  # the host copy is freed with its last reference

    # Optimizers over the sharded parameters, made only now: materialising a meta-device
    # module replaces its parameters. accelerate takes the (already sharded) model with each
    # optimizer, and saves optimizer i with model i: a base carrying two optimizers is listed
    # once per optimizer (and its checkpoint written twice).
    opts, scheds, sync = {}, {}, {}
    for role, model in networks.items():
        base = sync[role] = _base_of(model)
        opt = make_optimizer(role, list(model.parameters()))
        groups = [list(group["params"]) for group in opt.param_groups]
        with _wrapping(plugin, base), _no_accelerate_compile(accelerator):
            _, opts[role], scheds[role] = accelerator.prepare(base, opt, make_scheduler(role, opt))
        # accelerate re-finds each parameter by its shard's data pointer, which every empty
        # shard (a 1-element bias on rank 1) shares: the parameters are already the right ones.
        for group, params in zip(opt.param_groups, groups):
            group["params"] = params
        models, optimizers = accelerator_models_and_optimizers(accelerator)
        if len(models) < len(optimizers):
            models.append(base)  # accelerate drops a repeat of the last model
    return PreparedNetworks(
        student=nets.student,
        fake_score=nets.fake_score,
        teacher=nets.teacher,
        discriminator=networks.get("discriminator"),
        optimizers=opts,
        schedulers=scheds,
        sync_module=sync,
        fsdp2=True,
        sharded=list(bases.values()),
    )


def _offload_policy(accelerator: Accelerator, plugin: Any) -> bool:
    """Whether ``fsdp_offload_params`` is on. Without an accelerator the policy keeps its
    shards in ordinary host memory: page-locking needs an accelerator (and only speeds up copies
    to one)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    policy = plugin.cpu_offload
    if not isinstance(policy, CPUOffloadPolicy):
        return False
    if policy.pin_memory and accelerator.device.type == "cpu":
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    return True


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s buffers (not its parameters) to ``device``."""
    for sub in module.modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                setattr(sub, name, buffer.to(device))  # stays a (persistent) buffer


# -- gathering ------------------------------------------------------------------------------------


def full_state_dict(module: nn.Module, *, main_process: bool) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with sharded tensors gathered, on the CPU of the main process
    (empty elsewhere). Collective under FSDP2: every rank calls it, one tensor at a time, so
    no rank holds more than one gathered tensor beyond the main process's result."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if main_process:
            out[name] = value.detach().to("cpu", copy=True)
    return out
