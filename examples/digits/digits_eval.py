"""Data, classifier and metrics for the 8x8 handwritten digits that scikit-learn ships.

(Needs scikit-learn for the digits data: ``pip install -e ".[digits]"``.)

The digits (1797 images, ``sklearn.datasets.load_digits``) are upsampled bilinearly to 32x32 and
mapped to [-1, 1]; a fixed 20% split is held out. A small CNN trained on the training split
classifies images, and its penultimate features give a Frechet distance to the held-out digits::

    python examples/digits/digits_eval.py train-classifier --out embedded/digits-classifier.pt
    python examples/digits/digits_eval.py evaluate --pipeline embedded/digits-sd3 \\
        --steps 28 4 2 1 --guidance_scale 4 --per_digit 100 --grid_dir embedded/digits-sd3-samples

After ``train_dmd2.py`` has distilled the shipped teacher into ``outputs/digits``, ``report``
scores teacher and student side by side, writes their grids and prints the quality table::

    python examples/digits/digits_eval.py report --output_dir outputs/digits

``export-dataset`` writes the training split (never the held-out digits) as an image folder
with captions, for runs that need real images (the GAN branch, ``backward_simulation_prob``)::

    python examples/digits/digits_eval.py export-dataset --output_dir outputs/digits-train
    python train_dmd2.py ... --dataset_name outputs/digits-train

    from digits_eval import load_classifier, evaluate
    scores = evaluate(images, labels)  # images [N, C, 32, 32] in [-1, 1] -> accuracy, fd
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

SIZE = 32
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
PROMPT = "a handwritten digit {}"
EMBEDDED = Path(__file__).resolve().parents[2] / "embedded"
DEFAULT_CLASSIFIER = EMBEDDED / "digits-classifier.pt"
DEFAULT_TEACHER = EMBEDDED / "digits-sd3"


# -- data ---------------------------------------------------------------------------------------


DEFAULT_RECIPE = "general/distillation/dmd2_digits_sd3"


def load_digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``[N, 1, 32, 32]`` float32 in [-1, 1] and their ``[N]`` int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # raw range 0..16
    pixels = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return pixels.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.int64)


def split_indices(n: int = 1797, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """The fixed ``(train, held_out)`` index split: a seeded permutation, last 20% held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = round(n * HOLDOUT_FRACTION)
    return sorted(perm[: n - n_held]), sorted(perm[n - n_held :])


def export_training_split(output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the training split as an image folder ``train_dmd2.py --dataset_name`` reads.

    ``output_dir`` gets one 32x32 grayscale PNG per training digit, ``<index>.png`` (the index
    into ``sklearn.datasets.load_digits``), and ``metadata.jsonl`` rows ``{"file_name", "text"}``
    whose captions are the prompts of ``prompts.txt`` (``PROMPT`` with the digit's label). The
    held-out split is never written: the Frechet distance is measured against it. The folder
    appears complete or not at all; an existing one is replaced only with ``overwrite``.
    """
    from fastgen_diffusers.io import atomic_directory

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} already exists; pass --overwrite to replace it "
            "or choose a new folder"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_32()
    train = split_indices(len(images))[0]
    # 8-bit like any image file: at most 1/255 of the range from the teacher's float pixels.
    pixels = ((images[train, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    rows = []
    with atomic_directory(output_dir) as tmp:
        for index, tile in zip(train, pixels):
            name = f"{index:04d}.png"
            Image.fromarray(tile, mode="L").save(tmp / name)
            rows.append({"file_name": name, "text": PROMPT.format(int(labels[index]))})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return output_dir


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, 1, 32, 32]`` (channel mean, resized if needed)."""
    images = images.float().mean(dim=1, keepdim=True)
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images


# -- classifier ---------------------------------------------------------------------------------


class DigitCNN(nn.Module):
    """Two conv stages and a 64-d penultimate layer (the Frechet-distance features)."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )  # fmt: skip
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(self.conv(x))
        return self.head(feats), feats


def train_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitCNN, float]:
    """Trains :class:`DigitCNN` on the training split (small random shifts as augmentation);
    returns it with its held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = load_digits_32()
    train, held = split_indices()
    x, y = images[train], labels[train]
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            # Shifts of up to 2 pixels: generated digits are not centred exactly like the data.
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[held])[0].argmax(1) == labels[held]).float().mean().item()
    return model, acc


