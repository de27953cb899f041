"""An on-disk cache of what the frozen encoders produce for the training data.

The text encoders and the VAE are frozen, so their outputs only need computing once per dataset:
:func:`build_cache` runs them over every sample, stores the results under
``cache_dir/<fingerprint>/`` and returns a :class:`CachedDataset` that reads them back. The caller
can then free the encoders before training. A second run with the same inputs reuses the cache
without calling the encoders; any change of model, resolution, negative prompt or data gives a
new fingerprint, hence a new cache.

Example::

    from fastgen_diffusers.training.cache import CacheSettings, build_cache
    from fastgen_diffusers.training.data import load_training_dataset
    from fastgen_diffusers.training.data_order import ResumableRandomSampler

    dataset = load_training_dataset("prompts.jsonl")  # or a Hub name, or an image folder
    settings = CacheSettings(
        model=model_id, revision=revision, family="sd3", height=1024, width=1024,
        max_sequence_length=256, dtype="torch.bfloat16", negative_prompt="",
        needs_media=False,  # True: also cache VAE latents of the images / videos
    )
    cached = build_cache(
        dataset,
        settings,
        cache_dir="cache",
        encode_prompts=lambda prompts: {"encoder_hidden_states": ..., "pooled_projections": ...},
        encode_media=None,  # with needs_media: pixels [B, 3, H, W] in [-1, 1] -> VAE latents
        batch_size=8,
    )
    del text_encoders, vae  # nothing reads them any more
    sampler = ResumableRandomSampler(len(cached), seed=0)
    batch = cached.collate([cached[i] for i in sampler.take(4)])
    batch["cond"]["encoder_hidden_states"]  # [4, L, D]; cached.negative has batch size 1
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import operator
import os
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..compat import dataset_fingerprint
from ..io import TMP_PREFIX, atomic_directory, remove_directory, write_json_atomic
from .data import (
    IMAGE_COLUMN,
    PROMPT_COLUMN,
    VIDEO_COLUMN,
    _as_hw,
    _media_column,
    _pixels,
)
from .errors import UserError

__all__ = ["CacheSettings", "CachedDataset", "EmbeddingCache", "build_cache", "cache_fingerprint"]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.safetensors"


# -- the embedding cache -------------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    # repr() of arbitrary objects may hold memory addresses: the fingerprint would never repeat.
    raise TypeError(
        f"{where} is a {type(value).__name__}; fingerprint values must be str, int, float, bool, "
        "None, paths, torch dtypes / devices, or lists / dicts of them"
    )


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides the rows that the cached tensors depend on; every field goes into the
    cache's fingerprint, so changing any of them gives a new cache.

    ``model`` / ``revision`` / ``variant`` / ``family`` / ``dtype`` / ``max_sequence_length``
    name the encoders and how they run; ``height`` / ``width`` / ``num_frames`` the media
    preprocessing (``None`` when only prompts are cached); ``negative_prompt`` is encoded once
    (``None``: none); ``needs_media``: the images / videos are encoded to latents too (then
    ``build_cache`` needs ``encode_media``, and ``height`` and ``width``);
    ``condition_image``: each row's image (a video's first frame) is encoded into per-sample
    conditioning (image-to-video; ``build_cache`` needs ``encode_condition``).

    Example::

        settings = CacheSettings(model="stabilityai/stable-diffusion-3.5-medium", family="sd3",
                                 height=1024, width=1024, max_sequence_length=256,
                                 dtype="torch.bfloat16", needs_media=True)
    """

    model: str
    revision: str | None = None
    variant: str | None = None
    family: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    max_sequence_length: int | None = None
    dtype: str | torch.dtype | None = None
    negative_prompt: str | None = ""
    needs_media: bool = False
    condition_image: bool = False

    def __post_init__(self) -> None:
        self.fingerprint_parts()  # refuse values that cannot be fingerprinted, here
        if (self.height is None) != (self.width is None):
            raise ValueError(
                f"height and width are given together or not at all, got height={self.height} "
                f"and width={self.width}"
            )
        if self.height is not None:
            _as_hw((self.height, self.width))
        if (self.needs_media or self.condition_image) and self.height is None:
            raise ValueError(
                "resolution (height and width) is required to encode images or videos "
                f"(needs_media={self.needs_media}, condition_image={self.condition_image}), "
                "got None"
            )

    @property
    def resolution(self) -> tuple[int, int] | None:
        """``(height, width)`` the media are preprocessed to, or ``None``."""
        return None if self.height is None else (self.height, self.width)

    def fingerprint_parts(self) -> dict[str, Any]:
        """The fields as JSON values (dtypes and paths as strings)."""
        fields = dataclasses.asdict(self)
        if not fields["condition_image"]:
            del fields["condition_image"]  # caches built before the field existed stay valid
        return _jsonable(fields, "fingerprint_parts")


