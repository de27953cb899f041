"""``digits_eval.py export-dataset``: the digits training split as an image folder that
``train_dmd2.py --dataset_name`` reads, captioned with the prompts the digits recipes train on,
and without a single held-out digit (the Frechet distance is measured against those)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen_diffusers.training.data import load_image, load_training_dataset, preprocess_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
import digits_eval  # noqa: E402

pytest.importorskip("sklearn", reason="the digits come from scikit-learn ([digits] extra)")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return digits_eval.export_training_split(tmp_path_factory.mktemp("export") / "digits-train")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_eval.load_digits_32()


def test_holds_the_training_split_only_with_its_labels_as_captions(exported, digits):
    images, labels = digits
    train, held = digits_eval.split_indices(len(images))
    rows = [json.loads(line) for line in (exported / "metadata.jsonl").read_text().splitlines()]
    indices = [int(Path(row["file_name"]).stem) for row in rows]
    assert sorted(indices) == train and not set(indices) & set(held)
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [row["file_name"] for row in rows] + ["metadata.jsonl"]
    )
    # The captions are the prompts the prompt-only runs train on, one per label.
    prompts = set((ROOT / "examples" / "digits" / "prompts.txt").read_text().split("\n")) - {""}
    assert {row["text"] for row in rows} == prompts
    for index, row in zip(indices, rows):
        assert row["text"] == digits_eval.PROMPT.format(int(labels[index]))
    # Each file is its digit: the teacher's 32x32 pixels, rounded to 8 bits (<= 1/255 off).
    for index, row in list(zip(indices, rows))[::97]:
        pixels = torch.from_numpy(np.array(Image.open(exported / row["file_name"]))).flatten()
        expected = (images[index, 0].flatten() + 1) * 127.5
        assert (pixels.float() - expected).abs().max() <= 0.5 + 1e-4


def test_the_training_data_loader_reads_it_as_images_with_prompts(exported, digits):
    images, labels = digits
    dataset = load_training_dataset(exported)
    assert len(dataset) == len(digits_eval.split_indices(len(images))[0])
    assert set(dataset.column_names) == {"prompt", "image"}
    row = dataset[5]
    index = sorted(digits_eval.split_indices(len(images))[0])[5]  # file names sort as indices
    assert row["prompt"] == digits_eval.PROMPT.format(int(labels[index]))
    # What the VAE is fed: RGB in [-1, 1], gray replicated, as the teacher was trained on.
    pixels = preprocess_image(load_image(row["image"]), 32)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, images[index].expand(3, -1, -1), atol=1 / 127.5)


def test_an_existing_folder_is_kept_and_a_failed_export_leaves_nothing(exported, monkeypatch):
    before = sorted(p.name for p in exported.iterdir())
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        digits_eval.export_training_split(exported)
    assert sorted(p.name for p in exported.iterdir()) == before

    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 100:
            raise OSError("disk full")
        return saved(self, *args, **kwargs)

    saved = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    target = exported.parent / "second"
    with pytest.raises(OSError, match="disk full"):
        digits_eval.export_training_split(target)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["digits-train"]