def save_classifier(model: DigitCNN, accuracy: float, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "heldout_accuracy": accuracy}, tmp)
    tmp.rename(path)


_CACHE: dict[str, DigitCNN] = {}


def load_classifier(path: str | os.PathLike = DEFAULT_CLASSIFIER) -> DigitCNN:
    key = str(path)
    if key not in _CACHE:
        model = DigitCNN()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        _CACHE[key] = model.eval()
    return _CACHE[key]


@torch.no_grad()
def classify(
    images: torch.Tensor, classifier: DigitCNN | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` ``[N, C, H, W]`` in [-1, 1] -> ``(predicted labels [N], features [N, 64])``."""
    classifier = classifier or load_classifier()
    logits, feats = [], []
    for chunk in to_gray(images).split(512):
        lo, fe = classifier(chunk)
        logits.append(lo)
        feats.append(fe)
    return torch.cat(logits).argmax(1), torch.cat(feats)


# -- metrics ------------------------------------------------------------------------------------


def frechet_distance(
    feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray
) -> float:
    """Frechet distance between Gaussians fitted to two ``[N, D]`` feature sets."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise, as the FID code does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


_REAL_FEATS: dict[str, torch.Tensor] = {}


def heldout_features(classifier: DigitCNN | None = None) -> torch.Tensor:
    """Classifier features of the 360 held-out real digits (the FD reference)."""
    key = str(id(classifier))
    if key not in _REAL_FEATS:
        images, _ = load_digits_32()
        _REAL_FEATS[key] = classify(images[split_indices()[1]], classifier)[1]
    return _REAL_FEATS[key]


def ink(images: torch.Tensor) -> float:
    """The style measure of thick strokes: mean intensity of the gray images, in [0, 1]."""
    return ((to_gray(images).clamp(-1, 1) + 1) / 2).mean().item()


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: DigitCNN | None = None,
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Class accuracy of ``images`` against the digits they were asked for, the Frechet
    distance of their features to ``reference`` features (default: the held-out real digits)
    and their :func:`ink`."""
    pred, feats = classify(images, classifier)
    ref = heldout_features(classifier) if reference is None else reference
    return {
        "accuracy": (pred == labels.to(pred.device)).float().mean().item(),
        "fd": frechet_distance(feats, ref),
        "ink": ink(images),
    }


def save_grid(images: torch.Tensor, path: str | os.PathLike, rows: int = 10, cols: int = 8) -> None:
    """``rows * cols`` images (row-major, [-1, 1]) as one PNG, 2x nearest upscaled."""
    from diffusers.utils import make_image_grid

    gray = to_gray(images[: rows * cols])
    gray = ((gray.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    tiles = [Image.fromarray(tile.numpy()) for tile in gray]
    grid = make_image_grid(tiles, rows=rows, cols=cols).convert("L")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.resize((cols * SIZE * 2, rows * SIZE * 2), Image.NEAREST).save(path)


# -- generation through the stock pipeline ------------------------------------------------------


@torch.no_grad()
def generate(
    pipe,
    steps: int,
    guidance_scale: float,
    per_digit: int,
    seed: int = 1234,
    batch: int = 250,
    dedup_tokens: bool = True,
    **pipeline_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_digit`` images of each digit from ``pipe`` (a ``StableDiffusion3Pipeline``),
    seeds fixed; returns images ``[10 * per_digit, 3, 32, 32]`` in [-1, 1] and labels.

    With ``dedup_tokens`` the prompts are encoded once per chunk and their identical tokens
    (the 256 zero T5 tokens) collapsed (``sd3.collapse_prompt_embeds``, which sets an attention
    processor on ``pipe.transformer`` that weighs each kept token by its multiplicity): the
    same images to float rounding, about 10x fewer text tokens per forward."""
    from fastgen_diffusers.plugins import sd3

    labels = torch.arange(10).repeat_interleave(per_digit)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for chunk in labels.split(batch):
        prompts = [PROMPT.format(int(d)) for d in chunk]
        if dedup_tokens:
            emb = sd3.encode_prompt(pipe, prompts)
            prompt_kwargs = {
                "pooled_prompt_embeds": emb["pooled_prompt_embeds"],
                "negative_pooled_prompt_embeds": emb["negative_pooled_prompt_embeds"],
                **sd3.collapse_prompt_embeds(
                    pipe, emb["prompt_embeds"], emb["negative_prompt_embeds"]
                ),
            }
        else:
            prompt_kwargs = {"prompt": prompts}
        result = pipe(
            **prompt_kwargs,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            **pipeline_kwargs,
        ).images
        out.append(result * 2 - 1)  # the pipeline returns [0, 1]
    return torch.cat(out), labels


def student_sigmas(t_list: list[float], steps: int, shift: float = 1.0) -> list[float]:
    """The noise levels a student trained on ``t_list`` starts each of ``steps`` steps from:
    its rungs (evenly thinned) when ``steps`` divides their number, else its first rung then
    the teacher's ``shift``-ed schedule (more steps than it was trained for)."""
    rungs = [float(t) for t in t_list[:-1]]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(rungs) % steps == 0:
        return rungs[:: len(rungs) // steps]
    u = [1 - i / steps for i in range(steps)]
    return [min(shift * x / (1 + (shift - 1) * x), rungs[0]) for x in u]


def load_teacher_pipeline(
    teacher: str | os.PathLike, teacher_lora: str | None = None, teacher_lora_scale: float = 1.0
):
    """The stock ``StableDiffusion3Pipeline`` of ``teacher``, with ``teacher_lora`` (a diffusers
    LoRA, e.g. ``train_style_lora.py``'s) loaded at ``teacher_lora_scale``."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(teacher)
    if teacher_lora is not None:
        pipe.load_lora_weights(teacher_lora, adapter_name="style")
        pipe.set_adapters(["style"], [teacher_lora_scale])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def student_recipe(output_dir: str | os.PathLike, recipe: str | None = None):
    """The ``DMDConfig`` the student of ``output_dir`` was trained with: ``recipe`` (a name or
    a YAML path) if given, else the resolved recipe ``train_dmd2.py`` recorded in
    ``output_dir/run.json`` (its rungs, ``t_list``, decide the student's sigmas at n steps),
    else the main command's ``dmd2_digits_sd3`` (with a note: a folder without a record)."""
    from fastgen_diffusers import load_config
    from fastgen_diffusers.config import DMDConfig

    if recipe is not None:
        return DMDConfig.model_validate(load_config(recipe))
    record = Path(output_dir) / "run.json"
    if not record.is_file():
        print(f"{record} is missing: assuming {DEFAULT_RECIPE} (pass --recipe otherwise)")
        return DMDConfig.model_validate(load_config(DEFAULT_RECIPE))
    return DMDConfig.model_validate(json.loads(record.read_text())["recipe"])


def check_student_output(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` if it holds an exported student (``scheduler/`` and ``transformer/`` or a
    LoRA file), else a ``FileNotFoundError`` that says what is missing."""
    output_dir = Path(output_dir)
    has_weights = (output_dir / "transformer" / "config.json").is_file() or (
        output_dir / "pytorch_lora_weights.safetensors"
    ).is_file()
    has_scheduler = (output_dir / "scheduler" / "scheduler_config.json").is_file()
    if not (has_weights and has_scheduler):
        raise FileNotFoundError(
            f"--output_dir {str(output_dir)!r} holds no exported student: expected "
            "scheduler/scheduler_config.json and transformer/ (or pytorch_lora_weights.safetensors)"
            ", as train_dmd2.py writes them at the end of a run"
        )
    return output_dir


def load_student_pipeline(output_dir: str | os.PathLike, teacher: str | os.PathLike):
    """The stock ``StableDiffusion3Pipeline`` of ``teacher`` with the distilled student from
    ``train_dmd2.py``'s ``output_dir`` (a full ``transformer/`` or a LoRA file) and its
    scheduler, loaded the way the model card tells users to."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    output_dir = Path(output_dir)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(output_dir, subfolder="scheduler")
    if (output_dir / "transformer").is_dir():
        transformer = SD3Transformer2DModel.from_pretrained(output_dir, subfolder="transformer")
        pipe = StableDiffusion3Pipeline.from_pretrained(
            teacher, transformer=transformer, scheduler=scheduler
        )
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(teacher, scheduler=scheduler)
        merged = output_dir / "merged_lora_weights.safetensors"
        if merged.is_file():  # a student of teacher + a user's LoRA: both in one LoRA
            pipe.load_lora_weights(output_dir, weight_name=merged.name)
        else:
            pipe.load_lora_weights(output_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def report(
    output_dir: str | os.PathLike,
    *,
    teacher: str | os.PathLike = DEFAULT_TEACHER,
    recipe: str | None = None,
    classifier_path: str | os.PathLike = DEFAULT_CLASSIFIER,
    teacher_steps: list[int] = (28, 4, 2, 1),
    student_steps: list[int] = (1, 2, 4),
    per_digit: int = 20,
    seed: int = 1234,
    teacher_lora: str | None = None,
    teacher_lora_scale: float = 1.0,
    fd_reference: str = "real",
) -> list[dict]:
    """Scores the teacher (at the recipe's CFG, and at 1 step without CFG: the student's NFE)
    and the student of ``output_dir`` at each step count; writes ``quality/<name>.png`` grids,
    ``quality/quality.json`` and ``quality/quality.md`` into ``output_dir``; returns the rows.

    ``teacher_lora`` (``train_dmd2.py --teacher_lora``): the teacher is scored with that LoRA
    at ``teacher_lora_scale``. ``fd_reference="teacher"``: the Frechet distance is measured to
    the teacher's own 28-step images (the recipe's CFG, another seed) instead of the held-out
    real digits: how close the student comes to what it distills."""
    check_student_output(output_dir)
    cfg = student_recipe(output_dir, recipe)
    if cfg.student_sample_steps > 1:
        t_list = list(cfg.sample_t_cfg.t_list)
    else:
        t_list = [cfg.sample_t_cfg.max_t, 0.0]
    guidance = float(cfg.guidance_scale or 1.0)
    classifier = load_classifier(classifier_path)
    out = Path(output_dir) / "quality"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if fd_reference not in ("real", "teacher"):
        raise ValueError(f"fd_reference={fd_reference!r}; expected 'real' or 'teacher'")
    # Every image set is one stage: the teachers, the students and the real digits.
    total = len(teacher_steps) + (guidance > 1) + len(student_steps) + 1
    offset = int(fd_reference == "teacher")  # the reference images are the first stage
    total += offset
    reference = None

    def stage(name: str, what: str) -> None:
        print(f"[{len(rows) + 1 + offset}/{total}] {name}: {what}", flush=True)

    def score(name: str, pipe, steps: int, cfg_scale: float, nfe: int, **kwargs) -> None:
        start = time.time()
        stage(name, f"{10 * per_digit} images, {steps} step(s), CFG {cfg_scale:g}, NFE {nfe}")
        # The pipeline's own bar shows the denoising steps of each batch.
        pipe.set_progress_bar_config(desc=name, leave=False)
        images, labels = generate(pipe, steps, cfg_scale, per_digit, seed, **kwargs)
        scores = evaluate(images, labels, classifier, reference)
        cols = min(8, per_digit)  # fewer than 8 per digit: a narrower grid
        save_grid(_grid_order(images, per_digit, cols), out / f"{name}.png", cols=cols)
        row = {"name": name, "steps": steps, "cfg": cfg_scale, "nfe": nfe, **scores}
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    teacher_pipe = load_teacher_pipeline(teacher, teacher_lora, teacher_lora_scale)
    if fd_reference == "teacher":
        print(f"[1/{total}] FD reference: the teacher's 28-step images, seed {seed + 1}")
        images, _ = generate(teacher_pipe, 28, guidance, per_digit, seed + 1)
        reference = classify(images, classifier)[1]
    for steps in teacher_steps:
        nfe = steps * (2 if guidance > 1 else 1)
        score(f"teacher_{steps}", teacher_pipe, steps, guidance, nfe)
    if guidance > 1:  # the teacher at the 1-step student's cost: one step, one forward
        score("teacher_1_nocfg", teacher_pipe, 1, 1.0, 1)
    del teacher_pipe
    student_pipe = load_student_pipeline(output_dir, teacher)
    for steps in student_steps:
        sigmas = student_sigmas(t_list, steps, shift=float(cfg.sample_t_cfg.shift))
        score(f"student_{steps}", student_pipe, steps, 1.0, steps, sigmas=sigmas)
    real, real_labels = load_digits_32()
    train = split_indices()[0]
    stage("real digits", f"{len(train)} images of the train split")
    rows.append(
        {
            "name": "real digits (train split)",
            **evaluate(real[train], real_labels[train], classifier, reference),
        }
    )
    heldout = torch.load(classifier_path, map_location="cpu", weights_only=True).get(
        "heldout_accuracy"
    )
    tmp = out / "quality.json.tmp"
    record = {
        "rows": rows,
        "classifier_heldout_accuracy": heldout,
        "fd_reference": fd_reference,
        "teacher_lora": teacher_lora,
        "teacher_lora_scale": teacher_lora_scale,
    }
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "quality.json")
    table = markdown_table(rows, heldout, fd_reference)
    (out / "quality.md").write_text(table + "\n")
    grids = ", ".join(f"{row['name']}.png" for row in rows if "steps" in row)
    print(f"grids: {out}/ ({grids})", flush=True)
    print(f"quality table: {out / 'quality.md'} (and quality.json)", flush=True)
    return rows


def markdown_table(
    rows: list[dict], classifier_heldout_accuracy: float | None = None, fd_reference: str = "real"
) -> str:
    """The quality table: one line per image set, accuracy in %, FD to the held-out digits (or
    to the teacher's 28-step images), ink (mean intensity)."""
    lines = [
        "| images | steps | CFG | NFE | class accuracy | Frechet distance | ink |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["name"]]
        cells += [str(row.get(k, "")) if k in row else "-" for k in ("steps", "cfg", "nfe")]
        cells += [f"{100 * row['accuracy']:.1f}%", f"{row['fd']:.1f}"]
        cells += [f"{row['ink']:.3f}" if "ink" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    against = (
        "the teacher's 28-step images (another seed)"
        if fd_reference == "teacher"
        else "the 360 held-out digits"
    )
    if classifier_heldout_accuracy is not None:
        lines.append(
            f"\nClassifier held-out accuracy: {100 * classifier_heldout_accuracy:.1f}% "
            f"(Frechet distance against {against})."
        )
    return "\n".join(lines)


def _grid_order(images: torch.Tensor, per_digit: int, cols: int = 8) -> torch.Tensor:
    """The first ``cols`` images of each digit, digit d in row d."""
    return torch.cat([images[d * per_digit : d * per_digit + cols] for d in range(10)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tc = sub.add_parser("train-classifier")
    tc.add_argument("--out", default=str(DEFAULT_CLASSIFIER))
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--epochs", type=int, default=30)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--pipeline", required=True)
    ev.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    ev.add_argument("--steps", type=int, nargs="+", default=[28, 4, 2, 1])
    ev.add_argument("--guidance_scale", type=float, default=4.0)
    ev.add_argument("--per_digit", type=int, default=100)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--shift", type=float, default=None, help="override the scheduler's shift")
    ev.add_argument("--grid_dir", default=None)
    ev.add_argument("--grid_prefix", default="teacher")
    ev.add_argument("--json_out", default=None)
    ev.add_argument("--threads", type=int, default=2)
    ex = sub.add_parser(
        "export-dataset",
        help="the training split as an image folder with captions, for train_dmd2.py",
    )
    ex.add_argument("--output_dir", required=True, help="the folder to write (must not exist)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    rp = sub.add_parser("report", help="teacher vs distilled student: grids and quality table")
    rp.add_argument("--output_dir", required=True, help="train_dmd2.py's --output_dir")
    rp.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    rp.add_argument(
        "--recipe",
        default=None,
        help="the recipe the student used (default: the one recorded in OUTPUT_DIR/run.json)",
    )
    rp.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    rp.add_argument("--teacher_steps", type=int, nargs="*", default=[28, 4, 2, 1])
    rp.add_argument("--student_steps", type=int, nargs="+", default=[1, 2, 4])
    rp.add_argument("--per_digit", type=int, default=20)
    rp.add_argument("--seed", type=int, default=1234)
    rp.add_argument("--threads", type=int, default=2)
    rp.add_argument(
        "--teacher_lora", default=None, help="the teacher's LoRA (train_dmd2.py --teacher_lora)"
    )
    rp.add_argument("--teacher_lora_scale", type=float, default=1.0)
    rp.add_argument(
        "--fd_reference",
        choices=["real", "teacher"],
        default="real",
        help="Frechet distance to the held-out real digits, or to the teacher's 28-step images",
    )
    args = parser.parse_args()

    if args.command == "report":
        torch.set_num_threads(args.threads)
        try:
            rows = report(
                args.output_dir,
                teacher=args.teacher,
                recipe=args.recipe,
                classifier_path=args.classifier,
                teacher_steps=args.teacher_steps,
                student_steps=args.student_steps,
                per_digit=args.per_digit,
                seed=args.seed,
                teacher_lora=args.teacher_lora,
                teacher_lora_scale=args.teacher_lora_scale,
                fd_reference=args.fd_reference,
            )
        except (FileNotFoundError, ValueError) as err:
            rp.error(str(err))
        print(markdown_table(rows, fd_reference=args.fd_reference))
        return

    if args.command == "export-dataset":
        try:
            folder = export_training_split(args.output_dir, overwrite=args.overwrite)
        except FileExistsError as err:
            ex.error(str(err))
        count = len(split_indices()[0])
        print(f"wrote {count} training digits and metadata.jsonl to {folder}")
        return

    if args.command == "train-classifier":
        start = time.time()
        model, acc = train_classifier(args.seed, args.epochs)
        save_classifier(model, acc, args.out)
        print(json.dumps({"heldout_accuracy": acc, "seconds": round(time.time() - start, 1)}))
        return

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.set_num_threads(args.threads)
    classifier = load_classifier(args.classifier)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=args.shift
        )
    results = {}
    for steps in args.steps:
        start = time.time()
        images, labels = generate(pipe, steps, args.guidance_scale, args.per_digit, args.seed)
        scores = evaluate(images, labels, classifier)
        scores["seconds"] = round(time.time() - start, 1)
        results[steps] = scores
        print(json.dumps({"steps": steps, **scores}), flush=True)
        if args.grid_dir:
            path = Path(args.grid_dir) / f"{args.grid_prefix}_{steps}.png"
            cols = min(8, args.per_digit)
            save_grid(_grid_order(images, args.per_digit, cols), path, cols=cols)
    real_images, real_labels = load_digits_32()
    # Reference: the real training split against the held-out split (the FD noise floor).
    train = split_indices()[0]
    results["real_train"] = evaluate(real_images[train], real_labels[train], classifier)
    print(json.dumps({"steps": "real_train", **results["real_train"]}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
