"""Wan 2.2 I2V-A14B: image-to-video distillation, both experts in one run.

One tiny two-expert ``WanImageToVideoPipeline`` (no CLIP image encoder, 4 + 4 + 4 input
channels, boundary_ratio 0.9) built from config per module. Each row's image is cached as the
pipeline's own condition latents; the exported student (full and LoRA) run by the stock
pipeline with that image must equal ``sample_student`` with the same condition; resume is
exact; mistakes end before any weight loads. Tolerances as in test_wan_a14b.py: the same float32
transformer calls on both sides, the update arithmetic written differently (a few 1e-7
relative per step); condition latents are the same VAE call on pixels that differ by float
rounding of x / 127.5 - 1 against x / 255 * 2 - 1 (1e-7).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from safetensors.torch import load_file

from fastgen_diffusers.plugins import family_from_pretrained
from fastgen_diffusers.plugins.wan import prepare_image_condition
from fastgen_diffusers.plugins.wan_i2v import WanImageToVideoFamily
from fastgen_diffusers.sampling import sample_student
from fastgen_diffusers.training import parse_args, train
from fastgen_diffusers.training.cache import CachedDataset
from fastgen_diffusers.training.data import preprocess_image
from fastgen_diffusers.training.errors import UserError
from fastgen_diffusers.training.preflight import preflight
from tests.tiny_pipelines import save_tiny_wan

TOL = {"rtol": 1e-5, "atol": 1e-5}
HEIGHT, WIDTH, FRAMES = 64, 96, 5  # latents [4, 2, 8, 12]
BOUNDARY = 0.9
RECIPE = "general/distillation/dmd2_wan22_a14b_i2v"
T_LIST = [1.0, 0.9375, 0.8333333134651184, 0.625, 0.0]  # the recipe's: two rungs per expert
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
STEPS = 4
LORA_FILES = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"]

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_diffusers")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """(path, family, pipeline without text encoder) of the tiny two-expert I2V pipeline."""
    path = save_tiny_wan(
        tmp_path_factory.mktemp("i2v") / "pipe", boundary_ratio=BOUNDARY, image_to_video=True
    )
    family = family_from_pretrained(path)
    return path, family, family.load_pipeline(path, text_encoder=None, tokenizer=None)


def _image(seed: int, size: tuple[int, int] = (HEIGHT, WIDTH)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """prompts.jsonl with one first frame per row (image column), at the training size."""
    root = tmp_path_factory.mktemp("i2v-data")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        _image(10 + i).save(root / f"frame{i}.png")
        rows.append({"text": prompt, "image": f"frame{i}.png"})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(model, root, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--recipe",
        RECIPE,
        "--recipe_overrides",
        "student_update_freq=2",
        "ema.decay=0.9",
        "--dataset_name",
        str(root / "prompts.jsonl"),
        "--image_column",
        "image",
        "--output_dir",
        str(out),
        "--height",
        str(HEIGHT),
        "--width",
        str(WIDTH),
        "--num_frames",
        str(FRAMES),
        "--max_sequence_length",
        "8",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "3",  # its 2 student updates draw one rung per expert (seeds 1, 2, 4, 5: both high)
        *extra,
    ]


def _embeds(seed: int = 4) -> torch.Tensor:
    return torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(seed))


def _noise(seed: int = 5) -> torch.Tensor:
    return torch.randn(1, 4, 2, 8, 12, generator=torch.Generator().manual_seed(seed))


# -- the condition ------------------------------------------------------------------------------


def test_family_and_condition_are_the_pipelines(i2v):
    """The I2V checkpoint is the wan_i2v family with its boundary; encode_condition of a PIL
    image is the stock pipeline's prepare_latents condition, and of the training data's pixels
    (the same image) the same to float rounding."""
    path, family, pipe = i2v
    assert isinstance(family, WanImageToVideoFamily) and family.boundary_ratio == BOUNDARY
    assert family.condition_image and family.pipeline_tag == "image-to-video"
    images = [_image(1), _image(2)]
    cond = family.encode_condition(pipe, images, HEIGHT, WIDTH, FRAMES)
    assert set(cond) == {"condition_latents"} and cond["condition_latents"].shape == (
        2,
        8,
        2,
        8,
        12,
    )
    for row, image in enumerate(images):
        ref = prepare_image_condition(pipe, image, HEIGHT, WIDTH, FRAMES)["condition_latents"]
        torch.testing.assert_close(cond["condition_latents"][row : row + 1], ref, rtol=0, atol=0)
    pixels = torch.stack([preprocess_image(image, (HEIGHT, WIDTH)) for image in images])
    from_pixels = family.encode_condition(pipe, pixels, HEIGHT, WIDTH, FRAMES)
    torch.testing.assert_close(from_pixels["condition_latents"], cond["condition_latents"], **TOL)
    # Each row is its own image's condition, not the first one repeated.
    assert (cond["condition_latents"][0] - cond["condition_latents"][1]).abs().max() > 1e-3


# -- a training run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(i2v, data, tmp_path_factory):
    """Two 4-iteration runs (full; shared_lora, each expert its own shared base with student
    and fake-score adapters), a checkpoint every 2, validation of one prompt and its image."""
    root = tmp_path_factory.mktemp("i2v-runs")
    runs = {}
    for layout, flags in {
        "full": [],
        "shared_lora": ["--use_lora", "--rank", "4", "--lora_layout", "shared_lora"],
    }.items():
        out = root / layout
        extra = ["--checkpointing_steps", "2", "--validation_steps", "4", *flags]
        extra += ["--validation_prompts", "a cat", "--validation_image", str(data / "frame0.png")]
        train(parse_args(_argv(i2v[0], data, out, *extra)))
        runs[layout] = (out, flags)
    return runs


@pytest.mark.slow  # end-to-end training runs
def test_cache_holds_each_rows_image_condition(i2v, data, trained):
    """The run's cache holds, per row, the condition the stock pipeline builds from that
    row's image; the negative prompt's entry has the prompt keys only (the condition of each
    row carries to its unconditional pass)."""
    _, family, pipe = i2v
    out = trained["full"][0]
    (folder,) = [p for p in (out / "cache").iterdir() if p.is_dir()]
    cache = CachedDataset(folder)
    assert set(cache.cond_keys) == {"encoder_hidden_states", "condition_latents"}
    assert set(cache.negative) == {"encoder_hidden_states"}
    assert not cache.has_latents  # backward simulation: no videos needed
    for i, prompt in enumerate(PROMPTS):
        sample = cache[i]
        assert sample["prompt"] == prompt
        image = PIL.Image.open(data / f"frame{i}.png")
        ref = prepare_image_condition(pipe, image, HEIGHT, WIDTH, FRAMES)["condition_latents"]
        torch.testing.assert_close(sample["cond"]["condition_latents"], ref[0], **TOL)


def _stock_student_run(model, out, lora: bool, image, noise, pos) -> torch.Tensor:
    from diffusers import WanTransformer3DModel

    components = {}
    if not lora:
        components = {
            name: WanTransformer3DModel.from_pretrained(out, subfolder=name)
            for name in ("transformer", "transformer_2")
        }
    pipe = WanImageToVideoPipeline.from_pretrained(
        model, text_encoder=None, tokenizer=None, **components
    )
    if lora:
        pipe.load_lora_weights(out, weight_name=LORA_FILES[0])
        pipe.load_lora_weights(out, weight_name=LORA_FILES[1], load_into_transformer_2=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    latents = pipe(
        image=image,
        prompt_embeds=pos,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        latents=T_LIST[0] * noise,
        output_type="latent",
        **WanImageToVideoFamily(boundary_ratio=BOUNDARY).stock_pipeline_kwargs(T_LIST),
    ).frames
    return latents, pipe


@pytest.mark.slow  # end-to-end training runs
@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_trained_student_runs_in_stock_i2v_pipeline(i2v, trained, layout):
    """The export (both experts: transformer/ + transformer_2/, or the two LoRA files) loads
    into the stock WanImageToVideoPipeline, which given the image equals sample_student on the
    loaded experts with that image's condition; another image gives another video."""
    path, family, _ = i2v
    out = trained[layout][0]
    pos, noise, image = _embeds(), _noise(), _image(20)
    ref, pipe = _stock_student_run(path, out, layout != "full", image, noise, pos)
    student = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    cond = family.encode_condition(pipe, [image], HEIGHT, WIDTH, FRAMES)
    with torch.no_grad():
        ours = sample_student(student, noise, T_LIST, encoder_hidden_states=pos, model_kwargs=cond)
        other = sample_student(
            student,
            noise,
            T_LIST,
            encoder_hidden_states=pos,
            model_kwargs=family.encode_condition(pipe, [_image(21)], HEIGHT, WIDTH, FRAMES),
        )
    torch.testing.assert_close(ours, ref, **TOL)
    assert (other - ref).abs().max() > 1e-3
    # Both experts were trained (the run's rungs fall on both sides of the boundary).
    if layout == "full":
        base = WanImageToVideoPipeline.from_pretrained(path, text_encoder=None, tokenizer=None)
        for name in ("transformer", "transformer_2"):
            ours_w, base_w = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
            assert any(not torch.equal(base_w[k], v) for k, v in ours_w.items()), name
    else:
        for name in LORA_FILES:  # lora_B starts at zero
            weights = load_file(out / name)
            assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k), name
    card = (out / "README.md").read_text()
    assert "WanImageToVideoPipeline" in card and "boundary_ratio = 0.9" in card
    assert 'image=load_image("first_frame.png")' in card
    assert "| teacher CFG scale | 3.5 |" in card
    assert (out / "validation" / "final-0.mp4").is_file()
    assert (out / "validation" / "teacher-000000.png").is_file()


