"""Training data: loading prompts / image folders / videos, preprocessing values, the embedding
cache (contents, reuse, fingerprints, atomic builds, errors) and the resumable sampler."""

from __future__ import annotations

import itertools
import json
import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fastgen_diffusers.training.cache import (
    CachedDataset,
    CacheSettings,
    build_cache,
    cache_fingerprint,
)
from fastgen_diffusers.training.data import (
    load_training_dataset,
    load_video,
    preprocess_image,
    preprocess_video,
    select_training_columns,
)
from fastgen_diffusers.training.data_order import ResumableRandomSampler

pytestmark = pytest.mark.usefixtures("single_thread")

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _unit(rgb) -> torch.Tensor:
    """An RGB colour in [-1, 1], as [3]."""
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0


def _two_colour(width: int, height: int, split: int, left=RED, right=BLUE) -> Image.Image:
    """Columns [0, split) one colour, the rest another."""
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, split, height))
    return image


class Counting:
    """Wraps a fake encoder; counts calls and the samples it encoded."""

    def __init__(self, fn, fail_on_call: int | None = None):
        self.fn, self.fail_on_call = fn, fail_on_call
        self.calls = 0

    def __call__(self, value):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("encoder crashed")
        return self.fn(value)


def fake_encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Deterministic per-prompt tensors: [B, 3, 2] float32 and [B, 1] bfloat16."""
    codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 97)] for p in prompts])
    hidden = codes[:, None, :] * torch.arange(1.0, 4.0)[None, :, None]
    return {"encoder_hidden_states": hidden, "pooled_projections": codes[:, :1].bfloat16()}


def fake_encode_media(pixels: torch.Tensor) -> torch.Tensor:
    """A 'VAE': 2x average pooling of the spatial dims, times 0.5."""
    if pixels.dim() == 5:  # [B, 3, F, H, W]: pool every frame
        b, c, f, h, w = pixels.shape
        flat = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        pooled = torch.nn.functional.avg_pool2d(flat, 2)
        return 0.5 * pooled.reshape(b, f, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)
    return 0.5 * torch.nn.functional.avg_pool2d(pixels, 2)


PARTS = {"model": "tiny/model", "revision": "main", "family": "sd3", "max_sequence_length": 3}


def _settings(parts=PARTS, resolution=None, with_latents=False, **fields) -> CacheSettings:
    """CacheSettings from the model-side ``parts``, a square or (h, w) resolution and fields."""
    if resolution is not None:
        fields["height"], fields["width"] = (
            (resolution, resolution) if isinstance(resolution, int) else resolution
        )
    return CacheSettings(**parts, needs_media=with_latents, **fields)


# -- fixtures: everything on disk in tmp_path ----------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf-datasets")


@pytest.fixture
def image_folder(tmp_path):
    """Three images of different sizes with captions, an extra column, and metadata.jsonl."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = [
        ("a.png", _two_colour(8, 4, 4), "a red and blue band"),
        ("b.png", Image.new("RGB", (6, 6), GREEN), "a green square"),
        ("c.png", _two_colour(4, 8, 2, left=WHITE, right=RED), "white beside red"),
    ]
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (name, image, text) in enumerate(rows):
            image.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": text, "score": i}) + "\n")
    return folder, rows


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


# -- loading -------------------------------------------------------------------------------------


def test_image_folder_loads_captions_and_images(image_folder, hf_cache):
    folder, rows = image_folder
    by_dir = load_training_dataset(train_data_dir=folder, cache_dir=hf_cache)
    by_name = load_training_dataset(str(folder), cache_dir=hf_cache, image_column="image")
    for ds in (by_dir, by_name):
        assert sorted(ds.column_names) == ["image", "prompt"]  # "score" and file names dropped
        assert isinstance(ds.features["image"], datasets.Image)
        got = {p: np.asarray(img) for p, img in zip(ds["prompt"], ds["image"])}
        assert set(got) == {text for _, _, text in rows}
        for _, image, text in rows:
            np.testing.assert_array_equal(got[text], np.asarray(image))


