"""Training data: prompts (and images or videos), preprocessing, and an on-disk cache of what the
frozen encoders produce.

The text encoders and the VAE are frozen, so their outputs only need computing once per dataset:
:func:`build_cache` runs them over every sample, stores the results under
``cache_dir/<fingerprint>/`` and returns a :class:`CachedDataset` that reads them back. The caller
can then free the encoders before training. A second run with the same inputs reuses the cache
without calling the encoders; any change of model, resolution, negative prompt or data gives a
new fingerprint, hence a new cache.

Example::

    from fastgen_diffusers.training.data import (
        ResumableRandomSampler, build_cache, load_training_dataset)

    dataset = load_training_dataset("prompts.jsonl")  # or a Hub name, or an image folder
    cached = build_cache(
        dataset,
        cache_dir="cache",
        fingerprint_parts={"model": model_id, "revision": revision, "max_sequence_length": 256},
        encode_prompts=lambda prompts: {"encoder_hidden_states": ..., "pooled_projections": ...},
        encode_media=None,  # or pixels [B, 3, H, W] in [-1, 1] -> normalised VAE latents
        negative_prompt="",
        batch_size=8,
        resolution=1024,
    )
    del text_encoders, vae  # nothing reads them any more
    sampler = ResumableRandomSampler(len(cached), seed=0)
    batch = cached.collate([cached[i] for i in sampler.take(4)])
    batch["cond"]["encoder_hidden_states"]  # [4, L, D]; cached.negative has batch size 1

Datasets are normalised to the columns ``prompt`` (a string) and, when there are media, ``image``
or ``video`` (see :func:`select_training_columns`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import operator
import os
import shutil
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "IMAGE_COLUMN",
    "PROMPT_COLUMN",
    "VIDEO_COLUMN",
    "CachedDataset",
    "EmbeddingCache",
    "ResumableRandomSampler",
    "build_cache",
    "cache_fingerprint",
    "load_image",
    "load_training_dataset",
    "load_video",
    "preprocess_image",
    "preprocess_video",
    "select_training_columns",
]

logger = logging.getLogger(__name__)

PROMPT_COLUMN = "prompt"
IMAGE_COLUMN = "image"
VIDEO_COLUMN = "video"

CACHE_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.safetensors"

# Local files by suffix: the `datasets` builder that reads them (".txt" is read here).
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
_KNOWN_SUFFIXES = (*_FILE_BUILDERS, ".txt")

Resolution = int | Sequence[int]


# -- loading -------------------------------------------------------------------------------------


def load_training_dataset(
    dataset_name: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    *,
    caption_column: str = "text",
    image_column: str | None = None,
    video_column: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """Load the training data as a :class:`datasets.Dataset` with normalised columns.

    ``dataset_name`` is a Hub dataset, a local folder (``datasets.load_dataset(folder)``: images
    with a ``metadata.jsonl`` load as an image folder) or a local file: ``.jsonl`` / ``.json``
    (``{"text": ...}`` per line), ``.csv``, ``.parquet``, or ``.txt`` (one prompt per line, blank
    lines skipped). ``train_data_dir`` is a local folder, as in the diffusers training scripts.
    Pass exactly one of the two.

    Prompts only are enough for a one-step student without GAN; the GAN branch and multi-step
    students also need images (``image_column``) or videos (``video_column``: file paths, folders
    of frame images, or decoded frames). Without either, a single column of type
    ``datasets.Image`` / ``datasets.Video`` is picked up by itself. Relative media paths in a
    local file resolve against that file's folder.

    The result has the columns ``prompt`` and, with media, ``image`` or ``video``; other columns
    are dropped. ``max_train_samples`` keeps the first rows (deterministic, so the cache can be
    reused). Media are decoded later, by :func:`build_cache`, which names the row and file of an
    unreadable one.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "pass exactly one of dataset_name (Hub dataset, local folder or file) and "
            f"train_data_dir (local folder); got dataset_name={dataset_name!r}, "
            f"train_data_dir={train_data_dir!r}"
        )
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"max_train_samples must be >= 1 or None, got {max_train_samples}")
    source = os.fspath(dataset_name if dataset_name is not None else train_data_dir)
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)

    base_dir = None
    if train_data_dir is not None and not os.path.isdir(source):
        raise FileNotFoundError(f"train_data_dir {source!r} is not a folder")
    if os.path.isfile(source):
        dataset = _load_file(
            source, caption_column=caption_column, split=split, cache_dir=cache_dir
        )
        base_dir = os.path.dirname(os.path.abspath(source))
    elif os.path.isdir(source):
        dataset = datasets.load_dataset(
            source, dataset_config_name, split=split, cache_dir=cache_dir
        )
        base_dir = os.path.abspath(source)
    else:
        if Path(source).suffix.lower() in _KNOWN_SUFFIXES:
            raise FileNotFoundError(f"no such file: {source!r}")
        dataset = datasets.load_dataset(
            source, dataset_config_name, revision=revision, split=split, cache_dir=cache_dir
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{source!r} (split {split!r}) loaded as {type(dataset).__name__}; expected a "
            "datasets.Dataset (streaming datasets cannot be cached)"
        )
    if len(dataset) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) is empty: no rows to train on")
    if max_train_samples is not None and max_train_samples < len(dataset):
        dataset = dataset.select(range(max_train_samples))
    return select_training_columns(
        dataset,
        caption_column=caption_column,
        image_column=image_column,
        video_column=video_column,
        source=source,
        base_dir=base_dir,
    )


