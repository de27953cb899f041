"""``train_dmd2.py`` end to end on tiny local pipelines: SD3 (full student, EMA), Flux (shared-base
LoRA with the GAN branch on images), Wan (video); the exported student in the stock pipeline;
exact resume; the Hub upload against a stand-in server; bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hub_server import TOKEN, StandInHub
from PIL import Image
from tiny_pipelines import CALL_KWARGS, save_tiny_flux, save_tiny_sd3, save_tiny_wan

from fastgen_diffusers.plugins import family_from_pretrained
from fastgen_diffusers.sampling import sample_student
from fastgen_diffusers.training import parse_args, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a boat"]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


def write_images(folder: Path, n: int = 4, size: tuple[int, int] = (24, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / name
        )
        rows.append(json.dumps({"file_name": name, "text": PROMPTS[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def args_for(model: Path, recipe: Path, data: Path, out: Path, *extra: str, family="sd3"):
    size = CALL_KWARGS[family]
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--recipe",
        str(recipe),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--height",
        str(size["height"]),
        "--width",
        str(size["width"]),
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "3",
    ]
    if "num_frames" in size:
        argv += ["--num_frames", str(size["num_frames"])]
    return parse_args(argv + list(extra))


def losses(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "logs" / "losses.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run appends: the last entry of a step wins
    return rows


SD3_RECIPE = """\
guidance_scale: 2.0
student_update_freq: 2
sample_t_cfg:
  time_dist_type: logitnormal
ema:
  decay: 0.9
"""


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    model = save_tiny_sd3(root / "model")
    recipe = write_recipe(root / "recipe.yaml", SD3_RECIPE)
    data = write_prompts(root / "prompts.jsonl")
    out = root / "out"
    args = args_for(
        model,
        recipe,
        data,
        out,
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "3",
        "--validation_prompts",
        "a cat",
        "a dog",
        "--teacher_validation_steps",
        "4",
        "--report_to",
        "tensorboard",
        "--checkpoints_total_limit",
        "2",
    )
    train(args)
    return root, model, recipe, data, out


def test_sd3_run_writes_a_complete_output(sd3_run):
    root, model, recipe, data, out = sd3_run
    assert (out / "transformer" / "config.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "sigmas=[0.999]" in card
    pngs = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert pngs == [
        "final-0.png",  # the final weights, one image per prompt: the model card's gallery
        "final-1.png",
        "student-000000.png",
        "student-000003.png",
        "student-000006.png",
        "teacher-000000.png",
    ]
    assert Image.open(out / "validation" / "student-000003.png").size == (2 * 24, 2 * 16)
    # every 2nd iteration, the oldest rotated out, the last iteration always saved
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / "COMPLETE").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    assert list((out / "logs" / "dmd2").glob("events.out.tfevents*"))  # tensorboard
    rows = losses(out)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert "student/vsd" in rows[1] and "fake_score/fake_score" in rows[2]  # alternation
    assert all(np.isfinite(v) for r in rows.values() for k, v in r.items() if k != "step")
    # the cache is reused by a second run on the same inputs
    assert len(list((out / "cache").iterdir())) == 1


def test_sd3_export_runs_in_the_stock_pipeline(sd3_run):
    root, model, recipe, data, out = sd3_run
    family = family_from_pretrained(model)
    pipe = family.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import SD3Transformer2DModel

    pipe.transformer = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    t_list = [0.999, 0.0]
    shape = family.latent_shape(pipe, 16, 24)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    stock = pipe(
        prompt="a cat",
        latents=t_list[0] * noise,
        output_type="latent",
        height=16,
        width=24,
        **family.stock_pipeline_kwargs(t_list),
    ).images
    cond = family.encode_prompts(pipe, ["a cat"])
    ehs = cond.pop("encoder_hidden_states")
    ours = sample_student(
        family.wrap(pipe.transformer), noise, t_list, encoder_hidden_states=ehs, model_kwargs=cond
    )
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    # the exported weights are the EMA of the student, not the teacher's
    teacher = family.load_pipeline(model).transformer
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(teacher.parameters(), pipe.transformer.parameters())
    )
    assert diff > 1e-6


def _state_tensors(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's training-state tensors named ``<prefix>/...`` (one process wrote it:
    one file holding the full tensors), without the prefix."""
    from safetensors.torch import load_file

    (state,) = (checkpoint / "state").glob("*.safetensors")
    return {k[len(prefix) + 1 :]: v for k, v in load_file(state).items() if k.startswith(prefix)}