def test_jsonl_prompts_with_custom_caption_column(tmp_path, hf_cache):
    path = _write_jsonl(
        tmp_path / "p.jsonl", [{"caption": "a cat", "id": 1}, {"caption": "a dog", "id": 2}]
    )
    ds = load_training_dataset(path, caption_column="caption", cache_dir=hf_cache)
    assert ds.column_names == ["prompt"]
    assert list(ds["prompt"]) == ["a cat", "a dog"]


def test_txt_prompts_one_per_line_and_max_train_samples(tmp_path, hf_cache):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red fox \n\nan owl\n\n\na whale\n")
    ds = load_training_dataset(str(path), cache_dir=hf_cache)
    assert ds.column_names == ["prompt"]
    assert list(ds["prompt"]) == ["a red fox", "an owl", "a whale"]
    first = load_training_dataset(str(path), cache_dir=hf_cache, max_train_samples=2)
    assert list(first["prompt"]) == ["a red fox", "an owl"]


def test_relative_image_paths_in_a_jsonl_resolve_next_to_the_file(tmp_path, hf_cache):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), BLUE).save(tmp_path / "imgs" / "x.png")
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "blue", "file": "imgs/x.png"}])
    ds = load_training_dataset(path, image_column="file", cache_dir=hf_cache)
    assert sorted(ds.column_names) == ["image", "prompt"]
    assert ds[0]["image"] == str(tmp_path / "imgs" / "x.png")
    pixels = preprocess_image(ds[0]["image"], 4)
    assert torch.equal(pixels, _unit(BLUE)[:, None, None].expand(3, 4, 4))


def test_missing_caption_column_names_it_and_lists_the_columns(image_folder, tmp_path, hf_cache):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt_text": "x", "id": 0}])
    with pytest.raises(ValueError, match="caption column 'text'") as info:
        load_training_dataset(path, cache_dir=hf_cache)
    assert "prompt_text" in str(info.value) and "'id'" in str(info.value)

    folder, _ = image_folder
    with pytest.raises(ValueError, match="image column 'pixels'") as info:
        load_training_dataset(train_data_dir=folder, image_column="pixels", cache_dir=hf_cache)
    assert "'image'" in str(info.value) and "'text'" in str(info.value)


def test_empty_files_and_unknown_types_are_errors(tmp_path, hf_cache):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "data.xyz").write_text("hello")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        load_training_dataset(str(tmp_path / "empty.jsonl"), cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"blank\.txt.*empty"):
        load_training_dataset(str(tmp_path / "blank.txt"), cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"unknown file type '\.xyz'.*\.jsonl"):
        load_training_dataset(str(tmp_path / "data.xyz"), cache_dir=hf_cache)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_training_dataset(str(tmp_path / "missing.jsonl"), cache_dir=hf_cache)
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        load_training_dataset()
    with pytest.raises(ValueError, match="exactly one of dataset_name"):
        load_training_dataset("a", train_data_dir=tmp_path)


def test_non_string_caption_names_the_row(tmp_path, hf_cache):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": None}])
    with pytest.raises(ValueError, match="row 1.*None.*'text'"):
        load_training_dataset(path, cache_dir=hf_cache)


# -- preprocessing -------------------------------------------------------------------------------


def test_preprocess_image_center_crop_exact_pixels():
    # 8 wide x 4 high, red | blue at x = 4: the centre 4x4 crop is 2 red columns, 2 blue.
    pixels = preprocess_image(_two_colour(8, 4, 4), 4)
    assert pixels.shape == (3, 4, 4) and pixels.dtype == torch.float32
    assert torch.equal(pixels[:, :, :2], _unit(RED)[:, None, None].expand(3, 4, 2))
    assert torch.equal(pixels[:, :, 2:], _unit(BLUE)[:, None, None].expand(3, 4, 2))
    assert pixels.min() == -1.0 and pixels.max() == 1.0


