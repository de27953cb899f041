"""Everything about a run that can be checked before the teacher's weights are read.

:func:`preflight` runs first in :func:`~fastgen_diffusers.training.setup.setup_run`: the flags'
ranges, the recipe (file, YAML, fields with ``--recipe_overrides``), the teacher's family and the
sizes its VAE and transformer accept (from ``model_index.json``, ``vae/config.json`` and
``transformer/config.json`` only; for a Hub id those three small files are downloaded), the
dataset and its columns, the checkpoint to resume from and whether the output folder is
writable. Each mistake raises :class:`~fastgen_diffusers.training.errors.UserError` naming the
flag, value or file and what was expected, so a run never loads a multi-gigabyte teacher only to
fail on a typo.

Example::

    from fastgen_diffusers.training.args import parse_args
    from fastgen_diffusers.training.preflight import preflight

    checked = preflight(parse_args([...]))
    checked.cfg, checked.family, checked.resume   # recipe, teacher family, checkpoint or None
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from ..config import DMDConfig
from ..loader import builtin_recipes, merge_overrides, resolve_config_path
from .args import TrainingArguments, check_arguments
from .errors import OutputNotWritableError, UserError

__all__ = [
    "ModelConfigs",
    "Preflight",
    "check_checkpoint_files",
    "check_sizes",
    "check_video_backend",
    "load_recipe_checked",
    "model_configs",
    "needs_media",
    "preflight",
    "resume_target",
    "teacher_family",
]

logger = logging.getLogger(__name__)

_MODEL_FLAG = "--pretrained_model_name_or_path"
_CONFIG_FILES = ("model_index.json", "vae/config.json", "transformer/config.json")


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the recipe, the teacher's family (no weights loaded), the
    checkpoint to resume from (``None``: start from scratch) and one-line warnings."""

    cfg: DMDConfig
    family: Any
    resume: Path | None
    warnings: list[str] = field(default_factory=list)


def preflight(args: TrainingArguments) -> Preflight:
    """Run every check that needs no model weights, cheapest first; raises ``UserError``."""
    check_arguments(args)
    _check_lr_scheduler(args.lr_scheduler)
    cfg = load_recipe_checked(args.recipe, args.recipe_overrides)
    configs = model_configs(args)
    family = teacher_family(args, configs)
    warnings = _recipe_family_warnings(args.recipe, family)
    for warning in warnings:
        logger.warning(warning)
    _check_experts(args, cfg, family)
    check_sizes(args, family, configs)
    check_video_backend(args, family)
    _check_dataset(args, cfg, family)
    resume = _check_resume(args)
    _check_writable(Path(args.output_dir), "--output_dir")
    if args.embedding_cache_dir:
        _check_writable(Path(args.embedding_cache_dir), "--embedding_cache_dir")
    return Preflight(cfg, family, resume, warnings)


# -- flags ----------------------------------------------------------------------------------------


def _check_lr_scheduler(name: str) -> None:
    from diffusers.optimization import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if name not in names:
        raise UserError(f"--lr_scheduler {name!r} is unknown", expected=f"one of {names}")


# -- recipe ---------------------------------------------------------------------------------------


def load_recipe_checked(recipe: str, overrides: dict[str, Any] | None = None) -> DMDConfig:
    """The recipe with ``overrides`` merged in, every problem as one ``UserError``: a missing
    file (with the built-in names), a binary or malformed file, a field that is unknown (with
    the closest names) or out of range (with its value, and whether ``--recipe_overrides`` set
    it)."""
    overrides = overrides or {}
    try:
        path = resolve_config_path(recipe)
    except FileNotFoundError as err:
        raise UserError(
            f"--recipe {recipe!r} is neither a built-in recipe nor a file",
            expected=f"one of {', '.join(builtin_recipes())} or a path to a YAML file",
            fix="see --list_recipes",
        ) from err
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"--recipe {str(path)!r} is not a text file (byte {err.start} is not UTF-8)",
            expected="a YAML recipe of DMD2 fields such as guidance_scale: 4.5",
        ) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"--recipe {str(path)!r} is not valid YAML{where}: {problem}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(
            f"--recipe {str(path)!r} holds a {type(data).__name__} at the top level",
            expected="a mapping of DMD2 fields (key: value lines)",
        )
    try:
        return DMDConfig.model_validate(merge_overrides(data, overrides))
    except pydantic.ValidationError as err:
        raise UserError(_describe_validation(err, str(path), overrides)) from err