def _stock_and_ours(family, pipe, t_list: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One "a cat" sample from the stock pipeline and from ``sample_student`` with the
    pipeline's (loaded) transformer, from the same noise."""
    pipe.set_progress_bar_config(disable=True)
    shape = family.latent_shape(pipe, 16, 24)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    stock = pipe(
        prompt="a cat",
        latents=t_list[0] * noise,
        output_type="latent",
        height=16,
        width=24,
        **family.stock_pipeline_kwargs(t_list),
    ).images
    cond = family.encode_prompts(pipe, ["a cat"])
    ehs = cond.pop("encoder_hidden_states")
    ours = sample_student(
        family.wrap(pipe.transformer), noise, t_list, encoder_hidden_states=ehs, model_kwargs=cond
    )
    return stock, ours


def test_every_checkpoint_is_a_student_the_stock_pipeline_loads(sd3_run):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    root, model, recipe, data, out = sd3_run
    family = family_from_pretrained(model)
    t_list = [0.999, 0.0]
    expected_scheduler = family.student_scheduler_config(
        t_list, "ode", dict(family.load_pipeline(model).scheduler.config)
    )
    for checkpoint in (out / "checkpoint-4", out / "checkpoint-6"):
        weights = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
        # The EMA weights at that step, exactly (fp32 run: saved in fp32, no rounding).
        ema = _state_tensors(checkpoint, "ema")
        assert weights.keys() == {k.removeprefix("transformer.") for k in ema}
        assert all(torch.equal(weights[k.removeprefix("transformer.")], v) for k, v in ema.items())
        assert not torch.equal(
            ema["transformer.proj_out.weight"],
            _state_tensors(checkpoint, "student")["transformer.proj_out.weight"],
        )  # the EMA, not the live one
        # Written by diffusers' SchedulerMixin.save_pretrained, the family's values kept.
        saved = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
        assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert "_diffusers_version" in saved
        assert {k: saved[k] for k in expected_scheduler if k != "_class_name"} == {
            k: v for k, v in expected_scheduler.items() if k != "_class_name"
        }
        pipe = StableDiffusion3Pipeline.from_pretrained(
            model,
            transformer=SD3Transformer2DModel.from_pretrained(checkpoint, subfolder="transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
                checkpoint, subfolder="scheduler"
            ),
        )
        stock, ours = _stock_and_ours(family, pipe, t_list)
        # Same fp32 weights, same noise: only the scheduler's arithmetic order differs (as in
        # the final export's test).
        torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    # The last checkpoint holds what the final export holds.
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    last = load_file(out / "checkpoint-6" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert (out / "scheduler" / "scheduler_config.json").read_text() == (
        out / "checkpoint-6" / "scheduler" / "scheduler_config.json"
    ).read_text()


def test_output_folder_holds_one_run(sd3_run, tmp_path):
    from fastgen_diffusers.training.errors import UserError
    from fastgen_diffusers.training.export import other_run_export

    root, model, recipe, data, out = sd3_run
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("transformer", "scheduler", "validation", "checkpoint-6"):
        shutil.copytree(out / name, folder / name)
    for name in ("README.md", "run.json"):
        shutil.copy(out / name, folder / name)
    same = args_for(model, recipe, data, folder, "--max_train_steps", "6")
    assert other_run_export(same) == []  # the same run again (a resume): nothing to refuse
    lora = ("--use_lora", "--rank", "4", "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(UserError, match=r"a full student \(transformer/\).*--overwrite_output_dir"):
        train(args_for(model, recipe, data, folder, *lora))
    record = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**record, "model": "someone/other-model"}))
    with pytest.raises(UserError, match="'someone/other-model'.*another --output_dir"):
        train(args_for(model, recipe, data, folder, "--max_train_steps", "1"))
    (folder / "run.json").write_text(json.dumps(record))
    assert (folder / "transformer").is_dir()  # a refused run removes nothing

    shutil.copytree(out / "logs", folder / "logs")  # the earlier run's losses, steps 1-6
    train(args_for(model, recipe, data, folder, *lora, "--overwrite_output_dir"))
    # The loss log holds this run's one iteration only.
    assert len((folder / "logs" / "losses.jsonl").read_text().splitlines()) == 1
    assert losses(folder).keys() == {1}
    names = sorted(p.name for p in folder.iterdir() if p.name != "cache")
    # The old export is gone, its checkpoint kept; the new run's export only.
    assert names == [
        "README.md",
        "checkpoint-1",
        "checkpoint-6",
        "logs",
        "pytorch_lora_weights.safetensors",
        "run.json",
        "scheduler",
    ]
    assert json.loads((folder / "run.json").read_text())["layout"] == "shared_lora"
    # and the other way round: a full run into the LoRA folder is refused
    with pytest.raises(UserError, match=r"a LoRA student \(pytorch_lora_weights"):
        train(args_for(model, recipe, data, folder, "--max_train_steps", "1"))


