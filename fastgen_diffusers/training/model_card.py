"""Model card (``README.md``) of an exported DMD2 student.

The card states what the student is (an N-step DMD2 student of the base model, the recipe and its
key values) and how to run it in the family's stock diffusers pipeline: the student's
transformer (or LoRA) and the shipped ``scheduler/scheduler_config.json``, called with the
family's :meth:`~fastgen_diffusers.plugins.base.Family.stock_pipeline_kwargs`. Everything
family-specific (transformer and pipeline classes, video output, notes, licence hints) comes
from the :class:`~fastgen_diffusers.plugins.base.Family` object. Metadata (``base_model``,
``library_name``, tags, ``widget``) follows the diffusers training scripts
(``populate_model_card``). The file is written atomically (temporary sibling, then rename).

Example::

    from fastgen_diffusers.training.model_card import write_model_card

    write_model_card(
        "out", base_model="stabilityai/stable-diffusion-3.5-medium", family="sd3",
        recipe_name="general/distillation/dmd2_sd35_medium", recipe=cfg,
        t_list=[0.999, 0.75, 0.5, 0.25, 0.0], sample_type="sde", lora=False,
        repo_id="me/sd35m-dmd2-4step",
        validation_images=[("validation/student-0.png", "a cat")],
    )
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from ..config import DMDConfig
from ..io import write_text_atomic
from ..lora import MERGED_LORA_WEIGHT_NAME

if TYPE_CHECKING:
    from ..plugins.base import Family

__all__ = ["render_usage_snippet", "write_model_card"]

_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_LORA_WEIGHTS_2 = "pytorch_lora_weights_transformer_2.safetensors"  # Wan 2.2 A14B's low expert
_DEFAULT_PROMPT = "A photo of a red fox in the snow"

# The card is built here, not with diffusers' `load_or_create_model_card`: for a Hub id that
# helper returns the card already on the Hub unchanged (a re-trained student would keep the old
# schedule) and needs the network; its training template leaves "How to use" as a TODO, and
# the usage snippet is the point of this card. `populate_model_card` adds the diffusers metadata.
_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ model_description }}
"""


def _literal(value: Any, name: str) -> str:
    """``value`` as Python source, for call arguments copied into the snippet."""
    if value is None or isinstance(value, (bool, str)):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"pipeline argument {name}={value!r} is not a finite number")
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        items = ", ".join(_literal(v, name) for v in value)
        return f"[{items}]"
    # numpy / torch scalars (e.g. rungs read from a tensor) render as plain numbers.
    if hasattr(value, "item") and callable(value.item):
        return _literal(value.item(), name)
    raise TypeError(
        f"pipeline argument {name}={value!r} ({type(value).__name__}) cannot be written into the "
        "usage snippet; expected None, bool, int, float, str or a list of those"
    )


def _resolve_family(family: str | Family) -> Family:
    """A family object, looked up in the registry when given by name."""
    from ..plugins.base import Family
    from ..plugins.registry import get_family

    return family if isinstance(family, Family) else get_family(family)


def _check_pipeline_class(name: str) -> str:
    import diffusers

    # dir() lists the lazily imported names without importing each pipeline module.
    if not name.isidentifier() or name not in dir(diffusers):
        raise ValueError(
            f"pipeline_class_name={name!r} is not a diffusers pipeline class "
            "(e.g. 'StableDiffusion3Pipeline', 'FluxPipeline', 'WanPipeline')"
        )
    return name


