"""The shipped digits teacher (``embedded/digits-sd3``) loads with the stock SD3 pipeline and
draws the digits it is asked for.

The folder is made by ``examples/digits/train_teacher.py``; its T5 is a tiny encoder whose output
is exactly zero, the text the transformer was trained on.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "embedded" / "digits-sd3"
CLASSIFIER = ROOT / "embedded" / "digits-classifier.pt"
sys.path.insert(0, str(ROOT / "examples" / "digits"))
import digits_eval  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(TEACHER)  # bare: every part is in the folder
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t5_embeddings_are_zero(pipe):
    prompts = [digits_eval.PROMPT.format(3), ""]
    t5 = pipe._get_t5_prompt_embeds(prompts)  # what the pipeline feeds the transformer
    assert t5.shape == (2, 256, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(t5, torch.zeros_like(t5))
    embeds, negative, _, _ = pipe.encode_prompt(prompts, prompts, prompts)
    # [CLIP tokens zero-padded to the T5 width | 256 T5 tokens]: the T5 part is exactly zero.
    assert embeds.shape[1] == pipe.tokenizer.model_max_length + 256
    assert torch.equal(embeds[:, -256:], torch.zeros_like(embeds[:, -256:]))
    assert torch.equal(negative[:, -256:], torch.zeros_like(negative[:, -256:]))


@torch.no_grad()
def test_generates_the_requested_digits(pipe):
    digits = list(range(10))
    images = pipe(
        prompt=[digits_eval.PROMPT.format(d) for d in digits],
        num_inference_steps=28,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (10, 3, 32, 32)
    predicted, _ = digits_eval.classify(images * 2 - 1, digits_eval.load_classifier(CLASSIFIER))
    correct = (predicted == torch.tensor(digits)).sum().item()
    assert correct >= 9, f"classifier read {predicted.tolist()} for digits {digits}"


def test_report_refuses_a_folder_without_a_student(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no exported student"):
        digits_eval.report(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for a wrong path


def test_save_grid_is_pixel_identical_to_the_reshaped_layout(tmp_path):
    images = torch.rand(80, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    digits_eval.save_grid(images, tmp_path / "grid.png")
    # The layout before make_image_grid: digit rows of 8 tiles, reshaped, 2x nearest.
    gray = digits_eval.to_gray(images)
    gray = ((gray.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    grid = gray.view(10, 8, 32, 32).permute(0, 2, 1, 3).reshape(320, 256)
    expected = grid.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), expected)


def test_report_shows_each_stage_and_where_it_wrote(tmp_path, capsys):
    out = tmp_path / "run"  # the teacher itself as the "student": only the wiring is tested
    for part in ("transformer", "scheduler"):
        shutil.copytree(TEACHER / part, out / part)
    rows = digits_eval.report(out, teacher_steps=[1], student_steps=[1], per_digit=1)
    assert [row["name"] for row in rows][-1] == "real digits (train split)"
    stdout = capsys.readouterr().out
    stages = re.findall(r"^\[(\d)/(\d)\] (\S+)", stdout, flags=re.M)
    # teacher at 1 step with CFG and without, the student, the real digits.
    assert stages == [
        ("1", "4", "teacher_1:"),
        ("2", "4", "teacher_1_nocfg:"),
        ("3", "4", "student_1:"),
        ("4", "4", "real"),
    ]
    assert "[1/4] teacher_1: 10 images, 1 step(s), CFG 2, NFE 2" in stdout  # the recipe's CFG
    quality = out / "quality"
    assert f"grids: {quality}/ (teacher_1.png, teacher_1_nocfg.png, student_1.png)" in stdout
    assert stdout.rstrip().endswith(f"quality table: {quality / 'quality.md'} (and quality.json)")
    for name in ("teacher_1", "teacher_1_nocfg", "student_1"):
        assert (quality / f"{name}.png").is_file()


def test_report_takes_the_students_rungs_from_its_run_record(tmp_path):
    import json

    from fastgen_diffusers import load_dmd_config

    cfg = load_dmd_config("general/distillation/dmd2_digits_sd3_4step")
    (tmp_path / "run.json").write_text(json.dumps({"recipe": cfg.model_dump(mode="json")}))
    recorded = digits_eval.student_recipe(tmp_path)
    assert recorded == cfg
    t_list = recorded.sample_t_cfg.t_list
    # 4 rungs: 4 steps take them all, 2 every other one, 1 the first.
    assert digits_eval.student_sigmas(t_list, 4) == [0.999, 0.9, 0.75, 0.5]
    assert digits_eval.student_sigmas(t_list, 2) == [0.999, 0.75]
    assert digits_eval.student_sigmas(t_list, 1) == [0.999]
    # An explicit recipe wins; a folder without a record is taken for the main command's.
    one_step = digits_eval.student_recipe(tmp_path, "general/distillation/dmd2_digits_sd3")
    assert one_step.student_sample_steps == 1
    assert digits_eval.student_recipe(tmp_path / "elsewhere") == one_step
