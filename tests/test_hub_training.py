"""``train_dmd2.py`` with the Hub and trackers, on a tiny local SD3 and a stand-in Hub server:
the repo is created before any model loads, a bad login stops the run with exit status 2, the
uploaded card carries no local path (licence, tags and a per-prompt gallery instead), a failed
upload prints a retry command that works, checkpoints are pushed, wandb (offline) receives the
validation images, no token reaches a file or a tracker config, and the card's snippet for a
LoRA run loads and runs in the stock pipeline from another directory."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import TOKEN, StandInHub
from huggingface_hub import ModelCard
from PIL import Image
from test_train_dmd2 import args_for, write_prompts, write_recipe
from tiny_pipelines import save_tiny_sd3

from fastgen_diffusers.training import setup, train
from fastgen_diffusers.training import trackers as trackers_module
from fastgen_diffusers.training.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("a cat", "a dog")
RECIPE = "student_update_freq: 2\n"


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret``."""
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def snippet_of(readme: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_sd3(tmp_path_factory.mktemp("hub-model") / "tiny-sd3")
    # The base model's own card: its licence is what the student inherits.
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny SD3\n")
    return path


@pytest.fixture(scope="module")
def hub_run(model, tmp_path_factory):
    """A LoRA run pushed to the stand-in Hub (repo named from the output folder), with
    checkpoints pushed, tensorboard and offline wandb, the token from HF_TOKEN."""
    root = tmp_path_factory.mktemp("hub-run")
    out = root / "sd3-dmd2"
    seen_at_load: list[list[str]] = []
    load_pipeline = setup.load_pipeline

    def recording_load(*args, **kwargs):
        seen_at_load.append([f"{method} {path}" for method, path, _ in hub.requests])
        return load_pipeline(*args, **kwargs)

    stdout, stderr = io.StringIO(), io.StringIO()
    with StandInHub() as hub, pytest.MonkeyPatch.context() as mp:
        mp.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setattr(setup, "load_pipeline", recording_load)
        args = args_for(
            model,
            write_recipe(root / "recipe.yaml", RECIPE),
            write_prompts(root / "p.jsonl"),
            out,
            "--use_lora",
            "--rank",
            "4",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "1",
            "--validation_prompts",
            *PROMPTS,
            "--validation_steps",
            "2",
            "--teacher_validation_steps",
            "2",
            "--report_to",
            "tensorboard,wandb",
            "--push_to_hub",
            "--push_checkpoints_to_hub",
        )
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            train(args)
    return {
        "out": out,
        "hub": hub,
        "seen_at_load": seen_at_load,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }


def test_repo_is_created_before_the_teacher_loads(hub_run):
    (seen,) = hub_run["seen_at_load"]
    # The login check, then the repo; nothing else (no upload) before the teacher loads.
    hub_calls = [call for call in seen if call.startswith(("GET /api/whoami", "POST"))]
    assert hub_calls == ["GET /api/whoami-v2", "POST /api/repos/create"]


def test_uploaded_card_has_no_local_path_and_inherits_licence_tags_and_gallery(hub_run):
    out, hub = hub_run["out"], hub_run["hub"]
    # No --hub_model_id: the output folder's name under the login's namespace.
    repo = hub.repos["stand-in-user/sd3-dmd2"]
    files = repo["files"]
    readme = files["README.md"].decode()
    assert readme == (out / "README.md").read_text()
    tmp_root = str(out.parent.parent)
    assert tmp_root not in readme and str(out) not in readme
    card = ModelCard(readme)
    assert card.data.license == "apache-2.0"  # from the local base model's README.md
    assert card.data.base_model is None  # a local folder is not a Hub id
    assert {"diffusers", "diffusers-training", "lora", "template:sd-lora", "dmd2"} <= set(
        card.data.tags
    )
    assert {"few-step", "distillation", "text-to-image"} <= set(card.data.tags)
    assert card.data.widget == [
        {"text": "a cat", "output": {"url": "validation/final-0.png"}},
        {"text": "a dog", "output": {"url": "validation/final-1.png"}},
    ]
    for i in range(2):  # the gallery's files are uploaded and are one 24x16 image each
        name = f"validation/final-{i}.png"
        assert files[name] == (out / name).read_bytes()
        assert Image.open(out / name).size == (24, 16)
    code = snippet_of(out / "README.md")
    assert "student = 'stand-in-user/sd3-dmd2'" in code
    assert "base_model = 'tiny-sd3'  # trained from a local folder" in code
    assert "    height=16,\n" in code and "    width=24,\n" in code
    assert "pip install -U diffusers transformers accelerate peft" in readme
    for row in (
        "| teacher | `tiny-sd3` |",
        "| layout | `shared_lora` |",
        "| LoRA rank / alpha | 4 / 4 |",
        "| effective batch | 1 (1 per device x 1 process(es) x 1 accumulation) |",
        "| dataset | `p.jsonl` (local) |",
        "| student learning rate | 0.001 |",
    ):
        assert row in readme


def test_checkpoints_are_pushed_as_loadable_students_without_training_state(hub_run):
    files = hub_run["hub"].repos["stand-in-user/sd3-dmd2"]["files"]
    pushed = sorted(f for f in files if f.startswith("checkpoint-"))
    # What load_lora_weights(repo, subfolder="checkpoint-1") reads; no optimizer, RNG or DCP
    # state, no trainer_state.json.
    assert pushed == [
        f"checkpoint-{step}/{name}"
        for step in (1, 2)
        for name in ("pytorch_lora_weights.safetensors", "scheduler/scheduler_config.json")
    ]
    for name in pushed:
        assert files[name] == (hub_run["out"] / name).read_bytes()


def test_wandb_offline_receives_the_validation_images(hub_run):
    out = hub_run["out"]
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in run_dir.rglob("media/images/validation/*.png"))
    # student at steps 0 and 2 and the teacher at step 0: 2 prompts x 2 seeds each.
    assert len(images) == 3 * 4, images
    sizes = {Image.open(p).size for p in run_dir.rglob("media/images/validation/*.png")}
    assert sizes == {(24, 16)}
    assert list((out / "logs" / "dmd2").glob("events.out.tfevents*"))  # tensorboard too