def _fingerprint_inputs(dataset: datasets.Dataset, settings: CacheSettings) -> dict[str, Any]:
    if not isinstance(settings, CacheSettings):
        raise TypeError(f"settings must be a CacheSettings, got {type(settings).__name__}")
    return {
        "format": CACHE_FORMAT_VERSION,
        "dataset": dataset_fingerprint(dataset),
        "num_rows": len(dataset),
        "settings": settings.fingerprint_parts(),
    }


def cache_fingerprint(dataset: datasets.Dataset, settings: CacheSettings) -> str:
    """sha256 (hex) of everything a cache's content depends on: every field of ``settings``,
    the dataset's own fingerprint (which follows its files and selections) and its row count.
    """
    return _hash(_fingerprint_inputs(dataset, settings))


def _hash(inputs: Mapping[str, Any]) -> str:
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _to_cpu(value: Any, name: str, batch: int, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what} returned {type(value).__name__} for {name!r}; expected a tensor with the "
            "batch as first dim (pad to a fixed length with a mask instead of returning None)"
        )
    if value.dim() == 0 or value.shape[0] != batch:
        raise ValueError(
            f"{what} returned {name!r} of shape {tuple(value.shape)} for {batch} samples; "
            "expected the batch as first dim"
        )
    return value.detach().to("cpu").contiguous()


