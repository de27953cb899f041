"""Atomic, rotated training checkpoints that hold only what trains and load without unpickling.

A checkpoint folder ``checkpoint-<step>`` holds:

- ``state/*.safetensors``: every trained tensor, written with ``torch.distributed.checkpoint``
  (DCP) in safetensors files, one per rank, each header recording where its shards sit in the
  global tensors: the trainable parameters of each trained network (a LoRA role: its adapter;
  a full student / fake score: all of it; the discriminator), their optimizer states keyed by
  parameter name, and the student EMA (a ``local_shard`` EMA as the global tensor its shards
  form). A frozen base is never written. DCP reshards on load, so a checkpoint resumes on any
  number of ranks.
- ``trainer_state.json``: the iteration, the data order, optimizer hyperparameters, learning-rate
  schedules, the fp16 gradient scaler and the random-number generators (every rank draws the
  same numbers, so rank 0's state serves any rank count).
- ``run.json`` (:mod:`.run_record`) and the ``COMPLETE`` marker.
- the student as the final output is written (:func:`~.export.write_student`):
  ``transformer/`` or ``pytorch_lora_weights.safetensors`` (EMA weights when the recipe has an
  EMA) and ``scheduler/``, so the stock pipeline loads any checkpoint. Resuming ignores them.

Nothing is unpickled on load: safetensors headers and JSON only (DCP's own ``.metadata`` file
is a pickle, so its safetensors storage is used instead).

A checkpoint is written to ``<output_dir>/.checkpoint-<step>.tmp``, completed with the marker
and only then renamed to ``checkpoint-<step>``; one being replaced or rotated out is first
renamed out of the visible names (:func:`~fastgen_diffusers.io.remove_directory`), so
``latest`` never sees one half-written or half-deleted.

Example::

    save_checkpoint(run, trainer, progress, total_limit=3)
    path = resolve_resume("latest", "out")  # Path("out/checkpoint-500") or None
    load_checkpoint(run, trainer, progress, path)
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import TMP_PREFIX, atomic_file, commit_directory, remove_directory, write_json_atomic
from .state import Progress, Run, Trainer

__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_step",
    "complete_checkpoints",
    "load_checkpoint",
    "remove_stale_temporaries",
    "resolve_resume",
    "save_checkpoint",
    "trained_tensors",
    "truncate_loss_log",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE_CHECKPOINT = re.compile(r"^\.checkpoint-\d+\.tmp$")
_STRIP = ("_checkpoint_wrapped_module.", "_orig_mod.")
# A temporary in a cache folder other runs may share is only removed once it is this old.
SHARED_TMP_AGE_S = 3600.0


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


# -- what is saved --------------------------------------------------------------------------------


def _clean(name: str) -> str:
    for prefix in _STRIP:
        name = name.replace(prefix, "")
    return name


def _networks(run: Run, trainer: Trainer) -> dict[str, nn.Module]:
    """The trained networks by role, outside any DDP wrapper (FSDP2 modules keep their
    parameter names)."""
    roles = ["student", "fake_score"] + (
        ["discriminator"] if trainer.prepared.discriminator else []
    )
    return {role: run.accelerator.unwrap_model(trainer.module(role)) for role in roles}


def _trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # A LoRA role's parameters() are its adapter's only; a full network's are all trainable.
    return [(_clean(n), p) for n, p in net.named_parameters() if p.requires_grad]


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _inner_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler inside accelerate's wrapper."""
    return getattr(scheduler, "scheduler", scheduler)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a checkpoint's JSON")


