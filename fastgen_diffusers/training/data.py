"""Training data: prompts (and images or videos) from a Hub dataset, a local folder or a prompt
file, normalised to the columns ``prompt`` and ``image`` / ``video``, and their preprocessing.

Example::

    from fastgen_diffusers.training.data import load_training_dataset, preprocess_image

    dataset = load_training_dataset("prompts.jsonl")  # or a Hub name, or an image folder
    pixels = preprocess_image(load_image(dataset[0]["image"]), 1024)  # [3, H, W] in [-1, 1]
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .errors import UserError

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_COLUMN",
    "PROMPT_COLUMN",
    "VIDEO_COLUMN",
    "load_image",
    "load_training_dataset",
    "load_video",
    "to_rgb",
    "preprocess_image",
    "preprocess_video",
    "select_training_columns",
]

logger = logging.getLogger(__name__)

PROMPT_COLUMN = "prompt"
IMAGE_COLUMN = "image"
VIDEO_COLUMN = "video"

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
    allow_absolute_paths: bool = False,
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
    local file resolve against that file's folder, and every media path must resolve (symlinks
    followed) inside the dataset's folder: ``../secret.png`` is refused, and so is an absolute
    path unless ``allow_absolute_paths`` (local datasets only). A Hub dataset reads no local
    file outside its own download.

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
        allow_absolute_paths=allow_absolute_paths,
        local=base_dir is not None,
        cache_dir=cache_dir,
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
    allow_absolute_paths: bool = False,
    local: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Keep the caption and media columns of ``dataset``, renamed ``prompt``, ``image``, ``video``.

    For datasets built another way than :func:`load_training_dataset`. Checks that every caption
    is a string; ``base_dir`` makes relative media paths (string columns) absolute and is the
    folder every media path must stay inside (``allow_absolute_paths``: absolute paths may point
    anywhere). ``local=False`` (a Hub dataset): media must be embedded or inside the Hugging
    Face caches (``cache_dir`` or the default ones); file paths in a string column are refused.
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

    if media is not None and (base_dir is not None or not local):
        dataset = _contain_media_paths(
            dataset,
            media[1],
            where=where,
            base_dir=None if base_dir is None else os.fspath(base_dir),
            allow_absolute=allow_absolute_paths and local,
            cache_dir=cache_dir,
        )
    return dataset


# -- media paths stay inside the dataset ---------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, root]) == root


def _hub_roots(cache_dir: str | os.PathLike | None) -> list[str]:
    from huggingface_hub import constants

    roots = [datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE]
    if cache_dir is not None:
        roots.append(cache_dir)
    return [os.path.realpath(os.fspath(r)) for r in roots]


def _contain_media_paths(
    dataset: datasets.Dataset,
    column: str,
    *,
    where: str,
    base_dir: str | None,
    allow_absolute: bool,
    cache_dir: str | os.PathLike | None,
) -> datasets.Dataset:
    """Relative paths of a string column joined to ``base_dir``; every path (string column, or
    an undecoded ``datasets.Image`` / ``Video`` without bytes) checked to resolve inside the
    dataset's folder ``base_dir`` (local) or the Hugging Face caches (Hub, ``base_dir=None``).
    Refused: ``UserError`` naming the row and the path."""
    feature = dataset.features[column]
    is_string = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    is_media = isinstance(feature, (datasets.Image, datasets.Video))
    if not (is_string or is_media):
        return dataset
    local = base_dir is not None
    roots = [os.path.realpath(base_dir)] if base_dir is not None else _hub_roots(cache_dir)
    if is_media:
        # Paths of the undecoded column through Arrow: embedded bytes never become Python objects.
        table = dataset.select_columns([column]).with_format("arrow")[:]
        struct = table.column(column).combine_chunks()
        paths, embedded = struct.field("path").to_pylist(), struct.field("bytes").is_valid()
        values = [None if has else p for p, has in zip(paths, embedded.to_pylist())]
    else:
        values = list(dataset[column])
    joined: list[Any] = []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value or "://" in value:
            joined.append(value)  # embedded media, or a URL (never fetched: decoding names it)
            continue
        if is_string and not local:
            raise UserError(
                f"row {row}{where}: the media column holds the file path {value!r}; a Hub "
                "dataset's media are read from the dataset itself, never from local files",
                fix="store the images in an Image / Video column of the dataset",
            )
        path = value
        if is_string and not os.path.isabs(path) and base_dir is not None:
            path = os.path.join(base_dir, path)
        if os.path.isabs(value) and allow_absolute:
            joined.append(path)
            continue
        if not any(_inside(path, root) for root in roots):
            inside = f"inside {roots[0]!r}" if local else "inside the downloaded dataset"
            raise UserError(
                f"row {row}{where}: media path {value!r} resolves to "
                f"{os.path.realpath(path)!r}, outside the dataset",
                expected=f"paths {inside}",
                fix="move the file into the dataset's folder"
                + (", or pass --allow_absolute_media_paths for absolute paths" if local else ""),
            )
        joined.append(path)
    if is_string and joined != values:
        dataset = dataset.map(lambda example, index: {column: joined[index]}, with_indices=True)
    return dataset


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


# Background that transparent pixels are composited onto. White, as an image viewer or a web page
# shows a cut-out (product shots, logos); dropping the alpha channel instead would show whatever
# colour the transparent pixels happen to store (often black or noise).
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, correct for every PIL mode.

    16-bit and 32-bit grayscale (``I;16*``, ``I``) are scaled to 8 bits (``v / 257``: 65535 ->
    255; PIL's own ``convert`` clips them, so any mid-gray 16-bit value turns white); float
    grayscale (``F``) in [0, 1] is scaled by 255, otherwise clipped to [0, 255]. Transparent
    images (``RGBA``, ``LA``, ``PA``, palette or grayscale with a transparency entry) are
    composited onto :data:`ALPHA_BACKGROUND`. ``CMYK``, ``YCbCr``, ``LAB``, palette and 1-bit
    images go through PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and array.max(initial=0) > 255):
            array = array / 257.0
        elif mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(value: Any, *, row: int | None = None) -> Image.Image:
    """One image as RGB PIL: a PIL image, a path, ``{"path", "bytes"}`` (what ``datasets.Image``
    gives undecoded) or uint8 pixels. EXIF orientation applied and every mode converted
    correctly (:func:`to_rgb`), through ``diffusers.utils.load_image``. Errors name ``row`` and
    the file."""
    from diffusers.utils import load_image as diffusers_load_image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and not path:
                raise ValueError("neither bytes nor a path")
            image = Image.open(io.BytesIO(data) if data is not None else path)
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)  # local files only: a URL is refused, never fetched
        else:
            image = _array_to_image(value)
        image.load()
        # diffusers' loader: EXIF orientation (phone photos), then our mode conversion.
        return diffusers_load_image(image, convert_method=to_rgb)
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