def test_resume_reproduces_the_straight_run_exactly(sd3_run, tmp_path):
    root, model, recipe, data, out = sd3_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-4", resumed / "checkpoint-4")
    shutil.copytree(out / "cache", resumed / "cache")
    # a half-written later checkpoint must be ignored by "latest"
    shutil.copytree(out / "checkpoint-4", resumed / "checkpoint-5")
    (resumed / "checkpoint-5" / "COMPLETE").unlink()
    args = args_for(
        model,
        recipe,
        data,
        resumed,
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
    )
    train(args)
    straight, again = losses(out), losses(resumed)
    assert sorted(again) == [5, 6]
    for step in (5, 6):
        assert again[step] == straight[step]  # exact, float for float
    from safetensors.torch import load_file

    a = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flux_shared_lora_with_gan_on_images(tmp_path):
    model = save_tiny_flux(tmp_path / "model")
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        """\
student_sample_steps: 2
student_update_freq: 2
gan_loss_weight_gen: 0.1
gan_r1_reg_weight: 10.0
gan_use_same_t_noise: true
sample_t_cfg:
  time_dist_type: uniform
  t_list: [0.999, 0.5, 0.0]
""",
    )
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    train(
        args_for(
            model,
            recipe,
            images,
            out,
            "--use_lora",
            "--rank",
            "4",
            "--max_train_steps",
            "4",
            "--gradient_checkpointing",
            "--gradient_accumulation_steps",
            "2",
            family="flux",
        )
    )
    rows = losses(out)
    assert "student/gan_gen" in rows[1] and "discriminator/r1" in rows[2]
    # the monitors' first check, against the images' latents (no prompt pairs at batch 1)
    assert {"monitor/saturation", "monitor/grad_norm"} <= rows[1].keys()
    assert "monitor/diversity_prompt" not in rows[1]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "transformer").exists()

    family = family_from_pretrained(model)
    pipe = family.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    t_list = [0.999, 0.5, 0.0]
    shape = family.latent_shape(pipe, 16, 24)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    from fastgen_diffusers.plugins import flux

    stock = pipe(
        prompt="a cat",
        latents=flux.student_initial_latents(noise, t_list),
        height=16,
        width=24,
        output_type="latent",
        **family.stock_pipeline_kwargs(t_list),
    ).images
    cond = family.encode_prompts(pipe, ["a cat"])
    ehs = cond.pop("encoder_hidden_states")
    ours = sample_student(
        family.wrap(pipe.transformer), noise, t_list, encoder_hidden_states=ehs, model_kwargs=cond
    )
    torch.testing.assert_close(stock, flux.pack_latents(ours), rtol=1e-4, atol=1e-5)