def _optimizer_entries(
    role: str, optimizer: Any, params: list[tuple[str, nn.Parameter]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state tensors keyed ``<role>.optim/<param name>/<key>`` and its
    hyperparameters and per-parameter layout as JSON."""
    inner = _inner(optimizer)
    names = {id(p): n for n, p in params}
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    groups = []
    for group in inner.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"the {role} optimizer holds a parameter the {role} does not train"
                )
            name = names[id(p)]
            group_names.append(name)
            entry: dict[str, Any] = {}
            for key, value in inner.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{role}.optim/{name}/{key}"] = value
                    like_param = tuple(value.shape) == tuple(p.shape) and value.dim() > 0
                    entry[key] = {
                        "tensor": "param" if like_param else list(value.shape),
                        "dtype": str(value.dtype).removeprefix("torch."),
                        "cpu": value.device.type == "cpu" and p.device.type != "cpu",
                    }
                else:
                    entry[key] = {"value": _jsonable(value)}
            if entry:
                layout[name] = entry
        groups.append(
            {**{k: _jsonable(v) for k, v in group.items() if k != "params"}, "params": group_names}
        )
    return tensors, {"param_groups": groups, "state": layout}


def trained_tensors(run: Run, trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the trained networks, keyed ``<role>/<name>`` (DTensors
    under FSDP2): what a checkpoint stores of the networks themselves."""
    return {
        f"{role}/{name}": p.detach()
        for role, net in _networks(run, trainer).items()
        for name, p in _trainable(net)
    }


def _state(run: Run, trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = trained_tensors(run, trainer)
    optimizers = {}
    for role, net in _networks(run, trainer).items():
        opt_tensors, optimizers[role] = _optimizer_entries(
            role, trainer.prepared.optimizers[role], _trainable(net)
        )
        tensors.update(opt_tensors)
    ema = trainer.dmd.ema
    if ema is not None:
        student = _networks(run, trainer)["student"]
        tensors.update({f"ema/{k}": v for k, v in ema.checkpoint_tensors(student).items()})
    return tensors, {"optimizers": optimizers}


# -- random-number generators ---------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": bytes(torch.get_rng_state().tolist()).hex(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = bytes(torch.cuda.get_rng_state().tolist()).hex()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(list(bytes.fromhex(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.tensor(list(bytes.fromhex(state["cuda"])), dtype=torch.uint8)
        )


# -- saving ---------------------------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier(run: Run) -> None:
    run.accelerator.wait_for_everyone()


def save_checkpoint(
    run: Run,
    trainer: Trainer,
    progress: Progress,
    total_limit: int | None = None,
    run_record: dict[str, Any] | None = None,
    export: Callable[[Path], object] | None = None,
) -> Path:
    """Save the training state at ``progress.step`` as ``checkpoint-<step>`` (collective:
    every rank calls it, each writing its shards); keep the newest ``total_limit``. ``export``
    is called on every rank with the checkpoint's temporary folder, before it is marked
    complete: it writes the loadable student there."""
    import torch.distributed.checkpoint as dcp

    accelerator, step = run.accelerator, progress.step
    root = run.output_dir
    tmp = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if run.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        (tmp / STATE_DIR).mkdir(parents=True)
    _barrier(run)
    trainer.prepared.reshard()  # the optimizers and the EMA work on the shards
    tensors, meta = _state(run, trainer)
    dcp.save(
        tensors,
        storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True),
        no_dist=not _distributed(),
    )
    if run.is_main:
        ema = trainer.dmd.ema
        scaler = accelerator.scaler
        trainer_state = {
            "step": step,
            "world_size": accelerator.num_processes,
            "data_order": progress.data_order.state_dict(),
            "optimizers": meta["optimizers"],
            "schedulers": {
                role: _jsonable(_inner_scheduler(s).state_dict())
                for role, s in trainer.prepared.schedulers.items()
            },
            "grad_scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
            "ema": None if ema is None else {"initialized": ema.initialized},
            "rng": _rng_state(),
        }
        with atomic_file(tmp / TRAINER_STATE) as f:  # compact: RNG states are long lists
            json.dump(trainer_state, f, separators=(",", ":"))
        if run_record is not None:
            write_json_atomic(tmp / "run.json", run_record)
    if export is not None:
        export(tmp)
    _barrier(run)
    if run.is_main:
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        commit_directory(tmp, final)  # a same-step checkpoint is swapped out whole
        if total_limit is not None:
            for _, old in complete_checkpoints(root)[:-total_limit]:
                remove_directory(old)  # renamed out of the visible names, then deleted
    _barrier(run)
    return final


# -- loading --------------------------------------------------------------------------------------


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (newest complete one in
    ``output_dir``, or ``None`` when there is none) or an explicit checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r}: no such folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume!r} is incomplete (no {COMPLETE_MARKER} marker: the "
            "save was interrupted); pick another checkpoint or 'latest'"
        )
    return path


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint folder was saved at."""
    return int((Path(path) / COMPLETE_MARKER).read_text().strip())


def _optimizer_template(
    role: str, layout: dict[str, Any], params: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    out = {}
    for name, entry in layout.items():
        if name not in params:
            raise ValueError(f"the checkpoint's {role} optimizer has state for unknown {name!r}")
        p = params[name]
        for key, spec in entry.items():
            if "tensor" not in spec:
                continue
            dtype = getattr(torch, spec["dtype"])
            if spec["tensor"] == "param":
                out[f"{role}.optim/{name}/{key}"] = torch.zeros_like(p.detach(), dtype=dtype)
            else:
                device = "cpu" if spec["cpu"] or p.device.type == "cpu" else p.device
                out[f"{role}.optim/{name}/{key}"] = torch.zeros(
                    spec["tensor"], dtype=dtype, device=device
                )
    return out


def _load_optimizer(
    role: str,
    optimizer: Any,
    saved: dict[str, Any],
    params: dict[str, nn.Parameter],
    tensors: dict[str, torch.Tensor],
) -> None:
    inner = _inner(optimizer)
    current = inner.state_dict()
    index, i = {}, 0
    for group in inner.param_groups:
        for p in group["params"]:
            index[id(p)] = i
            i += 1
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(current["param_groups"]):
        raise ValueError(
            f"the checkpoint's {role} optimizer has {len(saved_groups)} parameter groups, this "
            f"run's {len(current['param_groups'])}"
        )
    state = {}
    for name, entry in saved["state"].items():
        state[index[id(params[name])]] = {
            key: tensors[f"{role}.optim/{name}/{key}"] if "tensor" in spec else spec["value"]
            for key, spec in entry.items()
        }
    groups = []
    for now, before in zip(current["param_groups"], saved_groups):
        if sorted(before["params"]) != sorted(
            n for n, p in params.items() if index[id(p)] in now["params"]
        ):
            raise ValueError(f"the checkpoint's {role} optimizer trains other parameters")
        merged = dict(now)
        for key, value in before.items():
            if key == "params":
                continue
            if isinstance(now.get(key), torch.Tensor):  # e.g. torchao's AdamW8bit keeps lr so
                merged[key] = torch.tensor(value, dtype=now[key].dtype, device=now[key].device)
            else:
                merged[key] = tuple(value) if isinstance(now.get(key), tuple) else value
        groups.append(merged)
    inner.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(run: Run, trainer: Trainer, progress: Progress, path: str | os.PathLike) -> int:
    """Restore what :func:`save_checkpoint` wrote into this run's networks, optimizers,
    schedules, EMA, data order, counter and random generators, on any number of ranks;
    returns the step. Reads safetensors and JSON only."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    saved = json.loads((path / TRAINER_STATE).read_text())
    trainer.prepared.reshard()
    networks = _networks(run, trainer)
    tensors = trained_tensors(run, trainer)
    params = {role: dict(_trainable(net)) for role, net in networks.items()}
    for role in networks:
        tensors.update(_optimizer_template(role, saved["optimizers"][role]["state"], params[role]))
    ema = trainer.dmd.ema
    ema_tensors = ema.checkpoint_tensors(networks["student"]) if ema is not None else {}
    tensors.update({f"ema/{k}": v for k, v in ema_tensors.items()})
    try:
        dcp.load(
            tensors,
            storage_reader=dcp.HuggingFaceStorageReader(str(path / STATE_DIR)),
            no_dist=not _distributed(),
        )
    except dcp.api.CheckpointException as err:
        reasons = {str(v[0] if isinstance(v, tuple) else v) for v in err.failures.values()}
        raise ValueError(
            f"{path / STATE_DIR} cannot be read as this run's checkpoint: {'; '.join(reasons)}"
        ) from err
    for role in networks:
        _load_optimizer(
            role,
            trainer.prepared.optimizers[role],
            saved["optimizers"][role],
            params[role],
            tensors,
        )
        _inner_scheduler(trainer.prepared.schedulers[role]).load_state_dict(
            saved["schedulers"][role]
        )
    if ema is not None and saved["ema"] and saved["ema"]["initialized"]:
        loaded = {k: tensors[f"ema/{k}"] for k in ema_tensors}
        ema.load_state_dict(ema.local_tensors(loaded))
    if run.accelerator.scaler is not None and saved.get("grad_scaler"):
        run.accelerator.scaler.load_state_dict(saved["grad_scaler"])
    progress.data_order.load_state_dict(saved["data_order"])
    progress.counter.load_state_dict({"step": saved["step"]})
    _set_rng_state(saved["rng"])
    return int(saved["step"])


