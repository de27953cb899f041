"""Video end to end on a tiny Wan: ``.mp4`` training data written with ``export_to_video`` is
read back, validation writes one MP4 per prompt at the family's frame rate (and a still preview
grid), tensorboard and offline wandb receive the videos, the model card's snippet writes an MP4
of the trained frame count from another directory, the exported scheduler keeps the student's
timesteps, and a run without a size trains at the family's default size."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import export_to_video
from huggingface_hub import ModelCard
from PIL import Image
from test_train_dmd2 import args_for, write_prompts, write_recipe
from tiny_pipelines import CALL_KWARGS, save_tiny_sd3, save_tiny_wan

from fastgen_diffusers.plugins import wan_schedule
from fastgen_diffusers.training import parse_args, setup, train
from fastgen_diffusers.training.data import preprocess_video, select_training_columns

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
PROMPTS = ("a cat", "a dog")
SIZE = CALL_KWARGS["wan"]  # 64 x 96 pixels, 5 frames


def snippet_of(readme: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def mp4_frames(path: Path) -> np.ndarray:
    return np.stack(list(iio.imiter(path)))  # imageio's ffmpeg plugin: [F, H, W, 3] uint8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan-model") / "tiny-wan")


@pytest.fixture(scope="module")
def wan_run(model, tmp_path_factory):
    """A one-step full Wan student with two validation prompts, tensorboard and offline wandb."""
    root = tmp_path_factory.mktemp("wan-run")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        train(
            args_for(
                model,
                write_recipe(root / "recipe.yaml", "student_update_freq: 1\n"),
                write_prompts(root / "p.jsonl"),
                out,
                "--max_train_steps",
                "1",
                "--validation_prompts",
                *PROMPTS,
                "--validation_steps",
                "1",
                "--teacher_validation_steps",
                "2",
                "--report_to",
                "tensorboard,wandb",
                family="wan",
            )
        )
    return out


def test_mp4_written_with_export_to_video_is_read_back_as_training_data(tmp_path):
    # Flat colours survive the lossy H.264 round trip to within a few levels.
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120), (250, 250, 250)]
    # export_to_video takes float frames in [0, 1] (or PIL images), as the pipelines return.
    frames = [np.full((16, 32, 3), c, dtype=np.float32) / 255 for c in colours]
    path = export_to_video(frames, str(tmp_path / "clip.mp4"), fps=16)
    raw = datasets.Dataset.from_dict({"text": ["five colours"], "clip": [path]})
    ds = select_training_columns(raw, video_column="clip", base_dir=tmp_path)
    assert sorted(ds.column_names) == ["prompt", "video"]
    pixels = preprocess_video(ds[0]["video"], (16, 32), num_frames=3)  # frames 0, 2, 4
    assert pixels.shape == (3, 3, 16, 32)
    expected = torch.tensor([colours[0], colours[2], colours[4]], dtype=torch.float32)
    expected = expected / 127.5 - 1.0
    mean = pixels.mean(dim=(2, 3)).T  # [F, 3]
    # 8 levels of 255: the codec's YUV 4:2:0 rounding on flat frames is well below that.
    assert torch.allclose(mean, expected, atol=8 / 127.5), mean


def test_validation_writes_an_mp4_per_prompt_at_the_family_fps(wan_run):
    folder = wan_run / "validation"
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".gif")]
    for name in ("student-000000", "student-000001", "teacher-000000"):
        for i in range(len(PROMPTS)):
            video = folder / f"{name}-{i}.mp4"
            frames = mp4_frames(video)
            assert frames.shape == (SIZE["num_frames"], SIZE["height"], SIZE["width"], 3)
            assert iio.immeta(video)["fps"] == 16  # WanFamily.video_fps
        # The still preview: per sample (2 prompts x 2 seeds) its first, middle and last frame.
        preview = Image.open(folder / f"{name}.png")
        assert preview.size == (3 * SIZE["width"], 4 * SIZE["height"])
    for i in range(len(PROMPTS)):  # the model card's gallery
        assert mp4_frames(folder / f"final-{i}.mp4").shape[0] == SIZE["num_frames"]
    widget = ModelCard.load(wan_run / "README.md").data.widget
    assert widget == [
        {"text": p, "output": {"url": f"validation/final-{i}.mp4"}} for i, p in enumerate(PROMPTS)
    ]


def test_trackers_receive_the_videos(wan_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (wan_run / "logs" / "wandb").glob("offline-run-*")
    videos = sorted(run_dir.rglob("media/videos/validation/*.mp4"))
    # student at steps 0 and 1, teacher at step 0: one video per prompt.
    assert len(videos) == 3 * len(PROMPTS), videos
    assert {mp4_frames(v).shape[0] for v in videos} == {SIZE["num_frames"]}

    (events,) = (wan_run / "logs" / "dmd2").glob("events.out.tfevents*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    # Without moviepy tensorboard gets each video's frames as one strip (5 frames wide).
    assert {"validation/student/0", "validation/student/1", "validation/teacher/0"} <= set(tags)
    strip = acc.Images("validation/student/0")[-1]
    assert (strip.width, strip.height) == (SIZE["num_frames"] * SIZE["width"], SIZE["height"])


def test_card_snippet_writes_the_trained_video_from_another_directory(
    wan_run, tmp_path, monkeypatch
):
    code = snippet_of(wan_run / "README.md")
    assert 'export_to_video(video, "student.mp4", fps=16)' in code
    monkeypatch.chdir(tmp_path)
    code = code.replace('pipe.to("cuda")', 'pipe.to("cpu")').replace("bfloat16", "float32")
    exec(compile(code, "<model card>", "exec"), {})
    frames = mp4_frames(tmp_path / "student.mp4")
    assert frames.shape == (SIZE["num_frames"], SIZE["height"], SIZE["width"], 3)


def test_exported_scheduler_keeps_the_student_timesteps(wan_run, caplog):
    config = FlowMatchEulerDiscreteScheduler.load_config(wan_run, subfolder="scheduler")
    t_list = [0.999, 0.0]  # the default recipe's one-step list
    assert wan_schedule.pipeline_t_list(config, 1) == pytest.approx(t_list, abs=1e-6)
    # sigma_max / sigma_min draw a "will be ignored" warning, yet the schedule needs them.
    stripped = {k: v for k, v in config.items() if k not in ("sigma_max", "sigma_min")}
    assert wan_schedule.pipeline_t_list(stripped, 1) != wan_schedule.pipeline_t_list(config, 1)
    card = (wan_run / "README.md").read_text()
    assert "will be ignored" in card and "the keys are needed" in card


def test_a_run_without_a_size_uses_the_family_default(model, tmp_path):
    def resolved(path: Path, family: str) -> tuple:
        args = parse_args(
            [
                "--pretrained_model_name_or_path",
                str(path),
                "--recipe",
                str(write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 1\n")),
                "--dataset_name",
                str(write_prompts(tmp_path / "p.jsonl")),
                "--output_dir",
                str(tmp_path / f"out-{family}"),
                "--report_to",
                "none",
            ]
        )
        assert args.resolution is None and args.size == (None, None)
        run = setup.setup_run(args)
        teacher = setup.load_teacher(run)
        expected = teacher.family.default_size(teacher.pipe)
        return run.args.size, run.args.num_frames, expected, teacher.latent_shape

    size, frames, expected, shape = resolved(model, "wan")
    assert size == expected == (480, 832) and frames == 81  # WanPipeline.__call__'s defaults
    assert shape[1:] == (21, 60, 104)  # (81 - 1) / 4 + 1 latent frames, 8x smaller sides
    sd3 = save_tiny_sd3(tmp_path / "tiny-sd3")
    size, frames, expected, _ = resolved(sd3, "sd3")
    # The image pipelines' default: default_sample_size * vae_scale_factor (1024 for SD3).
    assert size == expected and frames is None


def test_a_video_run_without_imageio_stops_before_the_teacher_loads(model, tmp_path, monkeypatch):
    import importlib.util

    from fastgen_diffusers.plugins import family_from_pretrained
    from fastgen_diffusers.training.errors import UserError
    from fastgen_diffusers.training.preflight import check_video_backend

    args = args_for(
        model,
        write_recipe(tmp_path / "recipe.yaml", "student_update_freq: 1\n"),
        write_prompts(tmp_path / "p.jsonl"),
        tmp_path / "out",
        "--validation_prompts",
        "a cat",
        family="wan",
    )
    family = family_from_pretrained(model)
    check_video_backend(args, family)  # installed here: nothing to say
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else find_spec(n)
    )
    with pytest.raises(
        UserError,
        match=r"--validation_prompts .* needs imageio_ffmpeg .*"
        r"pip install \"fastgen_diffusers\[video\]\"",
    ):
        check_video_backend(args, family)
    # Image families write PNGs only.
    check_video_backend(args, family_from_pretrained(save_tiny_sd3(tmp_path / "sd3")))