def _describe_validation(err: pydantic.ValidationError, path: str, overrides: dict) -> str:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        name = ".".join(loc)
        node: Any = overrides
        for part in loc:
            node = node.get(part) if isinstance(node, dict) else None
        source = "--recipe_overrides" if node is not None else f"--recipe {path!r}"
        if item["type"] == "extra_forbidden":
            known = _field_names(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{source}: unknown field {name!r}{hint}")
        else:
            lines.append(f"{source}: field {name} = {item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)


def _field_names(loc: list[str]) -> list[str]:
    model: Any = DMDConfig
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(info, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if hasattr(c, "model_fields")), None)
        if model is None:
            return []
    return list(model.model_fields)


# -- the teacher's configs and family -------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfigs:
    """The teacher's small config files: ``folder`` holds them (the download snapshot for a Hub
    id); ``index`` / ``vae`` / ``transformer`` are ``None`` where the checkpoint has none."""

    name: str
    folder: str
    index: dict[str, Any] | None
    vae: dict[str, Any] | None
    transformer: dict[str, Any] | None


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a local path.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _read_config(file: str, name: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{_MODEL_FLAG} {name!r}: {file} is not valid JSON ({err})",
            expected="the config files diffusers' save_pretrained writes",
        ) from err
    if not isinstance(data, dict):
        raise UserError(f"{_MODEL_FLAG} {name!r}: {file} holds no JSON object")
    return data


def model_configs(args: TrainingArguments) -> ModelConfigs:
    """Read ``model_index.json``, ``vae/config.json`` and ``transformer/config.json`` of the
    teacher (downloaded alone for a Hub id, into ``--cache_dir``); no weights."""
    name = args.pretrained_model_name_or_path
    if os.path.isdir(name):
        found = {f: os.path.join(name, f) for f in _CONFIG_FILES}
        found = {f: p for f, p in found.items() if os.path.isfile(p)}
        folder = name
    elif os.path.exists(name) or _looks_local(name):
        what = "is a file" if os.path.exists(name) else "does not exist"
        raise UserError(
            f"{_MODEL_FLAG} {name!r} {what}",
            expected="a diffusers pipeline folder (with model_index.json) or a Hub model id",
        )
    else:
        found = _download_configs(args)
        folder = _snapshot_root(found) if found else name
    if "model_index.json" not in found and "transformer/config.json" not in found:
        raise UserError(
            f"{_MODEL_FLAG} {name!r} is not a diffusers pipeline: it has neither "
            "model_index.json nor transformer/config.json",
            expected="a folder written by DiffusionPipeline.save_pretrained or a Hub pipeline",
        )
    read = {f: _read_config(p, name) for f, p in found.items()}
    return ModelConfigs(
        name,
        folder,
        read.get("model_index.json"),
        read.get("vae/config.json"),
        read.get("transformer/config.json"),
    )


def _snapshot_root(found: dict[str, str]) -> str:
    file, local = next(iter(found.items()))
    root = Path(local)
    for _ in Path(file).parts:
        root = root.parent
    return str(root)


def _download_configs(args: TrainingArguments) -> dict[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name, found = args.pretrained_model_name_or_path, {}
    for filename in _CONFIG_FILES:
        try:
            found[filename] = hf_hub_download(
                name, filename, revision=args.revision, cache_dir=args.cache_dir
            )
        except GatedRepoError as err:
            raise UserError(
                f"{_MODEL_FLAG} {name!r} is a gated model on the Hub",
                fix="accept its licence on its Hub page, then log in (hf auth login)",
            ) from err
        except RepositoryNotFoundError as err:
            raise UserError(
                f"{_MODEL_FLAG} {name!r} is neither a local folder nor a model on the Hub",
                expected="a diffusers pipeline folder or a Hub id such as "
                "stabilityai/stable-diffusion-3.5-medium",
                fix="check the spelling; a private model needs a login (hf auth login)",
            ) from err
        except RevisionNotFoundError as err:
            raise UserError(
                f"--revision {args.revision!r} does not exist for {name!r} on the Hub",
                expected="a branch, tag or commit of that repository",
            ) from err
        except LocalEntryNotFoundError as err:
            raise UserError(
                f"{_MODEL_FLAG} {name!r} is not a local folder, and its {filename} could not be "
                "downloaded from the Hub nor found in the download cache (offline?)",
                fix="connect to the Hub once, or pass a local pipeline folder",
            ) from err
        except EntryNotFoundError:
            continue  # a repository without this file (a bare transformer, no VAE)
        except HFValidationError as err:
            raise UserError(
                f"{_MODEL_FLAG} {name!r} is neither a local folder nor a valid Hub id ({err})"
            ) from err
        except HfHubHTTPError as err:
            raise UserError(
                f"{_MODEL_FLAG} {name!r}: downloading {filename} failed: {err}"
            ) from err
    return found


def teacher_family(args: TrainingArguments, configs: ModelConfigs | None = None) -> Any:
    """The teacher's :class:`~fastgen_diffusers.plugins.base.Family` from its configs alone
    (``--flux_guidance`` applied); an unsupported pipeline or a Flux-only flag on another
    family is a ``UserError``."""
    from ..plugins import family_from_pretrained

    configs = configs or model_configs(args)
    name = configs.name

    def detect(**options: Any) -> Any:
        try:
            return family_from_pretrained(configs.folder, **options)
        except ValueError as err:
            raise UserError(f"{_MODEL_FLAG} {str(err).replace(configs.folder, name)}") from err

    family = detect()
    if args.flux_guidance is not None:
        if family.name != "flux":
            raise UserError(
                f"--flux_guidance {args.flux_guidance} applies to Flux teachers only; {name!r} "
                f"is a {family.pipeline_class.__name__} ({family.name})",
                fix="drop --flux_guidance",
            )
        family = detect(guidance=args.flux_guidance)
    return family


def _check_experts(args: TrainingArguments, cfg: Any, family: Any) -> None:
    """What a two-expert teacher (Wan 2.2 A14B) allows: ``--guidance_scale_2`` only there, and
    only with CFG on; no ``--teacher_lora`` (a Wan 2.2 LoRA holds a file per expert)."""
    experts = len(family.transformer_components)
    if args.teacher_lora is not None and experts > 1:
        raise UserError(
            f"--teacher_lora {args.teacher_lora!r} with a two-expert teacher "
            f"({args.pretrained_model_name_or_path}): a Wan 2.2 LoRA holds a file per expert "
            "and fusing it is not supported",
            expected="a single-transformer teacher, or no --teacher_lora",
        )
    if args.guidance_scale_2 is not None:
        if experts < 2:
            raise UserError(
                f"--guidance_scale_2 {args.guidance_scale_2} applies to two-expert Wan 2.2 A14B "
                f"teachers only; {args.pretrained_model_name_or_path!r} has one transformer",
                fix="drop --guidance_scale_2",
            )
        if cfg.guidance_scale is None:
            raise UserError(
                f"--guidance_scale_2 {args.guidance_scale_2} given, but the recipe's "
                "guidance_scale is null (CFG off for both experts)",
                fix="set guidance_scale in the recipe (--recipe_overrides guidance_scale=4.0), "
                "or drop --guidance_scale_2",
            )


def _recipe_family_warnings(recipe: str, family: Any) -> list[str]:
    """A built-in-style recipe name (``dmd2_flux1_dev``) naming another family than the
    teacher's: allowed (the fields are plain numbers), but usually a slip."""
    from ..plugins.registry import registered_families

    stem = Path(recipe).name.lower()
    named = set()
    for key, cls in registered_families().items():
        for alias in (key, *cls.aliases):
            if re.search(rf"(?<![a-z0-9]){re.escape(alias.lower())}", stem):
                named.add(key)
    if len(named) != 1 or family.name in named:
        return []
    other = named.pop()
    if registered_families()[other].transformer_class is family.transformer_class:
        return []  # the same model (Wan text- / image-to-video): the numbers carry over
    return [
        f"--recipe {recipe!r} looks made for {other} teachers, but the teacher is "
        f"{family.name}: its timestep shift, guidance and GAN blocks may not fit"
    ]


# -- sizes ----------------------------------------------------------------------------------------


def _spatial_factor(vae: dict[str, Any] | None) -> int:
    # What the family pipelines compute: Wan's VAE states it, Qwen-Image's halves per temporal
    # stage, the image VAEs per down block after the first.
    if not vae:
        return 8
    if vae.get("scale_factor_spatial"):
        return int(vae["scale_factor_spatial"])
    if vae.get("temperal_downsample") is not None:
        return 2 ** len(vae["temperal_downsample"])
    if vae.get("block_out_channels"):
        return 2 ** (len(vae["block_out_channels"]) - 1)
    return 8


def _temporal_factor(vae: dict[str, Any] | None) -> int:
    if not vae:
        return 4
    if vae.get("scale_factor_temporal"):
        return int(vae["scale_factor_temporal"])
    if vae.get("temperal_downsample") is not None:
        return 2 ** sum(bool(x) for x in vae["temperal_downsample"])
    return 4


def _patch(transformer: dict[str, Any] | None) -> int:
    patch = (transformer or {}).get("patch_size") or 1
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    # Flux and Qwen-Image pack 2x2 latents into a token whatever patch_size says.
    return max(int(patch), 2)


def check_sizes(args: TrainingArguments, family: Any, configs: ModelConfigs) -> None:
    """``--height`` / ``--width`` / ``--resolution`` against the VAE factor, the patch size and
    the transformer's ``pos_embed_max_size``; ``--num_frames`` against the video VAE's temporal
    factor (``4k + 1`` for Wan). A side left unset is the pipeline's default (filled in by
    ``load_teacher``), which fits by construction."""
    factor, patch = _spatial_factor(configs.vae), _patch(configs.transformer)
    multiple = factor * patch
    height, width = args.size
    limit = (configs.transformer or {}).get("pos_embed_max_size")
    for axis, value in (("height", height), ("width", width)):
        if value is None:
            continue
        flag = f"--{axis}" if getattr(args, axis) is not None else "--resolution"
        if value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            raise UserError(
                f"{flag} {value} does not fit {configs.name!r}",
                expected=f"a multiple of {multiple} (VAE factor {factor} x patch {patch})",
                fix=f"use {lower or upper} or {upper}",
            )
        if limit and value // multiple > int(limit):
            raise UserError(
                f"{flag} {value} is too large for {configs.name!r}: its position embedding "
                f"covers {limit} patches of {multiple} pixels (pos_embed_max_size={limit})",
                expected=f"at most {int(limit) * multiple} pixels",
            )
    if family.is_video:
        frames = args.num_frames or family.default_num_frames
        temporal = _temporal_factor(configs.vae)
        if frames is not None and (frames - 1) % temporal:
            k = (frames - 1) // temporal
            raise UserError(
                f"--num_frames {frames} does not fit {configs.name!r}",
                expected=f"{temporal}k+1 frames (the VAE's temporal factor is {temporal})",
                fix=f"use {temporal * k + 1} or {temporal * (k + 1) + 1}",
            )
    elif args.num_frames not in (None, 1):
        raise UserError(
            f"--num_frames {args.num_frames} applies to video teachers; {configs.name!r} is a "
            f"{family.name} image model",
            fix="drop --num_frames",
        )


def check_video_backend(args: TrainingArguments, family: Any) -> None:
    """A video teacher with validation prompts writes MP4s, and a video column is read from
    files: both need imageio with its ffmpeg plugin; an image-to-video teacher's prompts need
    ftfy (all in the ``[video]`` extra). Checked here so a missing package does not end the run
    at its first validation or its cache."""
    import importlib.util

    # WanImageToVideoPipeline's prompt cleaning calls ftfy whether or not it is installed.
    needed = ("ftfy",) if family.condition_image else ()
    if family.is_video and (args.validation_prompts or args.video_column):
        needed += ("imageio", "imageio_ffmpeg")
    missing = [p for p in needed if importlib.util.find_spec(p) is None]
    if missing:
        media = [p for p in missing if p != "ftfy"]
        what = (
            ("--validation_prompts" if args.validation_prompts else "--video_column")
            if media
            else "Encoding prompts"
        )
        uses = (["validation MP4s, .mp4 training data"] if media else []) + (
            ["WanImageToVideoPipeline's prompt cleaning"] if "ftfy" in missing else []
        )
        raise UserError(
            f"{what} with the video teacher {args.pretrained_model_name_or_path!r} needs "
            f"{' and '.join(missing)} ({'; '.join(uses)}), which is not installed",
            fix='`pip install "fastgen_diffusers[video]"` (or `pip install '
            + " ".join(name.replace("_", "-") for name in missing)
            + "`)",
        )


# -- data -----------------------------------------------------------------------------------------


def needs_media(cfg: DMDConfig) -> bool:
    """Whether the recipe trains on real latents: the GAN branch, or a multi-step student that
    starts from noised data rather than its own backward simulation (on every iteration, or on
    those ``backward_simulation_prob`` < 1 leaves to real latents)."""
    return cfg.gan_loss_weight_gen > 0 or (
        cfg.student_sample_steps > 1
        and (not cfg.backward_simulation or cfg.backward_simulation_prob < 1)
    )


def load_dataset_checked(args: TrainingArguments) -> Any:
    """:func:`~fastgen_diffusers.training.data.load_training_dataset` with the run's flags; a
    missing or malformed dataset, a missing column or a media path outside the dataset is a
    ``UserError``."""
    import datasets

    from .data import load_training_dataset

    flag = "--dataset_name" if args.dataset_name is not None else "--train_data_dir"
    source = args.dataset_name if args.dataset_name is not None else args.train_data_dir
    try:
        return load_training_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            caption_column=args.caption_column,
            image_column=args.image_column,
            video_column=args.video_column,
            max_train_samples=args.max_train_samples,
            cache_dir=args.cache_dir,
            allow_absolute_paths=args.allow_absolute_media_paths,
        )
    except UserError:
        raise
    except (ValueError, TypeError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
        raise UserError(f"{flag} {source!r}: {err}") from err


def _check_dataset(args: TrainingArguments, cfg: DMDConfig, family: Any) -> None:
    from .data import IMAGE_COLUMN, VIDEO_COLUMN

    dataset = load_dataset_checked(args)
    _check_condition_images(args, cfg, family, dataset.column_names)
    if needs_media(cfg) and not {IMAGE_COLUMN, VIDEO_COLUMN} & set(dataset.column_names):
        raise UserError(
            "This recipe needs real images/videos (GAN branch, or a multi-step student without "
            "backward_simulation or with backward_simulation_prob < 1), but the dataset has "
            "prompts only",
            fix="give a dataset with images (--image_column) or videos (--video_column), or "
            "change the recipe",
        )


def _check_condition_images(
    args: TrainingArguments, cfg: DMDConfig, family: Any, columns: list[str]
) -> None:
    """Image-to-video: every row has an image (or a video, whose first frame is the image),
    and every validation prompt one; other teachers take no image."""
    from .data import IMAGE_COLUMN, VIDEO_COLUMN

    teacher = args.pretrained_model_name_or_path
    if not family.condition_image:
        if args.validation_image:
            raise UserError(
                f"--validation_image is given, but {teacher!r} generates from prompts alone "
                f"({family.pipeline_class.__name__})",
                fix="drop --validation_image, or distill an image-to-video pipeline",
            )
        return
    if IMAGE_COLUMN not in columns and VIDEO_COLUMN not in columns:
        raise UserError(
            f"the image-to-video teacher {teacher!r} generates from an image and a prompt, but "
            f"the dataset has prompts only (columns: {columns})",
            fix="give each row its first frame (--image_column) or a video (--video_column: "
            "its first frame is the image)",
        )
    if IMAGE_COLUMN in columns and needs_media(cfg):
        raise UserError(
            "This recipe needs real videos (GAN branch, or a multi-step student without "
            "backward_simulation), but the image-to-video dataset has images only (each "
            "row's first frame)",
            fix="give videos (--video_column: their first frames become the images), or a "
            "backward-simulation recipe without GAN (dmd2_wan22_a14b_i2v)",
        )
    if args.validation_prompts and not args.validation_image:
        raise UserError(
            f"--validation_prompts with the image-to-video teacher {teacher!r} need a first "
            "frame each",
            fix="add --validation_image (one image per prompt, or one for all)",
        )
    load_validation_images(args)


def load_validation_images(args: TrainingArguments) -> list[Any]:
    """``--validation_image`` as PIL images, one per validation prompt (a single image serves
    them all); an unreadable one is a ``UserError`` naming it. The preflight reads them once,
    so that a bad file ends the run before the teacher loads."""
    from diffusers.utils import load_image

    prompts = args.validation_prompts or []
    names = list(args.validation_image or [])
    if len(names) == 1:
        names *= len(prompts)
    images = []
    for name in names:
        try:
            images.append(load_image(os.path.expanduser(name)))
        except (OSError, ValueError) as err:
            raise UserError(
                f"--validation_image {name!r} could not be read as an image: {err}"
            ) from err
    return images


# -- resume and output ----------------------------------------------------------------------------


def resume_target(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint`` as a path: a bare name such as ``checkpoint-500`` that is
    not a folder here is looked up in ``--output_dir`` (as in the diffusers examples)."""
    value = args.resume_from_checkpoint
    if value is None or value == "latest" or os.path.isdir(value):
        return value
    candidate = Path(args.output_dir) / value
    if Path(value).name == value and candidate.is_dir():
        return str(candidate)
    return value


def _check_resume(args: TrainingArguments) -> Path | None:
    from .checkpointing import complete_checkpoints, resolve_resume

    target = resume_target(args)
    try:
        path = resolve_resume(target, args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        found = [p.name for _, p in complete_checkpoints(args.output_dir)]
        raise UserError(
            f"{err} (complete checkpoints in --output_dir {args.output_dir!r}: "
            f"{', '.join(found) or 'none'})"
        ) from err
    if path is not None:
        check_checkpoint_files(path)
    return path


_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """Open the header of every safetensors / torch file in the checkpoint ``path`` (no tensor
    data is read): an empty or truncated one is a ``UserError`` naming it."""
    from safetensors import safe_open

    for file in sorted(Path(path).rglob("*")):
        if not file.is_file():
            continue
        problem = None
        if file.suffix in (".safetensors", *_TORCH_SUFFIXES) and file.stat().st_size == 0:
            problem = "is empty"
        elif file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as err:
                problem = f"is damaged ({err})"
        elif file.suffix in _TORCH_SUFFIXES:
            with open(file, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6
            if zipped:
                try:
                    zipfile.ZipFile(file).close()  # reads the central directory at the end
                except zipfile.BadZipFile as err:
                    problem = f"is truncated or damaged ({err})"
        if problem:
            raise UserError(
                f"checkpoint file {str(file)!r} {problem}",
                fix=f"resume from another checkpoint, or delete {str(path)!r}",
            )


def _check_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique probe: every rank of a distributed run checks at once.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-write-test-"):
            pass
    except OSError as err:
        raise OutputNotWritableError(
            f"{flag} {str(folder)!r} is not writable: {err.strerror or err}",
            fix="choose a folder you can write to",
        ) from err