class _Spec:
    """Per-sample shape and dtype of every cached tensor: all batches must agree, so that cached
    samples stack into any batch."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def check(self, tensors: Mapping[str, torch.Tensor], what: str, rows: str) -> None:
        if not self.entries:
            self.entries = {k: (tuple(v.shape[1:]), v.dtype) for k, v in tensors.items()}
            return
        if set(tensors) != set(self.entries):
            raise ValueError(
                f"{what} returned keys {sorted(tensors)} for {rows}, but {sorted(self.entries)} "
                "before"
            )
        for key, value in tensors.items():
            got, expected = (tuple(value.shape[1:]), value.dtype), self.entries[key]
            if got != expected:
                raise ValueError(
                    f"{what} returned {key!r} with per-sample shape {got[0]} and {got[1]} for "
                    f"{rows}, but {expected[0]} and {expected[1]} before: cached samples must "
                    "share a shape (pad prompts to a fixed max_sequence_length)"
                )

    def to_json(self) -> dict[str, Any]:
        return {k: {"shape": list(s), "dtype": str(d)} for k, (s, d) in self.entries.items()}


class EmbeddingCache:
    """The cache directory ``cache_dir/<fingerprint>/`` of one set of inputs.

    Layout: ``shard-00000.safetensors``, ... (tensors ``cond.<key>`` and ``latents``, the batch
    first), ``negative.safetensors`` and ``index.json`` (prompts, shard ranges, shapes, the
    fingerprint's inputs). Built in a temporary sibling directory and renamed into place when
    complete, so a directory named by a fingerprint is always a whole cache.
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.root = Path(cache_dir)
        self.fingerprint = fingerprint
        self.path = self.root / fingerprint

    def exists(self) -> bool:
        return (self.path / INDEX_FILE).is_file()

    def load(self) -> CachedDataset:
        return CachedDataset(self.path)

    def build(
        self,
        dataset: datasets.Dataset,
        settings: CacheSettings,
        *,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        encode_media: Callable[[torch.Tensor], torch.Tensor] | None = None,
        encode_condition: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
        batch_size: int = 8,
        samples_per_shard: int = 1024,
        inputs: Mapping[str, Any] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> CachedDataset:
        """Run the encoders over ``dataset`` and write the cache; returns it loaded.

        With ``num_processes > 1`` (every rank calls it; ``torch.distributed`` initialised),
        rank ``process_index`` encodes only its contiguous share of the batches and writes it
        to a part folder; the main rank assembles the parts into the cache (files moved, not
        copied). ``cache_dir`` must then be on a file system every rank sees."""
        if batch_size < 1 or samples_per_shard < 1:
            raise ValueError(
                f"batch_size and samples_per_shard must be >= 1, got {batch_size} and "
                f"{samples_per_shard}"
            )
        if not 0 <= process_index < num_processes:
            raise ValueError(
                f"process_index must be in [0, num_processes={num_processes}), got {process_index}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        write = functools.partial(
            self._write_part,
            dataset=dataset,
            encode_prompts=encode_prompts,
            encode_media=encode_media if settings.needs_media else None,
            encode_condition=encode_condition if settings.condition_image else None,
            batch_size=batch_size,
            resolution=settings.resolution,
            num_frames=settings.num_frames,
            samples_per_shard=samples_per_shard,
        )
        negative_prompt = settings.negative_prompt
        if num_processes == 1:
            # Renamed into place only when whole; another process finishing the same cache
            # first wins (its content is the same).
            with atomic_directory(self.path, overwrite=False) as tmp:
                part = write(tmp, process_index=0, num_processes=1)
                negative = self._write_negative(tmp, encode_prompts, negative_prompt, part)
                self._write_index(tmp, part, negative, inputs)
                if self.path.is_dir() and not self.exists():
                    # Not written by `build` (which renames only whole caches): stale.
                    remove_directory(self.path)
            return self.load()
        parts_dir = self.root / f"{TMP_PREFIX}parts-{self.fingerprint}"

        def write_mine() -> None:
            parts_dir.mkdir(exist_ok=True)
            with atomic_directory(parts_dir / _part_name(process_index)) as tmp:
                part = write(tmp, process_index=process_index, num_processes=num_processes)
                write_json_atomic(tmp / PART_FILE, part)

        def discard() -> None:  # a failed build leaves no parts behind
            if process_index == 0:
                remove_directory(parts_dir)

        _collectively("encoding its share of the embedding cache", write_mine, discard)

        def assemble() -> None:
            if process_index == 0:
                self._assemble(parts_dir, num_processes, encode_prompts, negative_prompt, inputs)

        _collectively("assembling the embedding cache", assemble, discard)
        return self.load()

    def _assemble(
        self,
        parts_dir: Path,
        num_processes: int,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        negative_prompt: str | None,
        inputs: Mapping[str, Any] | None,
    ) -> None:
        """The ranks' parts (read in rank order) moved into one cache folder, then removed."""
        parts = []
        for rank in range(num_processes):
            folder = parts_dir / _part_name(rank)
            if not (folder / PART_FILE).is_file():
                raise FileNotFoundError(
                    f"rank {rank}'s share of the embedding cache is not in {folder}: every rank "
                    "must see the same cache folder (a shared file system); set "
                    "--embedding_cache_dir to such a folder"
                )
            parts.append((folder, json.loads((folder / PART_FILE).read_text(encoding="utf-8"))))
        with atomic_directory(self.path, overwrite=False) as tmp:
            merged: list[dict[str, Any]] = []
            for folder, part in parts:
                for shard in part["shards"]:
                    name = f"shard-{len(merged):05d}.safetensors"
                    os.replace(folder / shard["file"], tmp / name)
                    merged.append({**shard, "file": name})
            whole = {
                "shards": merged,
                "prompts": [p for _, part in parts for p in part["prompts"]],
                "cond": _one_spec([part["cond"] for _, part in parts], "encode_prompts"),
                "latents": _one_spec([part["latents"] for _, part in parts], "encode_media"),
                "condition": _one_spec(
                    [part["condition"] for _, part in parts], "encode_condition"
                ),
            }
            negative = self._write_negative(tmp, encode_prompts, negative_prompt, whole)
            self._write_index(tmp, whole, negative, inputs)
            if self.path.is_dir() and not self.exists():
                remove_directory(self.path)
        remove_directory(parts_dir)

    def _write_part(
        self,
        out: Path,
        *,
        dataset: datasets.Dataset,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        encode_media: Callable[[torch.Tensor], torch.Tensor] | None,
        encode_condition: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None,
        batch_size: int,
        resolution: tuple[int, int] | None,
        num_frames: int | None,
        samples_per_shard: int,
        process_index: int,
        num_processes: int,
    ) -> dict[str, Any]:
        """Encode this rank's share into shard files in ``out``: a contiguous run of whole
        batches (the same batches one process encodes, so the same values). Returns the
        shards (global sample ranges), prompts and per-sample specs."""
        with_media = encode_media is not None or encode_condition is not None
        media = _media_column(dataset) if with_media else None
        # Read only what is encoded: media turned into neither latents nor an image condition
        # are never decoded.
        rows = dataset.select_columns([PROMPT_COLUMN] + ([media] if media else []))
        if media is not None and isinstance(
            dataset.features[media], (datasets.Image, datasets.Video)
        ):
            # Decode here rather than in `datasets`, so that errors can name the row and file.
            feature = datasets.Image if media == IMAGE_COLUMN else datasets.Video
            rows = rows.cast_column(media, feature(decode=False))

        n = len(rows)
        num_batches = -(-n // batch_size)
        first = num_batches * process_index // num_processes * batch_size
        end = min(n, num_batches * (process_index + 1) // num_processes * batch_size)
        cond_spec, latent_spec, condition_spec = _Spec(), _Spec(), _Spec()
        prompts: list[str] = []
        shards: list[dict[str, Any]] = []
        pending: dict[str, list[torch.Tensor]] = {}
        pending_start = first

        def flush(stop: int) -> None:
            nonlocal pending, pending_start
            if stop == pending_start:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({k: torch.cat(v) for k, v in pending.items()}, str(out / name))
            shards.append({"file": name, "start": pending_start, "stop": stop})
            pending, pending_start = {}, stop

        share = "" if num_processes == 1 else f" (rows {first}..{end - 1} of {n})"
        logger.info("Encoding %d samples into %s%s", end - first, self.path, share)
        for start in range(first, end, batch_size):
            stop = min(end, start + batch_size)
            batch = rows[start:stop]
            texts = list(batch[PROMPT_COLUMN])
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(f"row {start + i}: prompt {text!r} is not a string")
            what = f"rows {start}..{stop - 1}"
            with torch.no_grad():
                cond = encode_prompts(texts)
            if not isinstance(cond, Mapping) or not cond:
                raise TypeError(
                    f"encode_prompts returned {type(cond).__name__}; expected a non-empty dict "
                    "of tensors"
                )
            cond = {k: _to_cpu(v, k, len(texts), "encode_prompts") for k, v in cond.items()}
            cond_spec.check(cond, "encode_prompts", what)
            tensors = {f"cond.{k}": v for k, v in cond.items()}
            if media is not None:
                pixels = torch.stack(
                    [
                        _pixels(value, media, start + i, resolution, num_frames)
                        for i, value in enumerate(batch[media])
                    ]
                )
            if encode_media is not None:
                with torch.no_grad():
                    latents = _to_cpu(encode_media(pixels), "latents", len(texts), "encode_media")
                latent_spec.check({"latents": latents}, "encode_media", what)
                tensors["latents"] = latents
            if encode_condition is not None:
                image = pixels if pixels.ndim == 4 else pixels[:, :, 0]  # a video's first frame
                with torch.no_grad():
                    condition = encode_condition(image)
                condition = {
                    k: _to_cpu(v, k, len(texts), "encode_condition") for k, v in condition.items()
                }
                condition_spec.check(condition, "encode_condition", what)
                clash = set(condition) & set(cond)
                if clash:
                    raise ValueError(
                        f"encode_condition and encode_prompts both returned {sorted(clash)}"
                    )
                tensors.update({f"cond.{k}": v for k, v in condition.items()})
            for key, value in tensors.items():
                pending.setdefault(key, []).append(value)
            prompts.extend(texts)
            if stop - pending_start >= samples_per_shard:
                flush(stop)
        flush(end)
        return {
            "shards": shards,
            "prompts": prompts,
            "cond": cond_spec.to_json(),
            "latents": latent_spec.to_json().get("latents"),
            "condition": condition_spec.to_json() or None,
        }

    def _write_negative(
        self,
        out: Path,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        negative_prompt: str | None,
        part: Mapping[str, Any],
    ) -> bool:
        """Encode the negative prompt (if any) into ``out``; whether there is one."""
        if negative_prompt is None:
            return False
        with torch.no_grad():
            negative = encode_prompts([negative_prompt])
        negative = {k: _to_cpu(v, k, 1, "encode_prompts") for k, v in negative.items()}
        spec = _Spec()
        spec.entries = {
            k: (tuple(v["shape"]), getattr(torch, v["dtype"].removeprefix("torch.")))
            for k, v in part["cond"].items()
        }
        spec.check(negative, "encode_prompts", "the negative prompt")
        save_file(negative, str(out / NEGATIVE_FILE))
        return True

    def _write_index(
        self,
        out: Path,
        part: Mapping[str, Any],
        negative: bool,
        inputs: Mapping[str, Any] | None,
    ) -> None:
        """``index.json`` for the whole cache: ``part`` covers every sample."""
        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_samples": len(part["prompts"]),
            "shards": part["shards"],
            "cond": part["cond"],
            "latents": part["latents"],
            "condition": part["condition"],
            "negative": negative,
            "inputs": dict(inputs or {}),
            "prompts": part["prompts"],
        }
        (out / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")


PART_FILE = "part.json"


def _part_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def _one_spec(specs: Sequence[Any], what: str) -> Any:
    """The per-sample spec all ranks' parts agree on (a rank with no rows has none)."""
    given = [s for s in specs if s]
    for spec in given[1:]:
        if spec != given[0]:
            raise ValueError(
                f"{what} returned {spec} on one rank but {given[0]} on another: cached samples "
                "must share a shape and dtype (pad prompts to a fixed max_sequence_length)"
            )
    return given[0] if given else None


def _collectively(what: str, step: Callable[[], None], on_failure: Callable[[], None]) -> None:
    """Run ``step`` on every rank; if it fails anywhere, ``on_failure`` runs and every rank
    raises (the failing rank its own error, the others one naming it) instead of waiting for
    it forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "build_cache with num_processes > 1 needs torch.distributed initialised (accelerate "
            "does this); got none"
        )
    error: Exception | None = None
    try:
        step()
    except Exception as err:  # re-raised below, after telling the others
        error = err
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if any(failure is not None for failure in failures):
        on_failure()
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise RuntimeError(f"rank {rank} failed while {what}: {failure}")


class CachedDataset(torch.utils.data.Dataset):
    """Cached conditioning (and latents) of a dataset, read lazily from the safetensors shards.

    ``dataset[i]`` is ``{"prompt": str, "cond": {key: Tensor}, "latents": Tensor}`` (``latents``
    absent when none were cached), each tensor without the batch dim. ``negative`` holds the
    negative prompt's conditioning with batch size 1 (``None`` without a negative prompt).
    ``collate`` stacks samples into a batch.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path} is not an embedding cache (no {INDEX_FILE})")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._damaged(index_file, err) from err
        if index.get("format") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"cache {self.path} has format {index.get('format')!r}; expected "
                f"{CACHE_FORMAT_VERSION}"
            )
        self.fingerprint: str = index["fingerprint"]
        self.prompts: list[str] = index["prompts"]
        # Image-to-video: the per-row image condition is read with the prompt's conditioning.
        self.cond_keys: list[str] = list(index["cond"]) + list(index.get("condition") or {})
        self.has_latents: bool = index["latents"] is not None
        self.inputs: dict[str, Any] = index["inputs"]
        self._shards: list[dict[str, Any]] = index["shards"]
        self._starts = [shard["start"] for shard in self._shards]
        self.negative: dict[str, torch.Tensor] | None = (
            self._read_negative() if index["negative"] else None
        )
        self._handles: dict[int, Any] = {}
        for shard in range(len(self._shards)):  # headers only: a truncated shard fails here
            self._handle(shard)

    def _damaged(self, file: Path, err: BaseException) -> UserError:
        return UserError(
            f"the embedding cache file {str(file)!r} is damaged ({err})",
            fix=f"delete the cache folder {str(self.path)!r}; the next run rebuilds it",
        )

    def _read_negative(self) -> dict[str, torch.Tensor]:
        file = self.path / NEGATIVE_FILE
        try:
            return load_file(str(file))
        except Exception as err:  # safetensors' own error, or an OSError
            raise self._damaged(file, err) from err

    def _handle(self, shard: int) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            file = self.path / self._shards[shard]["file"]
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:
                raise self._damaged(file, err) from err
            self._handles[shard] = handle
        return handle

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, n = operator.index(index), len(self.prompts)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} cached samples")
        index %= n
        shard = bisect_right(self._starts, index) - 1
        offset = index - self._starts[shard]
        handle = self._handle(shard)

        def read(name: str) -> torch.Tensor:
            return handle.get_slice(name)[offset : offset + 1][0]

        sample: dict[str, Any] = {
            "prompt": self.prompts[index],
            "cond": {key: read(f"cond.{key}") for key in self.cond_keys},
        }
        if self.has_latents:
            sample["latents"] = read("latents")
        return sample

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles do not pickle (DataLoader workers): each process reopens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @staticmethod
    def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"prompt": [str], "cond": {key: [B, ...]}, "latents": [B, ...]}`` from samples."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = {
            "prompt": [s["prompt"] for s in samples],
            "cond": {k: torch.stack([s["cond"][k] for s in samples]) for k in samples[0]["cond"]},
        }
        if "latents" in samples[0]:
            batch["latents"] = torch.stack([s["latents"] for s in samples])
        return batch