def test_preprocess_image_non_square_resolution():
    # 4 wide x 8 high, top half green, bottom white; (h, w) = (2, 4) keeps rows 3 and 4.
    image = Image.new("RGB", (4, 8), WHITE)
    image.paste(GREEN, (0, 0, 4, 4))
    pixels = preprocess_image(image, (2, 4))
    assert pixels.shape == (3, 2, 4)
    assert torch.equal(pixels[:, 0], _unit(GREEN)[:, None].expand(3, 4))
    assert torch.equal(pixels[:, 1], _unit(WHITE)[:, None].expand(3, 4))


def test_preprocess_image_resizes_the_shorter_side_then_crops_the_centre():
    # 32 x 8 with blue in x in [8, 24): halved to 16 x 4, the centre crop (source x 12..19,
    # filter support included) sees only blue; an off-centre crop would see red.
    image = Image.new("RGB", (32, 8), RED)
    image.paste(BLUE, (8, 0, 24, 8))
    pixels = preprocess_image(image, 4)
    assert pixels.shape == (3, 4, 4)
    assert torch.equal(pixels, _unit(BLUE)[:, None, None].expand(3, 4, 4))
    # Upscaling a grey-level image: shorter side 2 -> 6, constant colour kept, 3 channels.
    grey = preprocess_image(Image.new("L", (3, 2), 51), (6, 9))
    assert grey.shape == (3, 6, 9)
    torch.testing.assert_close(grey, torch.full((3, 6, 9), 51 / 127.5 - 1.0))


def test_preprocess_video_samples_frames_evenly(tmp_path):
    levels = [0, 40, 80, 120, 160, 200, 240]
    frames = [Image.new("RGB", (8, 4), (v, v, v)) for v in levels]
    video = preprocess_video(frames, (2, 2), num_frames=3)
    assert video.shape == (3, 3, 2, 2)  # [C, F, H, W]
    expected = [levels[0], levels[3], levels[6]]
    for f, v in enumerate(expected):
        assert torch.equal(video[:, f], torch.full((3, 2, 2), float(v)) / 127.5 - 1.0)
    # Same frames from a [F, H, W, C] array, a folder of frame images and a GIF file.
    array = np.stack([np.asarray(frame) for frame in frames])
    assert torch.equal(preprocess_video(array, (2, 2), num_frames=3), video)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:03d}.png")
    assert torch.equal(preprocess_video(str(folder), (2, 2), num_frames=3), video)
    colours = [RED, GREEN, BLUE, WHITE]
    gif = [Image.new("RGB", (4, 4), c) for c in colours]
    gif[0].save(tmp_path / "clip.gif", save_all=True, append_images=gif[1:], duration=100)
    clip = load_video(str(tmp_path / "clip.gif"), num_frames=2)
    assert [img.getpixel((0, 0)) for img in clip] == [RED, WHITE]
    with pytest.raises(ValueError, match="7 frames, fewer than num_frames=9"):
        preprocess_video(frames, 2, num_frames=9)


# -- the cache -----------------------------------------------------------------------------------


def _build(
    dataset,
    cache_dir,
    prompts=None,
    media=None,
    fingerprint_parts=PARTS,
    batch_size=2,
    samples_per_shard=1024,
    **fields,
):
    settings = _settings(
        fingerprint_parts,
        with_latents=media is not None,
        **{"negative_prompt": "blurry", "resolution": 4, **fields},
    )
    return build_cache(
        dataset,
        settings,
        cache_dir=cache_dir,
        encode_prompts=prompts or Counting(fake_encode_prompts),
        encode_media=media,
        batch_size=batch_size,
        samples_per_shard=samples_per_shard,
    )