def test_sd3_shared_lora_with_every_stabilizer(tmp_path):
    # Every stabilizer at once through train_dmd2 (LoRA IDA, ISG, per-sample CFG with norm
    # rescale, the backward-simulation mix over real latents, the GAN weight per rung).
    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        """\
guidance_scale: 2.0
guidance_scale_range: [1.5, 3.0]
guidance_norm: rescale
student_sample_steps: 2
student_update_freq: 2
backward_simulation: true
backward_simulation_prob: 0.5
ida_ratio: 0.03
isg_weight: 1.0
isg_margin: 0.02
gan_loss_weight_gen: 0.1
gan_rung_weighting: one_minus_t_squared
sample_t_cfg:
  t_list: [0.999, 0.5, 0.0]
""",
    )
    out = tmp_path / "out"
    images = write_images(tmp_path / "images")
    train(
        args_for(model, recipe, images, out, "--use_lora", "--rank", "4", "--max_train_steps", "4")
    )
    rows = losses(out)
    assert {"student/vsd", "student/isg", "student/gan_gen"} <= set(rows[1])
    assert all(
        np.isfinite(v) for row in rows.values() for v in row.values() if isinstance(v, float)
    )
    card = (out / "README.md").read_text()
    assert "IDA ratio" in card and "U(1.5, 3)" in card
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_wan_video_student(tmp_path):
    model = save_tiny_wan(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", "guidance_scale: 3.0\nstudent_update_freq: 2\n")
    out = tmp_path / "out"
    train(
        args_for(
            model,
            recipe,
            write_prompts(tmp_path / "p.jsonl"),
            out,
            "--max_train_steps",
            "3",
            "--validation_prompts",
            "a cat",
            "--validation_steps",
            "3",
            family="wan",
        )
    )
    assert (out / "transformer" / "config.json").is_file()
    snippet = (out / "README.md").read_text().split("```python")[1].split("```")[0]
    assert "WanPipeline" in snippet and "sigmas" not in snippet  # Wan takes no sigmas
    from diffusers import WanTransformer3DModel

    family = family_from_pretrained(model)
    pipe = family.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = WanTransformer3DModel.from_pretrained(out, subfolder="transformer")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    size = CALL_KWARGS["wan"]
    video = pipe(
        prompt="a cat", output_type="pt", **size, **family.stock_pipeline_kwargs([0.999, 0.0])
    ).frames
    assert video.shape[1:3] == (size["num_frames"], 3) and torch.isfinite(video).all()


def test_push_to_hub_against_a_stand_in_server(tmp_path, monkeypatch):
    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 2\n")
    out = tmp_path / "out"
    with StandInHub() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        train(
            args_for(
                model,
                recipe,
                write_prompts(tmp_path / "p.jsonl"),
                out,
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "me/tiny-dmd2",
                "--hub_token",
                TOKEN,
                "--report_to",
                "tensorboard",
            )
        )
        files = hub.repos["me/tiny-dmd2"]["files"]
    assert "README.md" in files and "scheduler/scheduler_config.json" in files
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert not any(f.startswith(("checkpoint-", "logs/", "cache/")) for f in files)
    assert files["README.md"] == (out / "README.md").read_bytes()
    # The token given on the command line reaches no file: tensorboard's hparams (event file
    # and hparams.yml), checkpoints, logs, the card.
    assert list((out / "logs" / "dmd2").glob("*/hparams.yml"))
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_unreachable_hub_stops_the_run_before_training(tmp_path):
    # The login is checked before the teacher loads (the failed *upload* and its retry
    # command: tests/test_hub_training.py).
    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 2\n")
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_dmd2.py"),
            "--pretrained_model_name_or_path",
            str(model),
            "--recipe",
            str(recipe),
            "--dataset_name",
            str(write_prompts(tmp_path / "p.jsonl")),
            "--output_dir",
            str(out),
            "--resolution",
            "32",
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
            "--push_to_hub",
            "--hub_model_id",
            "me/x",
            "--hub_token",
            TOKEN,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "no valid Hugging Face login" in result.stderr and "127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "cache").exists() and not (out / "transformer").exists()


# -- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("bad") / "model")


def test_monitors_reach_the_trackers(tiny_sd3, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path / "recipe.yaml", "guidance_scale: 2.0\nstudent_update_freq: 2\n")
    # two rows per prompt in every batch of 4: the per-prompt diversity is defined
    prompts = write_prompts(tmp_path / "p.jsonl", ["a cat", "a dog"] * 4)
    out = tmp_path / "out"
    argv = ["--max_train_steps", "4", "--train_batch_size", "4", "--monitor_every", "2"]
    train(args_for(tiny_sd3, recipe, prompts, out, *argv, "--report_to", "tensorboard"))
    rows = losses(out)
    keys = {
        "monitor/diversity_prompt",
        "monitor/diversity_prompt_ref",
        "monitor/diversity_prompt_ratio",
        "monitor/diversity_batch_ratio",
        "monitor/std_ratio",
        "monitor/saturation",
        "monitor/ref_saturation",
        "monitor/vsd_weight",
        "monitor/vsd_step",
        "monitor/grad_norm",
    }
    for step in (1, 3):  # the student updates (steps 0 and 2), each a check
        assert keys <= rows[step].keys(), keys - rows[step].keys()
        assert all(np.isfinite(rows[step][k]) for k in keys)
    assert not any(k.startswith("monitor/") for k in rows[2])  # fake-score turn: no check
    # step 0: the student is a copy of the teacher and the reference is the teacher's x0 at
    # the same noise, so the ratios are 1 up to float rounding
    assert rows[1]["monitor/diversity_prompt_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["monitor/std_ratio"] == pytest.approx(1.0, abs=1e-5)
    (events,) = (out / "logs" / "dmd2").glob("events.out.tfevents*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert keys | {"monitor/alarm/diversity", "monitor/fake_score_trend"} <= tags
    assert "WARNING collapse monitor" not in capsys.readouterr().out  # 2 checks < patience 3

    off = tmp_path / "off"
    train(args_for(tiny_sd3, recipe, prompts, off, *argv[:-1], "0"))
    assert not any(k.startswith("monitor/") for row in losses(off).values() for k in row)
    with pytest.raises(SystemExit):
        parse_args(
            [
                "--pretrained_model_name_or_path",
                "m",
                "--recipe",
                "r",
                "--dataset_name",
                "d",
                "--monitor_every",
                "-1",
            ]
        )
    assert "--monitor_every must be >= 0 (0 disables the monitors), got -1" in (
        capsys.readouterr().err
    )


def test_bad_inputs_give_clear_errors(tiny_sd3, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 2\n")
    prompts = write_prompts(tmp_path / "p.jsonl")

    no_column = tmp_path / "no_column.jsonl"
    no_column.write_text(json.dumps({"caption": "a cat"}) + "\n")
    with pytest.raises(ValueError, match="'text'.*caption"):
        train(args_for(tiny_sd3, recipe, no_column, tmp_path / "o1", "--max_train_steps", "1"))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(args_for(tiny_sd3, recipe, empty, tmp_path / "o2", "--max_train_steps", "1"))

    images = write_images(tmp_path / "images")
    (images / "1.png").write_bytes(b"not a png")
    gan = write_recipe(tmp_path / "gan.yaml", "gan_loss_weight_gen: 0.1\n")
    with pytest.raises(Exception, match="row 1.*1.png"):
        train(args_for(tiny_sd3, gan, images, tmp_path / "o3", "--max_train_steps", "1"))

    typo = write_recipe(tmp_path / "typo.yaml", "guidance_scal: 2.0\n")
    with pytest.raises(ValueError, match="guidance_scal"):
        train(args_for(tiny_sd3, typo, prompts, tmp_path / "o4", "--max_train_steps", "1"))

    with pytest.raises(ValueError, match="needs real images"):
        train(args_for(tiny_sd3, gan, prompts, tmp_path / "o5", "--max_train_steps", "1"))

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file
            target = tmp_path / "a_file" / "out"
            (tmp_path / "a_file").write_text("")
        else:
            target = locked / "out"
        with pytest.raises(PermissionError, match="not writable"):
            train(args_for(tiny_sd3, recipe, prompts, target, "--max_train_steps", "1"))
    finally:
        locked.chmod(0o700)


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_dmd2.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--pretrained_model_name_or_path",
        "--recipe",
        "--recipe_overrides",
        "--dataset_name",
        "--use_lora",
        "--lora_layout",
        "--rank",
        "--resume_from_checkpoint",
        "--push_to_hub",
        "--validation_prompts",
        "--checkpoints_total_limit",
        "--mixed_precision",
        "--max_grad_norm",
    ):
        assert flag in result.stdout
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_dmd2.py"),
            "--pretrained_model_name_or_path",
            "x",
            "--recipe",
            "r",
            "--dataset_name",
            "d",
            "--rank",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--rank must be >= 1, got 0" in bad.stderr


def test_shared_lora_resume_reproduces_the_straight_run(tmp_path):
    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", SD3_RECIPE)
    data = write_prompts(tmp_path / "p.jsonl")
    lora = ("--use_lora", "--rank", "4", "--max_train_steps", "6", "--checkpointing_steps", "3")
    straight = tmp_path / "straight"
    train(args_for(model, recipe, data, straight, *lora))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train(args_for(model, recipe, data, resumed, *lora, "--resume_from_checkpoint", "latest"))
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6] and all(b[s] == a[s] for s in (4, 5, 6))
    from safetensors.torch import load_file

    wa = load_file(straight / "pytorch_lora_weights.safetensors")
    wb = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # Every checkpoint of the straight run is a LoRA the stock pipeline loads: the EMA adapter
    # at that step, exactly (fp32 run), and it samples as sample_student does.
    from diffusers import StableDiffusion3Pipeline

    family = family_from_pretrained(model)
    for checkpoint in (straight / "checkpoint-3", straight / "checkpoint-6"):
        lora = load_file(checkpoint / "pytorch_lora_weights.safetensors")
        ema = {k.replace(".student.", "."): v for k, v in _state_tensors(checkpoint, "ema").items()}
        assert lora.keys() == ema.keys() and all(torch.equal(lora[k], ema[k]) for k in lora)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            model,
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
                checkpoint, subfolder="scheduler"
            ),
        )
        pipe.load_lora_weights(checkpoint)
        stock, ours = _stock_and_ours(family, pipe, [0.999, 0.0])
        torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    last = load_file(straight / "checkpoint-6" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(last[k], wa[k]) for k in wa)  # the final export


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide precision: reset it around a run that sets another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_save_dtype_follows_the_teacher_unless_upcast(tmp_path):
    """A bf16 run saves bf16 weights (checkpoints too) by default, fp32 with
    --upcast_before_saving or --save_dtype fp32; each loads in the stock pipeline."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    model = save_tiny_sd3(tmp_path / "model")
    recipe = write_recipe(tmp_path / "recipe.yaml", SD3_RECIPE)
    data = write_prompts(tmp_path / "p.jsonl")
    common = ("--max_train_steps", "2", "--mixed_precision", "bf16", "--allow_tf32")
    runs = {
        "default": (),
        "upcast": ("--upcast_before_saving",),
        "fp32": ("--save_dtype", "fp32"),
    }
    weights = {}
    for name, extra in runs.items():
        out = tmp_path / name
        train(args_for(model, recipe, data, out, *common, *extra))
        weights[name] = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        ckpt = load_file(
            out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors"
        )
        assert all(torch.equal(ckpt[k], weights[name][k]) for k in ckpt)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            model,
            transformer=SD3Transformer2DModel.from_pretrained(out, subfolder="transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler"),
        )
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a cat",
            height=16,
            width=24,
            output_type="np",
            **family_from_pretrained(model).stock_pipeline_kwargs([0.999, 0.0]),
        ).images
        assert np.isfinite(image).all() and image.std() > 0
    assert {v.dtype for v in weights["default"].values()} == {torch.bfloat16}
    for name in ("upcast", "fp32"):
        assert {v.dtype for v in weights[name].values()} == {torch.float32}
    # One training (same seed and settings): the bf16 file is the fp32 weights rounded.
    assert all(torch.equal(weights["upcast"][k], weights["fp32"][k]) for k in weights["fp32"])
    assert all(
        torch.equal(weights["fp32"][k].to(torch.bfloat16), weights["default"][k])
        for k in weights["fp32"]
    )
    with pytest.raises(SystemExit):  # argparse: exit status 2 with the message on stderr
        args_for(
            model, recipe, data, tmp_path / "x", "--upcast_before_saving", "--save_dtype", "bf16"
        )