def _hub_id(name: str) -> str | None:
    """``name`` if it is a Hub model id, ``None`` for a local path (the Hub rejects a card whose
    ``base_model`` is not a model id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _task(family: Family, pipeline_class_name: str) -> str:
    if family.is_video and "ImageToVideo" in pipeline_class_name:
        return "image-to-video"
    return family.pipeline_tag


def render_usage_snippet(
    *,
    base_model: str,
    repo: str,
    family: str | Family,
    pipeline_class_name: str | None = None,
    lora: bool,
    pipeline_kwargs: Mapping[str, Any],
    prompt: str = _DEFAULT_PROMPT,
    base_model_note: str | None = None,
    lora_weight_name: str = _LORA_WEIGHTS,
) -> str:
    """Python source that runs the student in the stock diffusers pipeline.

    A full student loads ``transformer/`` from ``repo`` into the base model's pipeline; a LoRA
    student loads the base pipeline and ``pipe.load_lora_weights(repo)``. Both take the scheduler
    from ``repo``'s ``scheduler/`` subfolder and call the pipeline with ``pipeline_kwargs``
    written as literals. ``family`` is a :class:`~fastgen_diffusers.plugins.base.Family` or a
    registered family name; ``pipeline_class_name`` defaults to the family's pipeline.
    ``base_model_note`` becomes a comment on the ``base_model`` line. ``lora_weight_name``: the
    LoRA file the snippet loads (the merged LoRA of a student of base + a user's LoRA).
    """
    family = _resolve_family(family)
    pipeline_class_name = pipeline_class_name or family.pipeline_class.__name__
    task = _task(family, pipeline_class_name)
    transformer_class = family.transformer_class.__name__
    names = sorted(
        {"FlowMatchEulerDiscreteScheduler", pipeline_class_name}
        | (set() if lora else {transformer_class})
    )
    # `dtype=`: diffusers' name since `torch_dtype` was deprecated (the card installs `-U`).
    lines = ["import torch", f"from diffusers import {', '.join(names)}"]
    utils = (["export_to_video"] if task != "text-to-image" else []) + (
        ["load_image"] if task == "image-to-video" else []
    )
    if utils:
        lines.append(f"from diffusers.utils import {', '.join(utils)}")
    lines += [
        "",
        f"base_model = {base_model!r}" + (f"  # {base_model_note}" if base_model_note else ""),
        f"student = {repo!r}",
        "",
        "# The scheduler config makes the pipeline visit the student's timesteps.",
        "scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(",
        '    student, subfolder="scheduler"',
        ")",
    ]
    two_experts = len(family.transformer_components) > 1  # Wan 2.2 A14B
    if lora:
        lines += [
            f"pipe = {pipeline_class_name}.from_pretrained(",
            "    base_model, scheduler=scheduler, dtype=torch.bfloat16",
            ")",
            f"pipe.load_lora_weights(student, weight_name={lora_weight_name!r})",
        ]
        if two_experts:
            lines += [
                "# The low-noise expert's adapter goes into transformer_2.",
                "pipe.load_lora_weights(",
                f"    student, weight_name={_LORA_WEIGHTS_2!r}, load_into_transformer_2=True",
                ")",
            ]
    elif two_experts:
        lines += [
            "# transformer: the high-noise expert; transformer_2: the low-noise one.",
            f"transformer = {transformer_class}.from_pretrained(",
            '    student, subfolder="transformer", dtype=torch.bfloat16',
            ")",
            f"transformer_2 = {transformer_class}.from_pretrained(",
            '    student, subfolder="transformer_2", dtype=torch.bfloat16',
            ")",
            f"pipe = {pipeline_class_name}.from_pretrained(",
            "    base_model,",
            "    transformer=transformer,",
            "    transformer_2=transformer_2,",
            "    scheduler=scheduler,",
            "    dtype=torch.bfloat16,",
            ")",
        ]
    else:
        lines += [
            f"transformer = {transformer_class}.from_pretrained(",
            '    student, subfolder="transformer", dtype=torch.bfloat16',
            ")",
            f"pipe = {pipeline_class_name}.from_pretrained(",
            "    base_model,",
            "    transformer=transformer,",
            "    scheduler=scheduler,",
            "    dtype=torch.bfloat16,",
            ")",
        ]
    lines.append('pipe.to("cuda")')
    lines.append("")
    call = [f"    {prompt!r},"]
    if task == "image-to-video":  # its __call__ takes the image first
        call = ['    image=load_image("first_frame.png"),', f"    prompt={prompt!r},"]
    call += [f"    {key}={_literal(value, key)}," for key, value in pipeline_kwargs.items()]
    if task == "text-to-image":
        lines += ["image = pipe(", *call, ").images[0]", 'image.save("student.png")']
    else:
        lines += [
            "video = pipe(",
            *call,
            ").frames[0]",
            f'export_to_video(video, "student.mp4", fps={family.video_fps or 16})',
        ]
    return "\n".join(lines)


def _widget(
    output_dir: Path, validation_images: Sequence[str | os.PathLike | tuple[Any, str]]
) -> list[dict[str, Any]]:
    """Widget entries (``{"text": prompt, "output": {"url": path}}``) for sample files that ship
    in ``output_dir``; a bare path has no prompt."""
    widget = []
    for item in validation_images:
        path, prompt = item if isinstance(item, tuple) else (item, "")
        path = Path(path)
        full = path if path.is_absolute() else output_dir / path
        try:
            relative = full.resolve().relative_to(output_dir.resolve())
        except ValueError:
            raise ValueError(
                f"validation image {str(path)!r} is outside output_dir={str(output_dir)!r}; the "
                "card can only show files that are uploaded with the model"
            ) from None
        if not full.is_file():
            raise FileNotFoundError(f"validation image {str(full)!r} does not exist")
        # The Hub shows " " for an empty prompt, as the diffusers training scripts write it.
        widget.append({"text": prompt or " ", "output": {"url": relative.as_posix()}})
    return widget


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _recipe_rows(
    recipe: DMDConfig, t_list: Sequence[float], sample_type: str
) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("student steps", len(t_list) - 1),
        ("student timesteps (`t_list`)", list(t_list)),
        ("sampling", "SDE (x0, then fresh noise)" if sample_type == "sde" else "ODE (Euler)"),
        ("teacher CFG scale", recipe.guidance_scale if recipe.guidance_scale else "off"),
        ("timestep distribution", recipe.sample_t_cfg.time_dist_type),
        ("fake-score parameterisation", recipe.fake_score_pred_type or recipe.pred_type),
        ("student update every", f"{recipe.student_update_freq} critic steps"),
        ("GAN generator weight", recipe.gan_loss_weight_gen or "off"),
    ]
    if recipe.gan_r1_reg_weight > 0:
        rows.append(("R1 weight", recipe.gan_r1_reg_weight))
    simulation = "yes" if recipe.backward_simulation else "no"
    if recipe.backward_simulation and recipe.backward_simulation_prob < 1:
        simulation = f"{recipe.backward_simulation_prob:g} of the iterations, else real latents"
    rows.append(("backward simulation", simulation))
    # The stabilizers, only when on (SenseFlow and CFG-norm options of DMDConfig).
    if recipe.guidance_scale_range is not None:
        low, high = recipe.guidance_scale_range
        rows.append(("teacher CFG scale per sample", f"U({low:g}, {high:g})"))
    if recipe.guidance_norm is not None:
        norm = recipe.guidance_norm
        if norm == "clamp":
            norm += f", k = {recipe.guidance_norm_clamp:g}"
        rows.append(("guidance norm", norm))
    if recipe.ida_ratio > 0:
        rows.append(("IDA ratio", recipe.ida_ratio))
    if recipe.isg_weight > 0:
        rows.append(("ISG weight", recipe.isg_weight))
    if recipe.gan_rung_weighting != "constant":
        rows.append(("GAN weight per rung", "(1 - t)^2"))
    if recipe.ema is not None:
        rows.append(("EMA", f"{recipe.ema.type}, exported weights are the EMA"))
    return rows


def _local_base(base_model: str, repo_id: str | None) -> tuple[str, str | None]:
    """The base model as the card names it, and a note for the snippet: a Hub id as given; a
    local folder as an absolute path in a local card, by its folder name only in a card for
    the Hub (which must not carry the paths of the training machine)."""
    if not os.path.exists(base_model):
        return base_model, None
    if repo_id is None:
        return str(Path(base_model).resolve()), None
    name = Path(base_model).resolve().name
    return name, f"trained from a local folder named {name!r}: put its Hub id or path here"


def _requirements(lora: bool, video: bool) -> str:
    extras = ["peft"] if lora else []
    extras += ["imageio", "imageio-ffmpeg"] if video else []
    return "pip install -U diffusers transformers accelerate" + "".join(f" {e}" for e in extras)


def _description(
    *,
    base_model: str,
    repo: str,
    repo_id: str | None,
    family: Family,
    recipe_name: str,
    recipe: DMDConfig,
    t_list: Sequence[float],
    sample_type: str,
    lora: bool,
    pipeline_class_name: str,
    pipeline_kwargs: Mapping[str, Any],
    widget: list[dict[str, Any]],
    extra: Mapping[str, Any] | None,
    teacher_lora: tuple[str, float] | None = None,
) -> str:
    steps = len(t_list) - 1
    kind = "LoRA adapter" if lora else "full transformer"
    on_hub = _hub_id(base_model) is not None
    base_model, base_note = _local_base(base_model, repo_id)
    if os.path.exists(recipe_name):  # a recipe file: named, not located, in a card for the Hub
        recipe_file = Path(recipe_name).resolve()
        recipe_name = str(recipe_file) if repo_id is None else recipe_file.name
    base = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"
    parts = [
        f"A {steps}-step DMD2 student of {base}, "
        f"distilled with the `{recipe_name}` recipe (distribution matching distillation with "
        f"a fake-score critic{' and a GAN head' if recipe.gan_loss_weight_gen > 0 else ''}). "
        f"The weights are a {kind}: "
        + (
            f"`{_LORA_WEIGHTS}` on top of the base model's transformer."
            if lora
            else "`transformer/`, a drop-in replacement for the base model's."
        ),
    ]
    weight_name = _LORA_WEIGHTS
    if teacher_lora is not None:
        name, scale = teacher_lora
        name = _lora_name(name)
        parts += [
            "",
            f"The teacher was the base model with the LoRA {name} fused in at scale "
            f"{_fmt(scale)}: the student reproduces base + that LoRA in {steps} steps.",
        ]
        if lora:
            weight_name = MERGED_LORA_WEIGHT_NAME
            parts += [
                "",
                f"`{MERGED_LORA_WEIGHT_NAME}` is that LoRA and the student adapter in one LoRA "
                "(stacked along the rank), loaded below. "
                f"`{_LORA_WEIGHTS}` is the student adapter alone, to stack on the LoRA: "
                f'`pipe.load_lora_weights(lora, adapter_name="style")`, '
                '`pipe.load_lora_weights(student, adapter_name="student")`, '
                f'`pipe.set_adapters(["style", "student"], [{_fmt(scale)}, 1.0])`.',
            ]
    if widget:
        parts += ["", "<Gallery />"]
    snippet = render_usage_snippet(
        base_model=base_model,
        repo=repo,
        family=family,
        pipeline_class_name=pipeline_class_name,
        lora=lora,
        pipeline_kwargs=pipeline_kwargs,
        prompt=next((w["text"] for w in widget if w["text"].strip()), _DEFAULT_PROMPT),
        base_model_note=base_note,
        lora_weight_name=weight_name,
    )
    video = _task(family, pipeline_class_name) != "text-to-image"
    needs = ["`peft` (LoRA loading)"] if lora else []
    needs += ["`imageio` and `imageio-ffmpeg` (`export_to_video`)"] if video else []
    parts += [
        "",
        "## Use it with 🧨 diffusers",
        "",
        "Install diffusers with "
        + (" and ".join(needs) if needs else "its usual dependencies")
        + ":",
        "",
        "```bash",
        _requirements(lora, video),
        "```",
        "",
        f"The student runs in the stock `{pipeline_class_name}`. The scheduler shipped in "
        "`scheduler/scheduler_config.json` makes the pipeline visit the student's timesteps; "
        "call it with the arguments below"
        + (
            " (classifier-free guidance is distilled into the student, so it stays off)."
            if recipe.guidance_scale
            else "."
        ),
        "",
        "```python",
        snippet,
        "```",
    ]
    notes = family.card_notes(base_model=base_model, lora=lora)
    if notes:
        parts += ["", notes]
    if t_list[0] != 1.0:
        parts += [
            "",
            f"The student starts from `{_fmt(t_list[0])} * noise` while the pipeline starts from "
            f"the noise as drawn; pass `latents={_fmt(t_list[0])} * noise` for exactly the "
            "student's trajectory.",
        ]
    rows = [("teacher", f"`{base_model}`"), ("recipe", f"`{recipe_name}`")]
    if teacher_lora is not None:
        rows += [("teacher LoRA", f"{_lora_name(teacher_lora[0])} at scale {teacher_lora[1]:g}")]
    rows += _recipe_rows(recipe, t_list, sample_type)
    rows += [(str(k), v) for k, v in (extra or {}).items()]
    parts += ["", "## Training settings", "", "| | |", "|---|---|"]
    parts += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    return "\n".join(parts)


def _lora_name(name: str) -> str:
    # A local LoRA is named by its file or folder name: the card leaves the machine.
    path = Path(os.path.expanduser(name))
    return f"`{path.resolve().name}` (local)" if path.exists() else f"`{name}`"


def _license_fields(family: Family, base_model: str, license: str | None) -> dict[str, str]:
    """The card's licence metadata: ``license`` when given, else the base model's."""
    if license is not None:
        return {"license": license}
    fields = family.card_license(base_model)
    readme = Path(base_model) / "README.md"
    if not fields and readme.is_file():
        data = ModelCard.load(readme).data
        fields = {
            key: str(getattr(data, key))
            for key in ("license", "license_name", "license_link")
            if getattr(data, key, None)
        }
    return fields


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    family: str | Family,
    recipe_name: str,
    recipe: DMDConfig,
    t_list: Sequence[float],
    sample_type: str,
    lora: bool,
    pipeline_class_name: str | None = None,
    repo_id: str | None = None,
    validation_images: Sequence[str | os.PathLike | tuple[Any, str]] = (),
    extra: Mapping[str, Any] | None = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    license: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    teacher_lora: tuple[str, float] | None = None,
) -> Path:
    """Write ``output_dir/README.md`` for the exported student; returns its path.

    Args:
        base_model: the teacher's Hub id (or path), loaded by the snippet for the other components.
        family: the :class:`~fastgen_diffusers.plugins.base.Family` (e.g. from
            ``family_from_pretrained``), or a registered family name (``"sd3"``, ``"flux"``,
            ``"wan"``, ``"wan22"``, ``"qwen_image"``) for its default settings.
        recipe_name / recipe: the recipe's name and its resolved :class:`DMDConfig`.
        t_list: the student's rungs, ending with 0.0 (``len(t_list) - 1`` steps).
        sample_type: ``"ode"`` or ``"sde"``, as in the shipped scheduler config.
        lora: the student ships as ``pytorch_lora_weights.safetensors`` instead of
            ``transformer/``.
        pipeline_class_name: the stock pipeline, e.g. ``"FluxPipeline"``; default: the
            family's ``pipeline_class``.
        repo_id: where the student will live on the Hub; ``None`` writes the absolute
            ``output_dir`` into the snippet.
        validation_images: sample files inside ``output_dir``, as paths or ``(path, prompt)``
            pairs; they become widget entries.
        extra: further ``name: value`` rows of the training-details table (steps, batch size...).
        pipeline_kwargs: call arguments of the snippet; default: the family's
            ``stock_pipeline_kwargs(t_list)``.
        license: the card's license; default: the base model's, from the family's
            ``card_license`` (e.g. FLUX.1-dev's non-commercial licence) or, for a local
            ``base_model`` folder, its own ``README.md``; omitted when unknown.
        height / width / num_frames: the trained size, added to the snippet's call so the
            student runs at what it learnt.
        teacher_lora: ``(LoRA, scale)`` fused into the teacher (``--teacher_lora``): the card
            says so, and a LoRA student's snippet loads the merged LoRA
            (:data:`~fastgen_diffusers.lora.MERGED_LORA_WEIGHT_NAME`).
    """
    from diffusers.utils.hub_utils import populate_model_card

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output_dir={str(output_dir)!r} is not a directory")
    family = _resolve_family(family)
    pipeline_class_name = _check_pipeline_class(
        pipeline_class_name or family.pipeline_class.__name__
    )
    if sample_type not in ("ode", "sde"):
        raise ValueError(f"sample_type={sample_type!r}; expected 'ode' or 'sde'")
    t_list = [float(t) for t in t_list]
    if len(t_list) < 2 or t_list[-1] != 0.0:
        raise ValueError(f"t_list={t_list} must hold the student's rungs followed by 0.0")
    if len(t_list) - 1 != recipe.student_sample_steps:
        raise ValueError(
            f"t_list={t_list} has {len(t_list) - 1} steps but the recipe's "
            f"student_sample_steps={recipe.student_sample_steps}"
        )
    if pipeline_kwargs is None:
        pipeline_kwargs = family.stock_pipeline_kwargs(t_list)
    size = {"height": height, "width": width, "num_frames": num_frames}
    pipeline_kwargs = {**pipeline_kwargs, **{k: v for k, v in size.items() if v is not None}}
    license_fields = _license_fields(family, base_model, license)

    repo = repo_id if repo_id is not None else str(output_dir.resolve())
    widget = _widget(output_dir, validation_images)
    task = _task(family, pipeline_class_name)
    description = _description(
        base_model=base_model,
        repo=repo,
        repo_id=repo_id,
        family=family,
        recipe_name=recipe_name,
        recipe=recipe,
        t_list=t_list,
        sample_type=sample_type,
        lora=lora,
        pipeline_class_name=pipeline_class_name,
        pipeline_kwargs=pipeline_kwargs,
        widget=widget,
        extra=extra,
        teacher_lora=teacher_lora,
    )
    card_data = ModelCardData(
        **license_fields,
        library_name="diffusers",
        base_model=_hub_id(base_model),
        pipeline_tag=task,
        widget=widget or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=f"{repo_id or output_dir.name}: {len(t_list) - 1}-step DMD2 student",
        model_description=description,
    )
    tags = ["diffusers", "diffusers-training"]
    tags += ["lora", "template:sd-lora"] if lora else []
    tags += ["dmd2", "distillation", "few-step", family.name, task]
    card = populate_model_card(card, tags=tags)
    path = output_dir / "README.md"
    write_text_atomic(path, str(card))
    return path