def test_cache_holds_the_encoders_outputs(image_folder, tmp_path, hf_cache):
    folder, _ = image_folder
    ds = load_training_dataset(train_data_dir=folder, cache_dir=hf_cache)
    cache_dir = tmp_path / "cache"
    cached = _build(ds, cache_dir, media=Counting(fake_encode_media), samples_per_shard=2)

    assert len(cached) == 3 and cached.has_latents
    entries = os.listdir(cache_dir)
    assert entries == [cached.fingerprint] and len(cached.fingerprint) == 64
    files = sorted(os.listdir(cache_dir / cached.fingerprint))
    assert files == [
        "index.json",
        "negative.safetensors",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    for i in range(len(ds)):
        row = ds[i]
        sample = cached[i]
        assert sample["prompt"] == row["prompt"]
        expected = fake_encode_prompts([row["prompt"]])
        assert set(sample["cond"]) == set(expected)
        for key, value in expected.items():
            assert sample["cond"][key].dtype == value.dtype
            assert torch.equal(sample["cond"][key], value[0])
        latents = fake_encode_media(preprocess_image(row["image"], 4)[None])[0]
        assert sample["latents"].shape == (3, 2, 2)
        assert torch.equal(sample["latents"], latents)
    negative = fake_encode_prompts(["blurry"])
    assert set(cached.negative) == set(negative)
    for key, value in negative.items():
        assert torch.equal(cached.negative[key], value)  # batch dim 1 kept

    batch = cached.collate([cached[2], cached[0]])
    assert batch["prompt"] == [ds[2]["prompt"], ds[0]["prompt"]]
    assert batch["cond"]["encoder_hidden_states"].shape == (2, 3, 2)
    assert batch["cond"]["pooled_projections"].shape == (2, 1)
    assert torch.equal(batch["latents"][1], cached[0]["latents"])

    reopened = CachedDataset(cache_dir / cached.fingerprint)
    assert reopened.prompts == cached.prompts
    assert torch.equal(reopened[1]["latents"], cached[1]["latents"])

    # It works behind a DataLoader with the sampler, and survives pickling (workers).
    loader = torch.utils.data.DataLoader(
        pickle.loads(pickle.dumps(cached)),
        batch_size=2,
        sampler=ResumableRandomSampler(len(cached), seed=0),
        collate_fn=cached.collate,
    )
    assert sorted(p for b in loader for p in b["prompt"]) == sorted(ds["prompt"])


def test_second_build_reuses_the_cache_without_encoding(tmp_path, hf_cache):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": f"prompt {i}"} for i in range(5)])
    ds = load_training_dataset(path, cache_dir=hf_cache)
    first_encoder = Counting(fake_encode_prompts)
    first = _build(ds, tmp_path / "cache", prompts=first_encoder)
    assert first_encoder.calls == 4  # 3 batches of <= 2 prompts + the negative prompt
    assert not first.has_latents and "latents" not in first[0]

    again = load_training_dataset(path, cache_dir=hf_cache)  # a fresh load of the same file
    encoder = Counting(fake_encode_prompts)
    second = _build(again, tmp_path / "cache", prompts=encoder)
    assert encoder.calls == 0
    assert second.path == first.path
    for i in range(5):
        assert torch.equal(
            second[i]["cond"]["encoder_hidden_states"], first[i]["cond"]["encoder_hidden_states"]
        )


def test_fingerprint_follows_every_input(image_folder, tmp_path, hf_cache):
    folder, _ = image_folder
    ds = load_training_dataset(train_data_dir=folder, cache_dir=hf_cache)
    base = dict(resolution=4, negative_prompt="blurry", with_latents=True)
    reference = cache_fingerprint(ds, _settings(PARTS, **base))
    assert cache_fingerprint(ds, _settings(dict(PARTS), **base)) == reference
    changed = [
        cache_fingerprint(ds, _settings(PARTS, **{**base, "resolution": 8})),
        cache_fingerprint(ds, _settings(PARTS, **{**base, "resolution": (4, 8)})),
        cache_fingerprint(ds, _settings(PARTS, **{**base, "negative_prompt": "ugly"})),
        cache_fingerprint(ds, _settings(PARTS, **{**base, "negative_prompt": None})),
        cache_fingerprint(ds, _settings({**PARTS, "revision": "refs/pr/1"}, **base)),
        cache_fingerprint(ds, _settings({**PARTS, "max_sequence_length": 4}, **base)),
        cache_fingerprint(ds, _settings(PARTS, **{**base, "with_latents": False})),
        cache_fingerprint(ds.select(range(2)), _settings(PARTS, **base)),
    ]
    assert len({reference, *changed}) == len(changed) + 1

    # Through build_cache: a changed resolution / negative / revision encodes again, elsewhere.
    cache_dir = tmp_path / "cache"
    paths = set()
    for kwargs in (
        {},
        {"resolution": 2},
        {"negative_prompt": "ugly"},
        {"fingerprint_parts": {**PARTS, "revision": "v2"}},
    ):
        encoder = Counting(fake_encode_prompts)
        cached = _build(ds, cache_dir, prompts=encoder, media=fake_encode_media, **kwargs)
        assert encoder.calls > 0
        paths.add(cached.path)
    assert len(paths) == 4 and len(os.listdir(cache_dir)) == 4
    with pytest.raises(TypeError, match=r"fingerprint_parts\['dtype'\] is a object"):
        cache_fingerprint(ds, _settings({**PARTS, "dtype": object()}))


def test_interrupted_build_leaves_nothing_a_later_build_would_use(tmp_path, hf_cache):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": f"prompt {i}"} for i in range(6)])
    ds = load_training_dataset(path, cache_dir=hf_cache)
    cache_dir = tmp_path / "cache"
    crashing = Counting(fake_encode_prompts, fail_on_call=2)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        _build(ds, cache_dir, prompts=crashing, samples_per_shard=2)  # shard 0 was written
    assert os.listdir(cache_dir) == []

    # A stray directory under the fingerprint's name without an index is not a cache either.
    fingerprint = cache_fingerprint(ds, _settings(PARTS, resolution=4, negative_prompt="blurry"))
    (cache_dir / fingerprint).mkdir()
    (cache_dir / fingerprint / "shard-00000.safetensors").write_bytes(b"partial")

    encoder = Counting(fake_encode_prompts)
    cached = _build(ds, cache_dir, prompts=encoder, samples_per_shard=2)
    assert encoder.calls == 4 and cached.fingerprint == fingerprint
    assert os.listdir(cache_dir) == [fingerprint]
    expected = fake_encode_prompts(list(ds["prompt"]))["encoder_hidden_states"]
    got = torch.stack([cached[i]["cond"]["encoder_hidden_states"] for i in range(6)])
    assert torch.equal(got, expected)


def test_corrupt_image_error_names_the_row_and_file(image_folder, tmp_path, hf_cache):
    folder, _ = image_folder
    (folder / "b.png").write_bytes(b"not a png at all")
    ds = load_training_dataset(train_data_dir=folder, cache_dir=hf_cache)
    row = list(ds["prompt"]).index("a green square")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"row {row}: cannot read image '.*b\.png'"):
        _build(ds, cache_dir, media=fake_encode_media)
    assert os.listdir(cache_dir) == []
    # Prompts alone do not need the images.
    assert len(_build(ds, cache_dir)) == 3

    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "image": "gone.png"}])
    ds = load_training_dataset(path, image_column="image", cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"row 0: cannot read image '.*gone\.png'"):
        _build(ds, cache_dir, media=fake_encode_media)


