"""A user's mistake through the real entry point ``main(argv)``: exit status 2, one ``error:``
message naming the bad value, no traceback, and, for everything checkable from flags and small
files, the teacher's weights never loaded. Plus ``--help`` / ``--list_recipes`` and the wiring of
``train_dmd2.py`` in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image
from tiny_pipelines import save_tiny_sd3, save_tiny_wan

from fastgen_diffusers.loader import builtin_recipes, load_dmd_config
from fastgen_diffusers.plugins.base import Family
from fastgen_diffusers.training import main

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny SD3 and one tiny Wan pipeline, recipes and datasets, made once."""
    root = tmp_path_factory.mktemp("cli")
    f = {"root": root, "sd3": save_tiny_sd3(root / "sd3"), "wan": save_tiny_wan(root / "wan")}
    f["recipe"] = root / "recipe.yaml"
    f["recipe"].write_text("student_update_freq: 2\n")
    f["gan"] = root / "gan.yaml"
    f["gan"].write_text("gan_loss_weight_gen: 0.1\n")
    f["flux_named"] = root / "dmd2_flux1_dev.yaml"
    f["flux_named"].write_text("student_update_freq: 2\n")
    f["binary"] = root / "binary.yaml"
    f["binary"].write_bytes(bytes(range(128, 256)) * 4)
    f["bad_yaml"] = root / "bad.yaml"
    f["bad_yaml"].write_text("guidance_scale: [1, 2\n")
    f["list_yaml"] = root / "list.yaml"
    f["list_yaml"].write_text("- 1\n- 2\n")
    f["typo"] = root / "typo.yaml"
    f["typo"].write_text("guidance_scal: 2.0\n")
    f["low_cfg"] = root / "low_cfg.yaml"
    f["low_cfg"].write_text("guidance_scale: 0.5\n")

    f["prompts"] = root / "prompts.jsonl"
    f["prompts"].write_text("".join(json.dumps({"text": p}) + "\n" for p in ["a cat", "a dog"]))
    f["no_caption"] = root / "no_caption.jsonl"
    f["no_caption"].write_text(json.dumps({"caption": "a cat", "id": 1}) + "\n")
    f["empty"] = root / "empty.jsonl"
    f["empty"].write_text("")
    f["xyz"] = root / "data.xyz"
    f["xyz"].write_text("hello")
    f["null_caption"] = root / "null_caption.jsonl"
    f["null_caption"].write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": None}))

    # Media paths: the dataset in data/, a secret beside it, a symlink out of it.
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    (root / "outside").mkdir()
    pixels = np.full((16, 24, 3), 200, np.uint8)
    Image.fromarray(pixels).save(data / "imgs" / "ok.png")
    Image.fromarray(pixels).save(root / "outside" / "secret.png")
    (data / "imgs" / "link.png").symlink_to(root / "outside" / "secret.png")
    f["secret"] = root / "outside" / "secret.png"

    def media_file(name: str, path: str) -> Path:
        rows = [{"text": "a", "file": "imgs/ok.png"}, {"text": "b", "file": path}]
        out = data / name
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out

    f["dotdot"] = media_file("dotdot.jsonl", "../outside/secret.png")
    f["absolute"] = media_file("absolute.jsonl", str(f["secret"]))
    f["symlink"] = media_file("symlink.jsonl", "imgs/link.png")

    # Teachers that are not: an empty folder, an unsupported pipeline, broken JSON, a file.
    (root / "empty_model").mkdir()
    (root / "sd15").mkdir()
    (root / "sd15" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]})
    )
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("{not json")

    # Checkpoints: one incomplete, one with a truncated weights file.
    ckpt = root / "ckpt_out"
    (ckpt / "checkpoint-2").mkdir(parents=True)
    (ckpt / "checkpoint-3").mkdir()
    (ckpt / "checkpoint-3" / "COMPLETE").write_text("3\n")
    weights = Path(f["sd3"]) / "transformer" / "diffusion_pytorch_model.safetensors"
    blob = weights.read_bytes()
    (ckpt / "checkpoint-3" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    f["ckpt_out"] = ckpt
    # A complete checkpoint of another run: other layout and guidance (its run.json).
    other = root / "other_run" / "checkpoint-5"
    other.mkdir(parents=True)
    (other / "COMPLETE").write_text("5\n")
    recipe = load_dmd_config(f["recipe"], overrides={"guidance_scale": 5.0})
    record = {
        "recipe": recipe.model_dump(mode="json"),
        "layout": "shared_lora",
        "family": "sd3",
        "model": str(f["sd3"]),
        "global_batch": 1,
        "world_size": 1,
    }
    (other / "run.json").write_text(json.dumps(record))
    f["other_run"] = root / "other_run"

    not_dir = root / "a_file"
    not_dir.write_text("")
    f["unwritable"] = not_dir / "out"  # under a file: not writable even as root
    return f


@pytest.fixture
def no_teacher_load(monkeypatch):
    """Loading any teacher's weights fails the test: these mistakes are caught before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the mistake was reported")

    monkeypatch.setattr(Family, "load_pipeline", refuse)


def base_argv(f, tmp_path) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(f["sd3"]),
        "--recipe",
        str(f["recipe"]),
        "--dataset_name",
        str(f["prompts"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--height",
        "16",
        "--width",
        "24",
        "--report_to",
        "none",
        "--max_train_steps",
        "1",
    ]


def with_flags(argv: list[str], changes: dict[str, list[str] | None]) -> list[str]:
    """``argv`` with flags replaced (a list of values), removed (``None``) or added."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        if flag not in changes:
            out += argv[i:j]
        i = j
    for flag, values in changes.items():
        if values is not None:
            out += [flag, *values]
    return out


def F(key: str):  # a path from the `files` fixture, resolved when the case runs
    return lambda f: str(f[key])


# (id, {flag: values}, substrings the message must contain)
CASES = [
    # -- flags out of range (argparse) --
    ("learning_rate_negative", {"--learning_rate": ["-1"]}, ["--learning_rate", "-1.0"]),
    ("learning_rate_nan", {"--learning_rate": ["nan"]}, ["--learning_rate", "nan"]),
    ("learning_rate_text", {"--learning_rate": ["abc"]}, ["--learning_rate", "abc"]),
    ("fake_score_lr_zero", {"--fake_score_learning_rate": ["0"]}, ["--fake_score_learning_rate"]),
    ("disc_lr_negative", {"--discriminator_learning_rate": ["-0.5"]}, ["-0.5"]),
    ("warmup_negative", {"--lr_warmup_steps": ["-5"]}, ["--lr_warmup_steps", "-5"]),
    ("max_train_samples_zero", {"--max_train_samples": ["0"]}, ["--max_train_samples", "0"]),
    ("adam_beta1_high", {"--adam_beta1": ["1.5"]}, ["--adam_beta1", "1.5", "[0, 1)"]),
    ("adam_beta2_negative", {"--adam_beta2": ["-0.1"]}, ["--adam_beta2", "-0.1"]),
    ("adam_epsilon_zero", {"--adam_epsilon": ["0"]}, ["--adam_epsilon", "0.0"]),
    ("weight_decay_negative", {"--adam_weight_decay": ["-1"]}, ["--adam_weight_decay"]),
    ("lora_dropout_one", {"--lora_dropout": ["1.0"]}, ["--lora_dropout", "1.0"]),
    ("lora_alpha_zero", {"--lora_alpha": ["0"]}, ["--lora_alpha", "0.0"]),
    ("rank_zero", {"--rank": ["0"]}, ["--rank must be >= 1, got 0"]),
    ("rank_float", {"--rank": ["2.5"]}, ["--rank", "2.5"]),
    ("ckpt_limit_zero", {"--checkpoints_total_limit": ["0"]}, ["--checkpoints_total_limit"]),
    ("teacher_steps_zero", {"--teacher_validation_steps": ["0"]}, ["--teacher_validation_steps"]),
    ("grad_accum_zero", {"--gradient_accumulation_steps": ["0"]}, ["--gradient_accumulation"]),
    ("mixed_precision_fp8", {"--mixed_precision": ["fp8"]}, ["--mixed_precision", "'fp8'"]),
    ("batch_zero", {"--train_batch_size": ["0"]}, ["--train_batch_size", "0"]),
    ("steps_zero", {"--max_train_steps": ["0"]}, ["--max_train_steps", "0"]),
    ("checkpointing_zero", {"--checkpointing_steps": ["0"]}, ["--checkpointing_steps"]),
    ("validation_steps_negative", {"--validation_steps": ["-1"]}, ["--validation_steps", "-1"]),
    ("resolution_zero", {"--resolution": ["0"]}, ["--resolution", "0"]),
    ("height_zero", {"--height": ["0"]}, ["--height", "0"]),
    ("num_frames_zero", {"--num_frames": ["0"]}, ["--num_frames", "0"]),
    ("max_sequence_length_zero", {"--max_sequence_length": ["0"]}, ["--max_sequence_length"]),
    ("seed_negative", {"--seed": ["-1"]}, ["--seed", "-1"]),
    ("max_grad_norm_negative", {"--max_grad_norm": ["-1"]}, ["--max_grad_norm", "-1.0"]),
    ("flux_guidance_negative", {"--flux_guidance": ["-1"]}, ["--flux_guidance", "-1.0"]),
    ("guidance_scale_2_below_1", {"--guidance_scale_2": ["0.5"]}, ["--guidance_scale_2", "0.5"]),
    ("empty_validation_prompt", {"--validation_prompts": ["a cat", " "]}, ["prompt 2 of 2"]),
    ("lora_layout_unknown", {"--lora_layout": ["bogus"]}, ["--lora_layout", "'bogus'"]),
    ("lora_targets_empty_name", {"--lora_target_modules": ["to_q,,to_k"]}, ["to_q,,to_k"]),
    ("override_without_value", {"--recipe_overrides": ["guidance_scale"]}, ["KEY=VALUE"]),
    ("dataset_and_dir", {"--train_data_dir": [F("root")]}, ["not both"]),
    ("no_dataset", {"--dataset_name": None}, ["--dataset_name or --train_data_dir"]),
    ("lr_scheduler_unknown", {"--lr_scheduler": ["cosinus"]}, ["--lr_scheduler", "'cosinus'"]),
    # -- the recipe --
    ("recipe_missing", {"--recipe": ["no/such_recipe"]}, ["no/such_recipe", "dmd2_sd35_medium"]),
    ("recipe_binary", {"--recipe": [F("binary")]}, ["binary.yaml", "not a text file"]),
    ("recipe_bad_yaml", {"--recipe": [F("bad_yaml")]}, ["bad.yaml", "not valid YAML", "line"]),
    ("recipe_list", {"--recipe": [F("list_yaml")]}, ["list.yaml", "list"]),
    ("recipe_unknown_field", {"--recipe": [F("typo")]}, ["'guidance_scal'", "guidance_scale?"]),
    ("recipe_low_cfg", {"--recipe": [F("low_cfg")]}, ["guidance_scale = 0.5", "low_cfg.yaml"]),
    (
        "override_low_cfg",
        {"--recipe_overrides": ["guidance_scale=0.5"]},
        ["--recipe_overrides", "guidance_scale = 0.5"],
    ),
    ("override_nested", {"--recipe_overrides": ["ema.decay=2"]}, ["ema.decay = 2"]),
    ("override_type", {"--recipe_overrides": ["student_sample_steps=abc"]}, ["'abc'"]),
    ("override_unknown", {"--recipe_overrides": ["ema.decai=0.9"]}, ["'ema.decai'", "decay"]),
    # -- the teacher (configs only) --
    (
        "model_missing",
        {"--pretrained_model_name_or_path": ["/no/such/model"]},
        ["/no/such/model", "does not exist"],
    ),
    ("model_is_file", {"--pretrained_model_name_or_path": [F("xyz")]}, ["data.xyz", "is a file"]),
    (
        "model_empty_folder",
        {"--pretrained_model_name_or_path": [F("root")]},
        ["not a diffusers pipeline"],
    ),
    (
        "model_unsupported",
        {"--pretrained_model_name_or_path": [lambda f: str(f["root"] / "sd15")]},
        ["StableDiffusionPipeline", "supported pipelines", "FluxPipeline"],
    ),
    (
        "model_broken_json",
        {"--pretrained_model_name_or_path": [lambda f: str(f["root"] / "broken")]},
        ["model_index.json", "not valid JSON"],
    ),
    (
        "model_hub_unknown_offline",
        {
            "--pretrained_model_name_or_path": ["nobody/no-such-model"],
            "--cache_dir": [lambda f: str(f["root"] / "hf")],
        },
        ["'nobody/no-such-model'", "offline"],
    ),
    ("flux_guidance_on_sd3", {"--flux_guidance": ["3.5"]}, ["--flux_guidance", "Flux teachers"]),
    (
        "guidance_scale_2_on_sd3",
        {"--guidance_scale_2": ["3.0"]},
        ["--guidance_scale_2 3.0", "two-expert", "one transformer"],
    ),
    ("height_not_multiple", {"--height": ["18"]}, ["--height 18", "multiple of 4", "16 or 20"]),
    ("width_not_multiple", {"--width": ["25"]}, ["--width 25", "multiple of 4"]),
    (
        "resolution_over_pos_embed",
        {"--height": None, "--width": None, "--resolution": ["128"]},
        ["--resolution 128", "pos_embed_max_size=16", "64 pixels"],
    ),
    ("frames_on_image_model", {"--num_frames": ["5"]}, ["--num_frames 5", "video teachers"]),
    (
        "wan_frames_not_4k_plus_1",
        {
            "--pretrained_model_name_or_path": [F("wan")],
            "--height": ["64"],
            "--width": ["96"],
            "--num_frames": ["8"],
        },
        ["--num_frames 8", "4k+1", "5 or 9"],
    ),
    (
        "wan_height_not_multiple",
        {"--pretrained_model_name_or_path": [F("wan")], "--height": ["60"], "--width": ["96"]},
        ["--height 60", "multiple of 16"],
    ),
    # -- the dataset --
    (
        "dataset_missing",
        {"--dataset_name": [lambda f: str(f["root"] / "missing.jsonl")]},
        ["missing.jsonl"],
    ),
    ("dataset_no_caption", {"--dataset_name": [F("no_caption")]}, ["'text'", "'caption'", "'id'"]),
    ("dataset_empty", {"--dataset_name": [F("empty")]}, ["empty.jsonl", "empty"]),
    ("dataset_unknown_type", {"--dataset_name": [F("xyz")]}, ["'.xyz'"]),
    ("dataset_null_caption", {"--dataset_name": [F("null_caption")]}, ["row 1", "None"]),
    (
        "caption_column_wrong",
        {"--caption_column": ["prompt"]},
        ["caption column 'prompt'", "'text'"],
    ),
    (
        "image_column_wrong",
        {"--image_column": ["pixels"]},
        ["image column 'pixels'", "'text'"],
    ),
    (
        "train_data_dir_missing",
        {"--dataset_name": None, "--train_data_dir": [lambda f: str(f["root"] / "nope")]},
        ["nope", "not a folder"],
    ),
    ("gan_without_images", {"--recipe": [F("gan")]}, ["needs real images"]),
    (
        "media_dotdot",
        {"--dataset_name": [F("dotdot")], "--image_column": ["file"]},
        ["row 1", "'../outside/secret.png'", "outside the dataset"],
    ),
    (
        "media_absolute",
        {"--dataset_name": [F("absolute")], "--image_column": ["file"]},
        ["row 1", "secret.png", "--allow_absolute_media_paths"],
    ),
    (
        "media_symlink_out",
        {"--dataset_name": [F("symlink")], "--image_column": ["file"]},
        ["row 1", "'imgs/link.png'", "secret.png"],
    ),
    # -- resume and output --
    (
        "resume_missing",
        {"--resume_from_checkpoint": ["checkpoint-4"], "--output_dir": [F("ckpt_out")]},
        ["'checkpoint-4'", "no such folder", "checkpoint-3"],
    ),
    (
        "resume_incomplete_bare_name",
        {"--resume_from_checkpoint": ["checkpoint-2"], "--output_dir": [F("ckpt_out")]},
        ["checkpoint-2", "incomplete"],
    ),
    (
        "resume_truncated_file",
        {"--resume_from_checkpoint": ["checkpoint-3"], "--output_dir": [F("ckpt_out")]},
        ["model.safetensors", "damaged"],
    ),
    (
        "resume_another_run",
        {"--resume_from_checkpoint": ["latest"], "--output_dir": [F("other_run")]},
        ["checkpoint-5", "layout: 'shared_lora' -> 'full'", "recipe.guidance_scale: 5.0 -> "],
    ),
    ("output_unwritable", {"--output_dir": [F("unwritable")]}, ["--output_dir", "not writable"]),
    (
        "embedding_cache_unwritable",
        {"--embedding_cache_dir": [F("unwritable")]},
        ["--embedding_cache_dir", "not writable"],
    ),
]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("changes, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_exits_2_with_one_message(
    files, tmp_path, capsys, monkeypatch, no_teacher_load, changes, expected
):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    resolved = {
        flag: None if values is None else [v(files) if callable(v) else v for v in values]
        for flag, values in changes.items()
    }
    status, err = run_main(with_flags(base_argv(files, tmp_path), resolved), capsys)
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    message = err[err.index("error:") :]
    for text in expected:
        assert text in message, (text, message)


def test_there_are_enough_cases():
    assert len(CASES) >= 60


def test_recipe_for_another_family_warns_but_runs_the_checks(files, tmp_path, capsys, caplog):
    # The Flux-named recipe on the SD3 teacher: a warning, not a failure; the run goes on to the
    # next check (here a missing dataset column, so no teacher is loaded).
    argv = with_flags(
        base_argv(files, tmp_path),
        {"--recipe": [str(files["flux_named"])], "--caption_column": ["nope"]},
    )
    with caplog.at_level("WARNING"):
        status, err = run_main(argv, capsys)
    assert status == 2 and "caption column 'nope'" in err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("flux" in w and "sd3" in w and "dmd2_flux1_dev" in w for w in warnings), warnings


def test_absolute_media_paths_are_allowed_with_the_flag(files, tmp_path, capsys, no_teacher_load):
    # Allowed, the checks pass, and the run reaches the teacher load (refused by the fixture).
    argv = with_flags(
        base_argv(files, tmp_path),
        {
            "--dataset_name": [str(files["absolute"])],
            "--image_column": ["file"],
            "--allow_absolute_media_paths": [],
        },
    )
    with pytest.raises(AssertionError, match="teacher was loaded"):
        main(argv)


def test_full_disk_names_the_path_and_exits_2(files, tmp_path, capsys):
    # A real ENOSPC: the loss log is a link to /dev/full, which refuses every write.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "losses.jsonl").symlink_to("/dev/full")
    argv = with_flags(base_argv(files, tmp_path), {"--teacher_validation_steps": ["1"]})
    status, err = run_main(argv, capsys)
    assert status == 2 and "Traceback" not in err
    assert "no space left on" in err and str(out) in err


def test_list_recipes_and_help(capsys):
    assert main(["--list_recipes"]) == 0
    assert capsys.readouterr().out.split() == builtin_recipes()
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 1e-05)" in text and "(default: constant)" in text  # defaults shown
    assert "--embedding_cache_dir" in text and "--allow_absolute_media_paths" in text
    assert "built-in recipes" in text and "general/distillation/dmd2_flux1_dev" in text


def test_train_dmd2_script_exits_2_with_one_error_line(files, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
    }
    cases = [
        (["--adam_beta1", "1.5"], "--adam_beta1 1.5"),  # argparse
        # preflight, after reading the recipe, the teacher's configs and the dataset
        (["--pretrained_model_name_or_path", "nobody/no-such-model"], "'nobody/no-such-model'"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train_dmd2.py"), *base_argv(files, tmp_path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "HF_HUB_CACHE": str(tmp_path / "hf")},
            cwd=tmp_path,
        )
        for extra, _ in cases
    ]
    for proc, (_, expected) in zip(procs, cases):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and expected in errors[0], err