def _load_file(path: str, *, caption_column: str, split: str, cache_dir: str | None):
    suffix = Path(path).suffix.lower()
    if suffix not in _KNOWN_SUFFIXES:
        raise ValueError(
            f"unknown file type {suffix or '(no suffix)'!r} for {path!r}; expected one of "
            f"{', '.join(_KNOWN_SUFFIXES)}, a folder, or a Hub dataset name"
        )
    if suffix in _TEXT_SUFFIXES:
        with open(path, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise ValueError(f"{path!r} is empty: no rows to train on")
    if suffix != ".txt":
        return datasets.load_dataset(
            _FILE_BUILDERS[suffix], data_files=path, split=split, cache_dir=cache_dir
        )
    if split != "train":
        raise ValueError(f"a prompts file has only the 'train' split, got split={split!r}")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    # The fingerprint of an in-memory dataset hashes its content: same prompts, same cache.
    return datasets.Dataset.from_dict({caption_column: prompts})


def select_training_columns(
    dataset: datasets.Dataset,
    *,
    caption_column: str = "text",
    image_column: str | None = None,
    video_column: str | None = None,
    source: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Keep the caption and media columns of ``dataset``, renamed ``prompt``, ``image``, ``video``.

    For datasets built another way than :func:`load_training_dataset`. Checks that every caption
    is a string; ``base_dir`` makes relative media paths (string columns) absolute.
    """
    columns = list(dataset.column_names)
    where = f" of {source!r}" if source else ""
    if image_column is not None and video_column is not None:
        raise ValueError(
            f"pass image_column or video_column, not both (got {image_column!r} and "
            f"{video_column!r})"
        )

    def check(kind: str, name: str, argument: str) -> None:
        if name not in columns:
            raise ValueError(
                f"{kind} column {name!r} not found in the dataset{where}; its columns are "
                f"{columns}: pass {argument}=<one of them>"
            )

    check("caption", caption_column, "caption_column")
    media: tuple[str, str] | None = None
    if image_column is not None:
        check("image", image_column, "image_column")
        media = (image_column, IMAGE_COLUMN)
    elif video_column is not None:
        check("video", video_column, "video_column")
        media = (video_column, VIDEO_COLUMN)
    else:
        found = [
            (name, IMAGE_COLUMN if isinstance(feature, datasets.Image) else VIDEO_COLUMN)
            for name, feature in dataset.features.items()
            if isinstance(feature, (datasets.Image, datasets.Video))
        ]
        if len(found) > 1:
            raise ValueError(
                f"the dataset{where} has several media columns {[n for n, _ in found]}: pass "
                "image_column or video_column"
            )
        media = found[0] if found else None
    if media is not None and media[0] == caption_column:
        raise ValueError(f"column {caption_column!r} cannot be both the caption and the media")

    keep = [caption_column] + ([media[0]] if media else [])
    dataset = dataset.select_columns(keep)
    renames = {caption_column: PROMPT_COLUMN}
    if media is not None:
        renames[media[0]] = media[1]
    renames = {old: new for old, new in renames.items() if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)

    for row, text in enumerate(dataset[PROMPT_COLUMN]):
        if not isinstance(text, str):
            raise ValueError(
                f"row {row}{where}: caption {text!r} in column {caption_column!r} is not a string"
            )

    if media is not None and base_dir is not None:
        feature = dataset.features[media[1]]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.map(
                _absolute_path, fn_kwargs={"column": media[1], "base_dir": os.fspath(base_dir)}
            )
    return dataset


def _absolute_path(example: dict[str, Any], column: str, base_dir: str) -> dict[str, Any]:
    value = example[column]
    if isinstance(value, str) and value and not os.path.isabs(value) and "://" not in value:
        example[column] = os.path.join(base_dir, value)
    return example


def _media_column(dataset: datasets.Dataset) -> str | None:
    names = [c for c in (IMAGE_COLUMN, VIDEO_COLUMN) if c in dataset.column_names]
    if len(names) > 1:
        raise ValueError(f"the dataset has both {names}: keep one media column")
    return names[0] if names else None


# -- decoding and preprocessing ------------------------------------------------------------------


def _as_hw(resolution: Resolution) -> tuple[int, int]:
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        hw = (resolution, resolution)
    elif (
        isinstance(resolution, Sequence)
        and len(resolution) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in resolution)
    ):
        hw = (int(resolution[0]), int(resolution[1]))
    else:
        raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
    if min(hw) < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return hw


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return repr(value.get("path")) if value.get("path") else "in-memory bytes"
    if isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    return f"an in-memory {type(value).__name__}"


def _array_to_image(value: Any) -> Image.Image:
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"expected uint8 pixels [H, W] or [H, W, C], got {array.dtype} of shape {array.shape}"
        )
    return Image.fromarray(array)


def load_image(value: Any, *, row: int | None = None) -> Image.Image:
    """One image as RGB PIL: a PIL image, a path, ``{"path", "bytes"}`` (what ``datasets.Image``
    gives undecoded) or uint8 pixels. Errors name ``row`` and the file."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and not path:
                raise ValueError("neither bytes nor a path")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            image = _array_to_image(value)
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:
        at = f"row {row}: " if row is not None else ""
        raise ValueError(f"{at}cannot read image {_describe(value)}: {error}") from error


def _even_indices(count: int, num_frames: int | None, row: int | None) -> list[int]:
    if num_frames is None:
        return list(range(count))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if count < num_frames:
        at = f"row {row}: " if row is not None else ""
        raise ValueError(f"{at}the video has {count} frames, fewer than num_frames={num_frames}")
    return torch.linspace(0, count - 1, num_frames).round().long().tolist()


def load_video(value: Any, *, num_frames: int | None = None, row: int | None = None) -> list:
    """A video as a list of RGB PIL frames, ``num_frames`` of them sampled evenly (first and last
    included; all frames when ``None``).

    ``value`` is a video file path (read by ``diffusers.utils.load_video``: GIF through PIL, other
    formats through imageio), a folder of frame images (sorted by name), ``{"path", "bytes"}``
    (``datasets.Video`` undecoded), a list of frames, or uint8 pixels ``[F, H, W, C]``.
    """
    at = f"row {row}: " if row is not None else ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if not path:
                raise ValueError(f"{at}cannot read video: neither bytes nor a path")
            return load_video(path, num_frames=num_frames, row=row)
        suffix = Path(path).suffix if path else ".mp4"
        with tempfile.TemporaryDirectory() as tmp:  # the decoders read files, not bytes
            file = os.path.join(tmp, "video" + suffix)
            with open(file, "wb") as f:
                f.write(data)
            return load_video(file, num_frames=num_frames, row=row)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if os.path.isdir(path):
            extensions = set(Image.registered_extensions())
            files = sorted(
                os.path.join(path, n)
                for n in os.listdir(path)
                if os.path.splitext(n)[1].lower() in extensions
            )
            if not files:
                raise ValueError(f"{at}video folder {path!r} holds no frame images")
            indices = _even_indices(len(files), num_frames, row)
            return [load_image(files[i], row=row) for i in indices]
        from diffusers.utils import load_video as read_video_file

        try:
            frames = read_video_file(path)
        except Exception as error:
            raise ValueError(f"{at}cannot read video {path!r}: {error}") from error
        if not frames:
            raise ValueError(f"{at}video {path!r} has no frames")
        return [load_image(frames[i], row=row) for i in _even_indices(len(frames), num_frames, row)]
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (list, int)):
        frames = list(value)  # PIL images, paths or arrays, one per frame
    else:
        try:  # nested lists (how Arrow stores arrays) or one array / tensor of frames
            array = (
                np.asarray(value, dtype=np.uint8) if isinstance(value, list) else np.asarray(value)
            )
        except Exception as error:
            raise ValueError(f"{at}cannot read video {_describe(value)}: {error}") from error
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(
                f"{at}expected video frames as uint8 [F, H, W] or [F, H, W, C], got "
                f"{array.dtype} of shape {array.shape}"
            )
        frames = list(array)
    if len(frames) == 0:
        raise ValueError(f"{at}the video has no frames")
    return [load_image(frames[i], row=row) for i in _even_indices(len(frames), num_frames, row)]


def preprocess_image(image: Any, resolution: Resolution) -> torch.Tensor:
    """Resize (shorter side, bicubic) and center-crop to ``resolution`` (int or (h, w)).

    Returns float32 ``[3, H, W]`` in [-1, 1] (0 -> -1, 255 -> 1). The scale makes the image cover
    the target exactly in one dimension; the crop offset is ``(size - target) // 2``.
    Deterministic: the same input gives the same tensor.
    """
    height, width = _as_hw(resolution)
    image = load_image(image)
    w0, h0 = image.size
    scale = max(height / h0, width / w0)
    size = (max(width, round(w0 * scale)), max(height, round(h0 * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def preprocess_video(
    frames: Any, resolution: Resolution, num_frames: int | None = None
) -> torch.Tensor:
    """Frames (anything :func:`load_video` reads) -> float32 ``[3, F, H, W]`` in [-1, 1].

    ``num_frames`` frames are sampled evenly (all when ``None``); each is resized and cropped as
    in :func:`preprocess_image`.
    """
    video = load_video(frames, num_frames=num_frames)
    return torch.stack([preprocess_image(frame, resolution) for frame in video], dim=1)


def _pixels(value: Any, kind: str, row: int, resolution: Resolution, num_frames: int | None):
    if kind == IMAGE_COLUMN:
        return preprocess_image(load_image(value, row=row), resolution)
    frames = load_video(value, num_frames=num_frames, row=row)
    return torch.stack([preprocess_image(frame, resolution) for frame in frames], dim=1)


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


def _fingerprint_inputs(
    dataset: datasets.Dataset,
    fingerprint_parts: Mapping[str, Any],
    *,
    resolution: Resolution | None,
    num_frames: int | None,
    negative_prompt: str | None,
    with_latents: bool,
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT_VERSION,
        "dataset": dataset._fingerprint,
        "num_rows": len(dataset),
        "parts": _jsonable(dict(fingerprint_parts), "fingerprint_parts"),
        "resolution": None if resolution is None else list(_as_hw(resolution)),
        "num_frames": num_frames,
        "negative_prompt": negative_prompt,
        "latents": with_latents,
    }


def cache_fingerprint(
    dataset: datasets.Dataset,
    fingerprint_parts: Mapping[str, Any],
    *,
    resolution: Resolution | None = None,
    num_frames: int | None = None,
    negative_prompt: str | None = "",
    with_latents: bool = False,
) -> str:
    """sha256 (hex) of everything a cache's content depends on.

    ``fingerprint_parts`` holds what only the caller knows (model id, revision, variant, family,
    dtype, max sequence length, ...); the dataset's own ``_fingerprint`` (which follows its files
    and selections), resolution, frames, negative prompt and whether latents are cached are added
    here.
    """
    inputs = _fingerprint_inputs(
        dataset,
        fingerprint_parts,
        resolution=resolution,
        num_frames=num_frames,
        negative_prompt=negative_prompt,
        with_latents=with_latents,
    )
    return _hash(inputs)


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
        *,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        encode_media: Callable[[torch.Tensor], torch.Tensor] | None = None,
        negative_prompt: str | None = "",
        batch_size: int = 8,
        resolution: Resolution | None = None,
        num_frames: int | None = None,
        samples_per_shard: int = 1024,
        inputs: Mapping[str, Any] | None = None,
    ) -> CachedDataset:
        """Run the encoders over ``dataset`` and write the cache; returns it loaded."""
        if batch_size < 1 or samples_per_shard < 1:
            raise ValueError(
                f"batch_size and samples_per_shard must be >= 1, got {batch_size} and "
                f"{samples_per_shard}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.fingerprint[:16]}-", dir=self.root))
        try:
            self._write(
                tmp,
                dataset,
                encode_prompts=encode_prompts,
                encode_media=encode_media,
                negative_prompt=negative_prompt,
                batch_size=batch_size,
                resolution=resolution,
                num_frames=num_frames,
                samples_per_shard=samples_per_shard,
                inputs=inputs,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.path.is_dir() and not self.exists():
            # Not written by `build` (which renames only whole caches): stale, replace it.
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rename(tmp, self.path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.exists():
                raise
            # Another process finished the same cache first; its content is the same.
        return self.load()

    def _write(
        self,
        out: Path,
        dataset: datasets.Dataset,
        *,
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        encode_media: Callable[[torch.Tensor], torch.Tensor] | None,
        negative_prompt: str | None,
        batch_size: int,
        resolution: Resolution | None,
        num_frames: int | None,
        samples_per_shard: int,
        inputs: Mapping[str, Any] | None,
    ) -> None:
        media = _media_column(dataset) if encode_media is not None else None
        # Read only what is encoded: media not turned into latents are never decoded.
        rows = dataset.select_columns([PROMPT_COLUMN] + ([media] if media else []))
        if media is not None and isinstance(
            dataset.features[media], (datasets.Image, datasets.Video)
        ):
            # Decode here rather than in `datasets`, so that errors can name the row and file.
            feature = datasets.Image if media == IMAGE_COLUMN else datasets.Video
            rows = rows.cast_column(media, feature(decode=False))

        cond_spec, latent_spec = _Spec(), _Spec()
        prompts: list[str] = []
        shards: list[dict[str, Any]] = []
        pending: dict[str, list[torch.Tensor]] = {}
        pending_start = 0

        def flush(stop: int) -> None:
            nonlocal pending, pending_start
            if stop == pending_start:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({k: torch.cat(v) for k, v in pending.items()}, str(out / name))
            shards.append({"file": name, "start": pending_start, "stop": stop})
            pending, pending_start = {}, stop

        n = len(rows)
        logger.info("Encoding %d samples into %s", n, self.path)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
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
                with torch.no_grad():
                    latents = _to_cpu(encode_media(pixels), "latents", len(texts), "encode_media")
                latent_spec.check({"latents": latents}, "encode_media", what)
                tensors["latents"] = latents
            for key, value in tensors.items():
                pending.setdefault(key, []).append(value)
            prompts.extend(texts)
            if stop - pending_start >= samples_per_shard:
                flush(stop)
        flush(n)

        has_negative = negative_prompt is not None
        if has_negative:
            with torch.no_grad():
                negative = encode_prompts([negative_prompt])
            negative = {k: _to_cpu(v, k, 1, "encode_prompts") for k, v in negative.items()}
            cond_spec.check(negative, "encode_prompts", "the negative prompt")
            save_file(negative, str(out / NEGATIVE_FILE))

        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_samples": n,
            "shards": shards,
            "cond": cond_spec.to_json(),
            "latents": latent_spec.to_json().get("latents"),
            "negative": has_negative,
            "inputs": dict(inputs or {}),
            "prompts": prompts,
        }
        (out / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")


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
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if index.get("format") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"cache {self.path} has format {index.get('format')!r}; expected "
                f"{CACHE_FORMAT_VERSION}"
            )
        self.fingerprint: str = index["fingerprint"]
        self.prompts: list[str] = index["prompts"]
        self.cond_keys: list[str] = list(index["cond"])
        self.has_latents: bool = index["latents"] is not None
        self.inputs: dict[str, Any] = index["inputs"]
        self._shards: list[dict[str, Any]] = index["shards"]
        self._starts = [shard["start"] for shard in self._shards]
        self.negative: dict[str, torch.Tensor] | None = (
            load_file(str(self.path / NEGATIVE_FILE)) if index["negative"] else None
        )
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, n = operator.index(index), len(self.prompts)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} cached samples")
        index %= n
        shard = bisect_right(self._starts, index) - 1
        offset = index - self._starts[shard]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.path / self._shards[shard]["file"]), framework="pt")
            self._handles[shard] = handle

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
    *,
    cache_dir: str | os.PathLike,
    fingerprint_parts: Mapping[str, Any],
    encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
    encode_media: Callable[[torch.Tensor], torch.Tensor] | None = None,
    negative_prompt: str | None = "",
    batch_size: int = 8,
    resolution: Resolution | None = None,
    num_frames: int | None = None,
    samples_per_shard: int = 1024,
) -> CachedDataset:
    """Encode every sample of ``dataset`` once and cache the results on disk.

    ``encode_prompts(prompts)`` returns a dict of tensors with the batch as first dim (e.g.
    ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``), the same keys and
    per-sample shapes for every batch. ``encode_media(pixels)`` maps ``[B, 3, H, W]`` images
    (``[B, 3, F, H, W]`` videos) in [-1, 1], preprocessed to ``resolution`` and ``num_frames``,
    to the latents the networks train on (normalised as the family's VAE needs); leave it
    ``None`` to cache prompts only. Both run under ``torch.no_grad``; moving inputs to the
    encoders' device and dtype is theirs to do. The negative prompt (``None``: none) is encoded
    once into :attr:`CachedDataset.negative`.

    The cache lives in ``cache_dir/<fingerprint>/`` (:func:`cache_fingerprint` of
    ``fingerprint_parts`` and the other inputs). When it is already there the encoders are not
    called. Under several processes, let one build it first (``accelerator.main_process_first()``);
    concurrent builds are safe but repeat the work.
    """
    if PROMPT_COLUMN not in dataset.column_names:
        raise ValueError(
            f"the dataset has no {PROMPT_COLUMN!r} column (columns: {dataset.column_names}): "
            "load it with load_training_dataset or select_training_columns"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    media = _media_column(dataset)
    if encode_media is not None:
        if media is None:
            raise ValueError(
                f"encode_media was given but the dataset has no {IMAGE_COLUMN!r} or "
                f"{VIDEO_COLUMN!r} column (columns: {dataset.column_names})"
            )
        if resolution is None:
            raise ValueError("resolution is required to encode images or videos, got None")
    if resolution is not None:
        _as_hw(resolution)
    inputs = _fingerprint_inputs(
        dataset,
        fingerprint_parts,
        resolution=resolution,
        num_frames=num_frames,
        negative_prompt=negative_prompt,
        with_latents=encode_media is not None,
    )
    cache = EmbeddingCache(cache_dir, _hash(inputs))
    if cache.exists():
        logger.info("Reusing the embedding cache %s", cache.path)
        return cache.load()
    return cache.build(
        dataset,
        encode_prompts=encode_prompts,
        encode_media=encode_media,
        negative_prompt=negative_prompt,
        batch_size=batch_size,
        resolution=resolution,
        num_frames=num_frames,
        samples_per_shard=samples_per_shard,
        inputs=inputs,
    )


# -- sampling ------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) together so that e.g. (0, 1) and (1, 0) give unrelated orders.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ResumableRandomSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices, epoch after epoch, that resume exactly where they stopped.

    Epoch ``e`` is ``torch.randperm(length)`` under a generator seeded by ``(seed, e)``; the state
    is ``(epoch, position)`` within it. ``start_index`` counts samples already drawn over all
    epochs (``epoch, position = divmod(start_index, length)``). ``state_dict`` /
    ``load_state_dict`` make it checkpointable (``accelerator.register_for_checkpointing``).

    It yields indices of the *global* batch order: with several processes, every rank builds it
    with the same seed and takes its part of each global batch, e.g.
    ``sampler.take(batch_size * world_size)[rank::world_size]``, or lets accelerate shard a
    DataLoader built on it (each rank then keeps whole batches in turn). Iterating it (``iter``)
    yields the rest of the current epoch; ``take(n)`` crosses epochs. A DataLoader with workers
    (and accelerate's, which looks one batch ahead) draws indices before they are trained on, so
    its ``state_dict`` is then ahead of training: checkpoint with ``take`` or rebuild with
    ``start_index=samples trained on``. There is deliberately no ``set_epoch``: accelerate calls
    it with its own pass counter, which would reset a resumed epoch.
    """

    def __init__(self, length: int, seed: int, start_index: int = 0):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch, self.position = divmod(int(start_index), self.length)
        self._order: list[int] = []
        self._order_epoch: int | None = None

    @property
    def samples_seen(self) -> int:
        """Indices drawn so far over all epochs (a valid ``start_index``)."""
        return self.epoch * self.length + self.position

    def _current_order(self) -> list[int]:
        if self.position >= self.length:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.length, generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def take(self, n: int) -> list[int]:
        """The next ``n`` indices, continuing into the next epochs as needed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[int] = []
        while len(out) < n:
            order = self._current_order()
            stop = min(self.length, self.position + n - len(out))
            out.extend(order[self.position : stop])
            self.position = stop
        return out

    def __iter__(self) -> Iterator[int]:
        order = self._current_order()
        while self.position < self.length:
            index = order[self.position]
            self.position += 1
            yield index

    def __len__(self) -> int:
        """Indices left in the current epoch (a whole epoch once it is finished)."""
        return self.length - self.position if self.position < self.length else self.length

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "length": self.length,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "length"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}: "
                    "the same order cannot be resumed (different seed or dataset size)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.length:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