def test_video_cache_from_decoded_frames(tmp_path):
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8) for _ in range(3)]
    raw = datasets.Dataset.from_dict({"caption": ["one", "two", "three"], "frames": clips})
    ds = select_training_columns(raw, caption_column="caption", video_column="frames")
    assert sorted(ds.column_names) == ["prompt", "video"]
    cached = _build(ds, tmp_path / "cache", media=fake_encode_media, resolution=4, num_frames=3)
    for i, clip in enumerate(clips):
        pixels = preprocess_video(clip, 4, num_frames=3)
        assert pixels.shape == (3, 3, 4, 4)
        assert torch.equal(cached[i]["latents"], fake_encode_media(pixels[None])[0])

    # A `datasets.Video` column of files is found without naming it; frames 0 and 2 of 3.
    gif = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN, BLUE)]
    gif[0].save(tmp_path / "clip.gif", save_all=True, append_images=gif[1:], duration=100)
    raw = datasets.Dataset.from_dict({"text": ["rgb"], "clip": [str(tmp_path / "clip.gif")]})
    ds = select_training_columns(raw.cast_column("clip", datasets.Video()))
    assert sorted(ds.column_names) == ["prompt", "video"]
    cached = _build(ds, tmp_path / "cache", media=lambda x: x, resolution=2, num_frames=2)
    assert cached[0]["latents"].shape == (3, 2, 2, 2)
    assert torch.equal(cached[0]["latents"][:, 0], _unit(RED)[:, None, None].expand(3, 2, 2))
    assert torch.equal(cached[0]["latents"][:, 1], _unit(BLUE)[:, None, None].expand(3, 2, 2))