@pytest.mark.slow  # end-to-end training runs
def test_resume_is_exact(i2v, data, trained, tmp_path):
    """Resumed from checkpoint-2 (shared_lora), the run logs the same losses and exports the
    same two adapters, bit for bit."""
    straight, flags = trained["shared_lora"]
    out = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(straight / "logs", out / "logs")
    argv = _argv(i2v[0], data, out, "--resume_from_checkpoint", "latest", *flags)
    train(parse_args(argv))
    losses = (out / "logs" / "losses.jsonl").read_text()
    assert losses == (straight / "logs" / "losses.jsonl").read_text()
    assert len(losses.splitlines()) == STEPS
    for name in LORA_FILES:
        a, b = load_file(straight / name), load_file(out / name)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # end-to-end training runs
def test_card_snippet_makes_a_video_from_an_image(trained, tmp_path, monkeypatch):
    """The model card's snippet, run as written (CPU, float32) from another directory with a
    first_frame.png there, loads both LoRA experts into the stock I2V pipeline and makes a
    video of the trained length."""
    from test_card_snippets import run_card_snippet

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _image(30).save(elsewhere / "first_frame.png")
    ns = run_card_snippet(trained["shared_lora"][0], elsewhere, monkeypatch)
    pipe = ns["pipe"]
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    assert pipe.config.boundary_ratio == BOUNDARY
    for expert in (pipe.transformer, pipe.transformer_2):
        assert list(expert.peft_config) == ["default_0"]
    assert ns["video"] is not None and len(ns["video"]) == FRAMES


