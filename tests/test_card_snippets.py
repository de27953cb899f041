"""The model card's usage snippet runs as written in the stock diffusers pipeline, from another
directory (the only edits: CPU instead of CUDA, float32 instead of bfloat16), for a full SD3
student and a Flux LoRA student trained one step on the tiny pipelines. (The SD3 LoRA snippet
runs in ``test_hub_training.py``, the Wan video snippet in ``test_video.py``.)"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_dmd2 import args_for, write_prompts, write_recipe
from tiny_pipelines import CALL_KWARGS, save_tiny_flux, save_tiny_sd3

from fastgen_diffusers.training import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def run_card_snippet(out: Path, elsewhere: Path, monkeypatch) -> dict:
    (code,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.S)
    assert f"student = {str(out.resolve())!r}" in code  # a local card: absolute paths
    elsewhere.mkdir(exist_ok=True)  # a test may put input files (first_frame.png) there
    monkeypatch.chdir(elsewhere)
    code = code.replace('pipe.to("cuda")', 'pipe.to("cpu")').replace("bfloat16", "float32")
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "<model card>", "exec"), namespace)
    # The snippet uses diffusers' current argument names (`dtype`, not the deprecated one).
    assert not [w for w in caught if "deprecated" in str(w.message)], caught
    return namespace


def trained(tmp_path: Path, model: Path, family: str, *extra: str) -> Path:
    out = tmp_path / "out"
    train(
        args_for(
            model,
            write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 1\n"),
            write_prompts(tmp_path / "p.jsonl"),
            out,
            "--max_train_steps",
            "1",
            *extra,
            family=family,
        )
    )
    return out


def test_sd3_full_student_snippet_runs_from_another_directory(tmp_path, monkeypatch):
    out = trained(tmp_path, save_tiny_sd3(tmp_path / "tiny-sd3"), "sd3")
    ns = run_card_snippet(out, tmp_path / "elsewhere", monkeypatch)
    pipe = ns["pipe"]
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    # The student's weights (not the base model's) are in the pipeline's transformer.
    student = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in student.items())
    size = CALL_KWARGS["sd3"]
    image = Image.open(tmp_path / "elsewhere" / "student.png")
    assert image.size == (size["width"], size["height"])  # the trained size, from the snippet


def test_flux_lora_snippet_runs_from_another_directory(tmp_path, monkeypatch):
    out = trained(
        tmp_path, save_tiny_flux(tmp_path / "tiny-flux"), "flux", "--use_lora", "--rank", "4"
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    ns = run_card_snippet(out, tmp_path / "elsewhere", monkeypatch)
    pipe = ns["pipe"]
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.get_active_adapters()  # the student's LoRA is loaded and active
    size = CALL_KWARGS["flux"]
    image = Image.open(tmp_path / "elsewhere" / "student.png")
    assert image.size == (size["width"], size["height"])