def test_build_errors_name_what_is_wrong(image_folder, tmp_path, hf_cache):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": "short"}, {"text": "x"}, {"text": "y"}])
    ds = load_training_dataset(path, cache_dir=hf_cache)
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="encode_media was given but the dataset has no 'image'"):
        _build(ds, cache_dir, media=fake_encode_media)

    def ragged(prompts):  # one token per character: lengths differ between batches
        return {"encoder_hidden_states": torch.zeros(len(prompts), max(map(len, prompts)), 2)}

    with pytest.raises(ValueError, match=r"'encoder_hidden_states' with per-sample shape \(1, 2\)"):
        _build(ds, cache_dir, prompts=ragged)

    def with_none(prompts):
        return {"encoder_hidden_states": torch.zeros(len(prompts), 2, 2), "mask": None}

    with pytest.raises(TypeError, match="NoneType for 'mask'"):
        _build(ds, cache_dir, prompts=with_none)
    assert os.listdir(cache_dir) == []


# -- the sampler ---------------------------------------------------------------------------------


def test_sampler_resumes_the_same_order():
    sampler = ResumableRandomSampler(12, seed=3)
    stream = itertools.chain.from_iterable(iter(sampler) for _ in itertools.count())
    first = list(itertools.islice(stream, 10))
    state = sampler.state_dict()
    rest = list(itertools.islice(stream, 7))  # crosses into the second epoch

    resumed = ResumableRandomSampler(12, seed=3)
    resumed.load_state_dict(state)
    stream = itertools.chain.from_iterable(iter(resumed) for _ in itertools.count())
    assert list(itertools.islice(stream, 7)) == rest
    # `take` draws from the same order; start_index counts drawn samples.
    fresh = ResumableRandomSampler(12, seed=3)
    assert fresh.take(17) == first + rest
    assert ResumableRandomSampler(12, seed=3, start_index=10).take(7) == rest


def test_sampler_epochs_are_seeded_permutations():
    a = ResumableRandomSampler(50, seed=0)
    epochs = [a.take(50) for _ in range(3)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert ResumableRandomSampler(50, seed=0).take(150) == sum(epochs, [])
    assert ResumableRandomSampler(50, seed=1).take(50) != epochs[0]
    assert list(ResumableRandomSampler(50, seed=0)) == epochs[0]
    sampler = ResumableRandomSampler(50, seed=0, start_index=45)
    assert len(sampler) == 5 and list(sampler) == epochs[0][45:]
    with pytest.raises(ValueError, match="length=50, this sampler 40"):
        ResumableRandomSampler(40, seed=0).load_state_dict(a.state_dict())