# -- clean starts ---------------------------------------------------------------------------------


def remove_stale_temporaries(output_dir: Path, shared_dirs: list[Path] = ()) -> list[Path]:
    """Remove what killed runs left half-written: ``.checkpoint-<step>.tmp`` folders and
    ``.tmp-*`` siblings (exports, rotated-out checkpoints) in ``output_dir`` and its ``cache``
    folder, and ``.tmp-*`` entries older than :data:`SHARED_TMP_AGE_S` in ``shared_dirs``
    (caches other runs may be writing to now). Call on the main process before anything else
    writes. Returns what was removed."""
    removed = []
    now = time.time()
    candidates = [(output_dir, 0.0), (output_dir / "cache", 0.0)]
    candidates += [(Path(d), SHARED_TMP_AGE_S) for d in shared_dirs]
    for folder, min_age in candidates:
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if not (child.name.startswith(TMP_PREFIX) or _STALE_CHECKPOINT.match(child.name)):
                continue
            try:
                if now - child.lstat().st_mtime < min_age:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            except FileNotFoundError:
                continue
            removed.append(child)
    for child in removed:
        logger.info("Removed %s, left by an interrupted run", child)
    return removed


def truncate_loss_log(loss_log: Path, step: int) -> None:
    """Keep the rows of ``logs/losses.jsonl`` up to iteration ``step`` (a resumed run writes
    the later ones again), atomically."""
    from ..io import write_text_atomic

    if not loss_log.is_file():
        return
    kept = []
    for line in loss_log.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line)
    write_text_atomic(loss_log, "".join(line + "\n" for line in kept))