def build_cache(
    dataset: datasets.Dataset,
    settings: CacheSettings,
    *,
    cache_dir: str | os.PathLike,
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
    encode_media: Callable[[torch.Tensor], torch.Tensor] | None = None,
    encode_condition: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 8,
    samples_per_shard: int = 1024,
    process_index: int = 0,
    num_processes: int = 1,
) -> CachedDataset:
    """Encode every sample of ``dataset`` once and cache the results on disk.

    ``encode_prompts(prompts)`` returns a dict of tensors with the batch as first dim (e.g.
    ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``), the same keys and
    per-sample shapes for every batch. ``encode_media(pixels)`` (given exactly when
    ``settings.needs_media``) maps ``[B, 3, H, W]`` images (``[B, 3, F, H, W]`` videos) in
    [-1, 1], preprocessed to ``settings.height`` x ``settings.width`` and
    ``settings.num_frames``, to the latents the networks train on (normalised as the family's
    VAE needs). Both run under ``torch.no_grad``; moving inputs to the encoders' device and dtype
    is theirs to do. ``settings.negative_prompt`` (``None``: none) is encoded once into
    :attr:`CachedDataset.negative`.

    ``encode_condition(pixels)`` (given exactly when ``settings.condition_image``;
    image-to-video) maps each row's image ``[B, 3, H, W]`` in [-1, 1] (for a video row: its
    first frame, as preprocessed for the latents) to per-sample conditioning, e.g.
    ``{"condition_latents": [B, ...]}``, cached and read back with the prompt's in
    ``sample["cond"]`` (the negative prompt's has only the prompt keys).

    The cache lives in ``cache_dir/<fingerprint>/`` (:func:`cache_fingerprint` of ``dataset``
    and ``settings``). When it is already there the encoders are not called.

    Under several processes, every rank calls it with its ``process_index`` and
    ``num_processes`` (collective: ``torch.distributed`` initialised): each rank encodes one
    contiguous share of the batches (the batches one process would encode, so the cache holds
    the same values), the main rank assembles the shares, and every rank returns the whole
    cache. ``cache_dir`` must be a folder every rank sees.

    Example (with accelerate)::

        cached = build_cache(dataset, settings, cache_dir="cache", encode_prompts=encode,
                             process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes)
    """
    if not isinstance(settings, CacheSettings):
        raise TypeError(f"settings must be a CacheSettings, got {type(settings).__name__}")
    if PROMPT_COLUMN not in dataset.column_names:
        raise ValueError(
            f"the dataset has no {PROMPT_COLUMN!r} column (columns: {dataset.column_names}): "
            "load it with load_training_dataset or select_training_columns"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    if settings.needs_media != (encode_media is not None):
        raise ValueError(
            f"settings.needs_media is {settings.needs_media} but encode_media is "
            f"{'given' if encode_media is not None else 'None'}: give encode_media exactly when "
            "the media are cached as latents"
        )
    if settings.condition_image != (encode_condition is not None):
        raise ValueError(
            f"settings.condition_image is {settings.condition_image} but encode_condition is "
            f"{'given' if encode_condition is not None else 'None'}: give encode_condition "
            "exactly when each row's image is cached as conditioning"
        )
    for fn, name in ((encode_media, "encode_media"), (encode_condition, "encode_condition")):
        if fn is not None and _media_column(dataset) is None:
            raise ValueError(
                f"{name} was given but the dataset has no {IMAGE_COLUMN!r} or "
                f"{VIDEO_COLUMN!r} column (columns: {dataset.column_names})"
            )
    inputs = _fingerprint_inputs(dataset, settings)
    cache = EmbeddingCache(cache_dir, _hash(inputs))
    exists = cache.exists()
    if num_processes > 1:
        # One decision for all ranks, taken before any of them writes.
        exists = _all_ranks(exists)
    if exists:
        logger.info("Reusing the embedding cache %s", cache.path)
        return cache.load()
    return cache.build(
        dataset,
        settings,
        encode_prompts=encode_prompts,
        encode_media=encode_media,
        encode_condition=encode_condition,
        batch_size=batch_size,
        samples_per_shard=samples_per_shard,
        inputs=inputs,
        process_index=process_index,
        num_processes=num_processes,
    )


def _all_ranks(value: bool) -> bool:
    """True when ``value`` is true on every rank (collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "build_cache with num_processes > 1 needs torch.distributed initialised (accelerate "
            "does this); got none"
        )
    values: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(values)
