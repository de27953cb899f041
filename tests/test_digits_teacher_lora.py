"""``train_dmd2.py --teacher_lora``: the README's digits command plus the shipped thick-strokes
style LoRA (``embedded/digits-thick-lora``, from ``examples/digits/train_style_lora.py``) and
``--use_lora`` (learning rate 1e-3, the LoRA student's). The exported 1-step student, run in the
stock ``StableDiffusion3Pipeline`` with the merged LoRA, keeps the style: its ink (mean
intensity) is the 28-step teacher+style's, not the plain teacher's.

Full-length figures are in the README; this run takes 150 iterations and scores 10 images per
digit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastgen_diffusers.training import parse_args, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
import digits_eval  # noqa: E402

pytestmark = pytest.mark.slow
STYLE = ROOT / "embedded" / "digits-thick-lora"


@pytest.fixture
def one_thread():
    # One thread: on a shared machine spinning OpenMP threads slow each tiny forward by far more
    # than a second thread gains on a quiet one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_student_of_teacher_plus_style_keeps_the_style(tmp_path, one_thread):
    out = tmp_path / "digits-style"
    argv = [
        "--pretrained_model_name_or_path", str(ROOT / "embedded" / "digits-sd3"),
        "--recipe", "general/distillation/dmd2_digits_sd3",
        "--dataset_name", str(ROOT / "examples" / "digits" / "prompts.txt"),
        "--resolution", "32", "--train_batch_size", "16", "--max_train_steps", "150",
        "--learning_rate", "1e-3", "--report_to", "none", "--output_dir", str(out),
        "--use_lora", "--teacher_lora", str(STYLE),
    ]  # fmt: skip
    train(parse_args(argv))
    assert (out / "merged_lora_weights.safetensors").is_file()
    rows = digits_eval.report(
        out,
        teacher_steps=[28],
        student_steps=[1],
        per_digit=10,
        teacher_lora=str(STYLE),
    )
    scores = {row["name"]: row for row in rows}
    student, styled = scores["student_1"], scores["teacher_28"]
    plain = digits_eval.generate(
        digits_eval.load_teacher_pipeline(ROOT / "embedded" / "digits-sd3"), 28, 2.0, 10
    )[0]
    plain_ink = digits_eval.ink(plain)
    # The style adds ink (thicker strokes): the student has the styled teacher's, within a
    # quarter of the gap the style opens over the plain teacher.
    gap = styled["ink"] - plain_ink
    assert gap > 0.03, (styled, plain_ink)
    assert abs(student["ink"] - styled["ink"]) < 0.25 * gap, (student, styled, plain_ink)
    assert student["accuracy"] >= 0.9, student