def test_no_token_in_any_output_file_or_tracker_config(hub_run):
    out = hub_run["out"]
    assert files_holding(out, TOKEN) == []
    # The tracker configs hold the public arguments: wandb's run record and tensorboard's
    # hparams (written by accelerate next to the event files).
    (record,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    (hparams,) = (out / "logs" / "dmd2").glob("*/hparams.yml")
    for config in (record.read_bytes(), hparams.read_bytes()):
        assert b"tracker_project_name" in config and b"hub_token" not in config


def test_console_summary_last_line_and_progress_bar(hub_run, model):
    lines = hub_run["stdout"].strip().splitlines()
    summary = "\n".join(lines)
    assert "teacher: " in summary and "(family sd3)" in summary
    assert "layout: shared_lora (rank 4, alpha 4)" in summary
    assert re.search(r"trainable parameters, student: [\d,]+", summary)
    assert re.search(r"trainable parameters, fake_score: [\d,]+", summary)
    assert "effective batch: 1 = 1 per device x 1 process(es) x 1 accumulation" in summary
    assert "samples: 6" in summary and "iterations: 2" in summary
    out = hub_run["out"].resolve()
    assert lines[-1] == (
        f"Student written to {out / 'pytorch_lora_weights.safetensors'} and pushed to "
        "stand-in-user/sd3-dmd2. Load it with: pipe = StableDiffusion3Pipeline.from_pretrained("
        f"{str(model.resolve())!r}, "
        "scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained('stand-in-user/sd3-dmd2', "
        "subfolder='scheduler')); pipe.load_lora_weights('stand-in-user/sd3-dmd2')"
    )
    # The bar shows each network's last loss and the learning rate, not one switching total.
    bar = hub_run["stderr"].replace("\r", "\n").splitlines()
    last = [line for line in bar if "DMD2" in line][-1]
    assert re.search(r"student=[-\d.e]+, fake=[-\d.e]+, lr=0\.001", last), last


def test_lora_card_snippet_runs_from_another_directory(model, tmp_path, monkeypatch):
    out = tmp_path / "lora-out"
    train(
        args_for(
            model,
            write_recipe(tmp_path / "recipe.yaml", RECIPE),
            write_prompts(tmp_path / "p.jsonl"),
            out,
            "--use_lora",
            "--rank",
            "4",
            "--max_train_steps",
            "2",
            "--validation_prompts",
            "a cat",
        )
    )
    code = snippet_of(out / "README.md")
    assert f"student = {str(out.resolve())!r}" in code  # a local card: absolute paths
    assert f"base_model = {str(model.resolve())!r}" in code
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The stock pipeline on this CPU machine: device and precision are the only edits.
    code = code.replace('pipe.to("cuda")', 'pipe.to("cpu")').replace("bfloat16", "float32")
    namespace: dict = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    pipe = namespace["pipe"]
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.get_active_adapters()  # the student's LoRA is loaded and active
    image = Image.open(elsewhere / "student.png")
    assert image.size == (24, 16)  # the trained size, from the snippet's height / width


def _train_cli(tmp_path: Path, model: Path, out: Path, env: dict, *extra: str):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_dmd2.py"),
            "--pretrained_model_name_or_path",
            str(model),
            "--recipe",
            str(write_recipe(tmp_path / "recipe.yaml", RECIPE)),
            "--dataset_name",
            str(write_prompts(tmp_path / "p.jsonl")),
            "--output_dir",
            str(out),
            "--height",
            "16",
            "--width",
            "24",
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
            "--push_to_hub",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_bad_login_exits_2_before_loading_and_failed_upload_prints_a_working_retry(model, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    with StandInHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        bad = _train_cli(tmp_path, model, tmp_path / "bad", {**env, "HF_TOKEN": "hf_wrong"})
        assert bad.returncode == 2, bad.stderr
        assert "Traceback" not in bad.stderr
        (message,) = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert "--push_to_hub: no valid Hugging Face login" in message and "HF_TOKEN" in message
        assert [f"{m} {p}" for m, p, _ in hub.requests] == ["GET /api/whoami-v2"]
        assert not (tmp_path / "bad" / "cache").exists()  # nothing was loaded or encoded

        env["HF_TOKEN"] = TOKEN
        hub.fail["commit"] = 500
        out = tmp_path / "out"
        extra = ("--hub_model_id", "team/tiny", "--hub_private")
        failed = _train_cli(tmp_path, model, out, env, *extra)
        assert failed.returncode == 1, failed.stderr
        assert "Traceback" not in failed.stderr and "intact" in failed.stderr
        command = (
            f"python -m fastgen_diffusers.training.hub {out.resolve()} "
            "--hub_model_id team/tiny --private"
        )
        assert command in failed.stderr.splitlines()[-1]
        assert hub.repos["team/tiny"]["files"] == {}

        del hub.fail["commit"]
        retry = subprocess.run(
            [sys.executable, *shlex.split(command)[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert retry.returncode == 0, retry.stderr
        files = hub.repos["team/tiny"]["files"]
        assert files["README.md"] == (out / "README.md").read_bytes()
        assert "transformer/diffusion_pytorch_model.safetensors" in files
        assert "student = 'team/tiny'" in files["README.md"].decode()


def test_tracker_mistakes_stop_before_the_teacher_loads(model, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the teacher must not load")

    monkeypatch.setattr(setup, "load_pipeline", no_load)
    recipe = write_recipe(tmp_path / "recipe.yaml", RECIPE)
    data = write_prompts(tmp_path / "p.jsonl")
    real = trackers_module._installed
    monkeypatch.setattr(trackers_module, "_installed", lambda name: name != "wandb" and real(name))
    with pytest.raises(UserError, match=r"needs the 'wandb' package.*pip install wandb"):
        train(args_for(model, recipe, data, tmp_path / "o1", "--report_to", "wandb"))
    monkeypatch.setattr(trackers_module, "_installed", real)
    with pytest.raises(UserError, match="--hub_token cannot be used with --report_to wandb"):
        train(
            args_for(
                model, recipe, data, tmp_path / "o2", "--report_to", "wandb", "--hub_token", "x"
            )
        )
    with pytest.raises(UserError, match="unknown tracker 'wandbb'"):
        train(args_for(model, recipe, data, tmp_path / "o3", "--report_to", "wandbb"))