def test_video_rows_are_conditioned_on_their_first_frame(i2v, tmp_path):
    """With a video column, a row's condition is its first frame as preprocessed for the
    video's latents (so a GAN or data-started recipe trains on matching pairs)."""
    from diffusers.utils import export_to_video

    from fastgen_diffusers.training.cache import CacheSettings, build_cache
    from fastgen_diffusers.training.data import load_training_dataset, preprocess_video

    _, family, pipe = i2v
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        frames = [rng.random((HEIGHT, WIDTH, 3)).astype(np.float32) for _ in range(FRAMES)]
        export_to_video(frames, str(tmp_path / f"clip{i}.mp4"), fps=16)
        rows.append({"text": PROMPTS[i], "video": f"clip{i}.mp4"})
    (tmp_path / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_training_dataset(tmp_path / "videos.jsonl", video_column="video")
    settings = CacheSettings(
        model="tiny", family=family.name, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
        needs_media=True, condition_image=True,
    )  # fmt: skip
    cache = build_cache(
        dataset,
        settings,
        cache_dir=tmp_path / "cache",
        encode_prompts=lambda p: {"encoder_hidden_states": torch.zeros(len(p), 3, 16)},
        encode_media=lambda px: family.encode_media(pipe, px),
        encode_condition=lambda px: family.encode_condition(pipe, px, HEIGHT, WIDTH, FRAMES),
    )
    for i in range(2):
        video = preprocess_video(str(tmp_path / f"clip{i}.mp4"), (HEIGHT, WIDTH), FRAMES)
        ref = prepare_image_condition(pipe, video[:, 0][None], HEIGHT, WIDTH, FRAMES)
        torch.testing.assert_close(
            cache[i]["cond"]["condition_latents"], ref["condition_latents"][0], rtol=0, atol=0
        )
        assert cache[i]["latents"].shape == (4, 2, 8, 12)


# -- mistakes end before loading ----------------------------------------------------------------


def test_i2v_mistakes_are_caught_before_loading(i2v, data, tmp_path):
    """Each mistake ends in one UserError (or argparse's one line) naming what to give, and
    no output folder is created."""
    path = i2v[0]
    (tmp_path / "prompts.jsonl").write_text('{"text": "a cat"}\n')
    prompts_only = [a if a != str(data / "prompts.jsonl") else str(tmp_path / "prompts.jsonl")
                    for a in _argv(path, data, tmp_path / "out")]  # fmt: skip
    prompts_only.remove("--image_column")
    prompts_only.remove("image")
    cases = {
        "prompts only": (prompts_only, "--image_column"),
        "GAN on images": (
            _argv(path, data, tmp_path / "out", "--recipe_overrides", "gan_loss_weight_gen=0.03"),
            "needs real videos",
        ),
        "validation without image": (
            _argv(path, data, tmp_path / "out", "--validation_prompts", "a cat"),
            "--validation_image",
        ),
    }
    for name, (argv, expected) in cases.items():
        with pytest.raises(UserError) as err:
            preflight(parse_args(argv))
        assert expected in str(err.value) and "\n" not in str(err.value), (name, err.value)
    two_images = ["--validation_image", str(data / "frame0.png"), str(data / "frame1.png")]
    with pytest.raises(SystemExit):  # 2 images for 1 prompt: argparse's one line
        parse_args(_argv(path, data, tmp_path / "out", "--validation_prompts", "a", *two_images))
    assert not (tmp_path / "out").exists()


def test_validation_image_with_a_text_to_video_teacher_is_refused(data, tmp_path):
    t2v = save_tiny_wan(tmp_path / "t2v")
    argv = _argv(t2v, data, tmp_path / "out", "--validation_prompts", "a cat")
    argv += ["--validation_image", str(data / "frame0.png")]
    argv[argv.index(RECIPE)] = "general/distillation/dmd2_wan21_t2v_1_3b"
    with pytest.raises(UserError, match="generates from prompts alone"):
        preflight(parse_args(argv))


def test_wan21_i2v_with_clip_image_encoder_is_refused(i2v, tmp_path):
    """A Wan 2.1 I2V checkpoint (image_encoder set) is named and refused at detection."""
    model = tmp_path / "wan21-i2v"
    shutil.copytree(i2v[0], model)
    index = json.loads((model / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="CLIP"):
        family_from_pretrained(model)


@pytest.mark.slow  # an end-to-end training run
def test_gan_trains_on_videos_with_their_first_frames(i2v, tmp_path):
    """With videos, the GAN branch (and a data-started student) runs on I2V: real latents are
    the videos', each network takes its row's first-frame condition, every loss is finite."""
    from diffusers.utils import export_to_video

    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        frames = [rng.random((HEIGHT, WIDTH, 3)).astype(np.float32) for _ in range(FRAMES)]
        export_to_video(frames, str(tmp_path / f"clip{i}.mp4"), fps=16)
        rows.append({"text": prompt, "video": f"clip{i}.mp4"})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = _argv(i2v[0], tmp_path, tmp_path / "out", "--use_lora", "--rank", "4")
    argv[argv.index("--image_column") : argv.index("--image_column") + 2] = [
        "--video_column",
        "video",
    ]
    argv[argv.index("ema.decay=0.9") + 1 : argv.index("ema.decay=0.9") + 1] = [
        "gan_loss_weight_gen=0.03",
        "backward_simulation=false",
    ]
    train(parse_args(argv))
    logs = [
        json.loads(line) for line in (tmp_path / "out/logs/losses.jsonl").read_text().splitlines()
    ]
    gan = [row["student/gan_gen"] for row in logs if "student/gan_gen" in row]
    disc = [row["discriminator/total"] for row in logs if "discriminator/total" in row]
    assert len(gan) == STEPS // 2 and len(disc) == STEPS // 2  # student_update_freq=2
    assert all(np.isfinite(gan + disc))


def test_missing_ftfy_is_named_before_loading(i2v, data, tmp_path, monkeypatch):
    """WanImageToVideoPipeline's prompt cleaning calls ftfy unconditionally: without it the
    preflight names the package (a NameError deep in diffusers otherwise)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "ftfy" else find_spec(n)
    )
    with pytest.raises(UserError, match=r"needs ftfy .*prompt cleaning.*pip install ftfy"):
        preflight(parse_args(_argv(i2v[0], data, tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_unreadable_validation_image_is_named_before_loading(i2v, data, tmp_path):
    """A --validation_image that is not an image ends the preflight, not the run after the
    teacher (28B parameters for the real model) has loaded."""
    broken = tmp_path / "frame.png"
    broken.write_bytes(b"not a png")
    argv = _argv(i2v[0], data, tmp_path / "out", "--validation_prompts", "a cat")
    with pytest.raises(UserError, match=r"--validation_image .*frame.png.* could not be read"):
        preflight(parse_args([*argv, "--validation_image", str(broken)]))
    assert not (tmp_path / "out").exists()
