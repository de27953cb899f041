"""Data a user hands over, read safely: images of every PIL mode decoded to the right RGB values,
media paths kept inside the dataset, a damaged embedding-cache shard named, and the DMD2
guidance rule enforced per call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen_diffusers.training.cache import CachedDataset, CacheSettings, build_cache
from fastgen_diffusers.training.data import (
    ALPHA_BACKGROUND,
    load_image,
    load_training_dataset,
    preprocess_image,
)
from fastgen_diffusers.training.errors import UserError

# -- image modes ----------------------------------------------------------------------------------


def _pixel(path, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(load_image(str(path)))[xy[1], xy[0]])


def test_every_image_mode_decodes_to_the_right_rgb(tmp_path):
    # 16-bit grayscale PNG: 32896 / 65535 is mid-gray (128 in 8 bits); PIL's convert("RGB")
    # clips it to 255.
    gray16 = Image.fromarray(np.full((4, 6), 32896, np.uint16))
    gray16.save(tmp_path / "gray16.png")
    opened = Image.open(tmp_path / "gray16.png")
    assert opened.mode in ("I;16", "I")
    assert opened.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # what we avoid
    assert _pixel(tmp_path / "gray16.png") == (128, 128, 128)
    full16 = Image.fromarray(np.array([[0, 65535]], np.uint16))
    full16.save(tmp_path / "range16.png")
    assert _pixel(tmp_path / "range16.png", (0, 0)) == (0, 0, 0)
    assert _pixel(tmp_path / "range16.png", (1, 0)) == (255, 255, 255)

    # Palette without and with a transparent entry.
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    assert _pixel(tmp_path / "palette.png", (0, 0)) == (10, 20, 30)
    assert _pixel(tmp_path / "palette.png", (1, 0)) == (200, 100, 50)
    palette.save(tmp_path / "palette_t.png", transparency=0)
    assert _pixel(tmp_path / "palette_t.png", (0, 0)) == ALPHA_BACKGROUND
    assert _pixel(tmp_path / "palette_t.png", (1, 0)) == (200, 100, 50)

    # CMYK (JPEG's print layout): pure cyan is (0, 255, 255) in RGB.
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cmyk.tiff")
    assert _pixel(tmp_path / "cmyk.tiff") == (0, 255, 255)

    # Transparency composited on white: a fully transparent pixel whose hidden colour is black
    # becomes white; a half-transparent red becomes pink; opaque pixels are kept.
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 1] = (255, 0, 0, 128)
    rgba[0, 2] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert _pixel(tmp_path / "rgba.png", (0, 0)) == (255, 255, 255)
    assert _pixel(tmp_path / "rgba.png", (1, 0)) == (255, 127, 127)
    assert _pixel(tmp_path / "rgba.png", (2, 0)) == (0, 0, 255)
    la = np.zeros((1, 2, 2), np.uint8)
    la[0, 1] = (60, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert _pixel(tmp_path / "la.png", (0, 0)) == (255, 255, 255)
    assert _pixel(tmp_path / "la.png", (1, 0)) == (60, 60, 60)

    # 1-bit and 8-bit grayscale.
    Image.new("1", (2, 2), 1).save(tmp_path / "bw.png")
    assert _pixel(tmp_path / "bw.png") == (255, 255, 255)
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert _pixel(tmp_path / "l.png") == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 4 wide x 2 high with a red left half; EXIF orientation 6 (rotate 90 clockwise to
    # display) shows it 2 wide x 4 high with the red half on top.
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[:, :2] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = load_image(str(tmp_path / "rotated.jpg"))
    assert shown.size == (2, 4)
    top, bottom = np.asarray(shown)[0, 0], np.asarray(shown)[3, 0]
    assert top[0] > 200 and top[2] < 60 and bottom[0] < 60
    tensor = preprocess_image(str(tmp_path / "rotated.jpg"), (4, 2))
    assert tensor.shape == (3, 4, 2)


# -- media paths ----------------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "imgs").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(data / "imgs" / "ok.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(outside / "secret.png")
    return data, outside


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_media_paths_outside_the_dataset_are_refused(layout, tmp_path):
    data, outside = layout
    hf = tmp_path / "hf"
    ok = _jsonl(data / "ok.jsonl", [{"text": "a", "file": "imgs/ok.png"}])
    ds = load_training_dataset(ok, image_column="file", cache_dir=hf)
    assert ds[0]["image"] == str(data / "imgs" / "ok.png")

    dotdot = _jsonl(
        data / "dd.jsonl",
        [{"text": "a", "file": "imgs/ok.png"}, {"text": "b", "file": "../outside/secret.png"}],
    )
    with pytest.raises(UserError, match=r"row 1.*'\.\./outside/secret\.png'.*outside"):
        load_training_dataset(dotdot, image_column="file", cache_dir=hf)

    secret = str(outside / "secret.png")
    absolute = _jsonl(data / "abs.jsonl", [{"text": "a", "file": secret}])
    with pytest.raises(UserError, match="row 0.*secret.png.*--allow_absolute_media_paths"):
        load_training_dataset(absolute, image_column="file", cache_dir=hf)
    allowed = load_training_dataset(
        absolute, image_column="file", cache_dir=hf, allow_absolute_paths=True
    )
    assert allowed[0]["image"] == secret
    # The flag is for absolute paths: a relative path still has to stay inside.
    with pytest.raises(UserError, match="outside"):
        load_training_dataset(dotdot, image_column="file", cache_dir=hf, allow_absolute_paths=True)

    (data / "imgs" / "link.png").symlink_to(outside / "secret.png")
    link = _jsonl(data / "link.jsonl", [{"text": "a", "file": "imgs/link.png"}])
    with pytest.raises(UserError, match="imgs/link.png.*secret.png"):
        load_training_dataset(link, image_column="file", cache_dir=hf)


def test_hub_style_dataset_never_reads_local_paths(layout, tmp_path):
    # A dataset that is not local (no base folder): a path in a string column is refused, even
    # with allow_absolute_paths, instead of being opened relative to the working directory.
    import datasets

    from fastgen_diffusers.training.data import select_training_columns

    _, outside = layout
    ds = datasets.Dataset.from_dict({"text": ["a"], "file": [str(outside / "secret.png")]})
    with pytest.raises(UserError, match="row 0.*secret.png.*never from local files"):
        select_training_columns(
            ds, image_column="file", local=False, allow_absolute_paths=True, source="me/data"
        )


# -- embedding cache ------------------------------------------------------------------------------


def test_damaged_cache_shard_names_the_file_and_the_folder(tmp_path):
    ds = load_training_dataset(
        _jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}]), cache_dir=tmp_path / "hf"
    )

    def encode(prompts):
        return {"encoder_hidden_states": torch.ones(len(prompts), 3, 4)}

    cached = build_cache(
        ds, CacheSettings(model="m"), cache_dir=tmp_path / "cache", encode_prompts=encode
    )
    shard = cached.path / "shard-00000.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as info:
        CachedDataset(cached.path)
    message = str(info.value)
    assert str(shard) in message and "damaged" in message
    assert f"delete the cache folder {str(cached.path)!r}" in message


# -- guidance -------------------------------------------------------------------------------------


def test_guidance_scale_below_one_is_refused_per_call(tiny_dit):
    from fastgen_diffusers import DMDConfig, DMDPipeline

    student, teacher, fake = tiny_dit(0), tiny_dit(1), tiny_dit(2)
    pipe = DMDPipeline(student, teacher, fake, DMDConfig(guidance_scale=2.0))
    noise = torch.randn(2, 4, 4, 4)
    cond, neg = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="guidance_scale=0.5 must be >= 1"):
        pipe.compute_student_loss(
            None, noise, cond, negative_encoder_hidden_states=neg, guidance_scale=0.5
        )
    loss = pipe.compute_student_loss(
        None, noise, cond, negative_encoder_hidden_states=neg, guidance_scale=1.0
    )
    assert torch.isfinite(loss["total"])
