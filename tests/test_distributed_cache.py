"""The embedding cache built by 2 CPU ranks (gloo): each rank runs the real tiny SD3 encoders
(text encoders and VAE) over its own share of the batches only, and the assembled cache equals,
bit for bit, the one one process builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import CALL_KWARGS, save_tiny_sd3

from fastgen_diffusers.training.cache import CachedDataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a boat", "a bird"]
BATCH = 2  # 7 rows: batches 0-1 | 2-3 | 4-5 | 6, two per rank

BUILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from fastgen_diffusers.plugins import family_from_pretrained
    from fastgen_diffusers.training.cache import CacheSettings, build_cache
    from fastgen_diffusers.training.data import load_training_dataset

    model, images, cache_dir, out, size = sys.argv[1:6]
    size = int(size)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    family = family_from_pretrained(model)
    pipe = family.load_pipeline(model)
    rows = {"prompts": [], "media": 0}

    def encode_prompts(prompts):
        rows["prompts"].append(list(prompts))
        return family.encode_prompts(pipe, prompts, max_sequence_length=8)

    def encode_media(pixels):
        rows["media"] += len(pixels)
        return family.encode_media(pipe, pixels)

    settings = CacheSettings(model=model, family="sd3", height=size, width=size,
                             max_sequence_length=8, negative_prompt="blurry", needs_media=True)
    for _ in range(2):  # the second call finds the cache and encodes nothing
        cached = build_cache(load_training_dataset(train_data_dir=images), settings,
                             cache_dir=cache_dir, encode_prompts=encode_prompts,
                             encode_media=encode_media, batch_size=2, samples_per_shard=3,
                             process_index=rank, num_processes=world)
    # Every rank returns the whole cache.
    assert len(cached) == 7 and cached.has_latents, len(cached)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({**rows, "path": str(cached.path)}, f)
    if world > 1:  # a rank exiting while its peer still talks to gloo aborts the peer
        dist.barrier()
        dist.destroy_process_group()
    # Everything is written: skip interpreter finalization, where gloo's threads now and then
    # still release work objects and abort the process (SIGABRT after a clean run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def run(nproc: int, *argv: str, expect_success: bool = True) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # The tree under test first: an installed fastgen_diffusers elsewhere must not shadow it.
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--standalone", *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_success, output[-6000:]
    return output


def test_two_ranks_each_encode_their_share_of_the_same_cache(tmp_path):
    model = save_tiny_sd3(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    size = CALL_KWARGS["sd3"]["height"]
    metadata = []
    for i, prompt in enumerate(PROMPTS):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        metadata.append(json.dumps({"file_name": f"{i}.png", "text": prompt}) + "\n")
    (images / "metadata.jsonl").write_text("".join(metadata))
    script = tmp_path / "build.py"
    script.write_text(BUILD)

    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"report-{nproc}"
        out.mkdir()
        cache_dir = tmp_path / f"cache-{nproc}"
        run(nproc, str(script), str(model), str(images), str(cache_dir), str(out), str(size))
        reports[nproc] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
        # Only the finished cache is left: the ranks' parts were moved into it.
        assert [p.name for p in cache_dir.iterdir()] == [Path(reports[nproc][0]["path"]).name]

    # One process encodes every batch; rank 0 the first two batches (rows 0-3) and the negative
    # prompt, rank 1 the last two (rows 4-6), the same batches as the one process.
    (one,) = reports[1]
    assert one["prompts"] == [PROMPTS[0:2], PROMPTS[2:4], PROMPTS[4:6], PROMPTS[6:], ["blurry"]]
    assert one["media"] == 7
    rank0, rank1 = reports[2]
    assert rank0["prompts"] == [PROMPTS[0:2], PROMPTS[2:4], ["blurry"]]
    assert rank1["prompts"] == [PROMPTS[4:6], PROMPTS[6:]]
    assert (rank0["media"], rank1["media"]) == (4, 3)

    # Same fingerprint, same samples in the same order (what the sampler indexes), bitwise.
    a, b = CachedDataset(one["path"]), CachedDataset(rank0["path"])
    assert Path(a.path).name == Path(b.path).name and rank1["path"] == rank0["path"]
    assert a.prompts == b.prompts == PROMPTS
    for i in range(len(PROMPTS)):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["latents"], sb["latents"]), i
        for key in sa["cond"]:
            assert torch.equal(sa["cond"][key], sb["cond"][key]), (i, key)
    for key in a.negative:
        assert torch.equal(a.negative[key], b.negative[key]), key

    # An unreadable image in rank 1's share: rank 1 names the row, rank 0 stops too (instead of
    # waiting for rank 1's share until the collective timeout) and names rank 1; nothing is left.
    (images / "5.png").write_bytes(b"not an image")
    cache_dir, out = tmp_path / "cache-broken", tmp_path / "report-broken"
    out.mkdir()
    args = (str(script), str(model), str(images), str(cache_dir), str(out), str(size))
    output = run(2, *args, expect_success=False)
    assert "row 5" in output, output[-4000:]
    assert "rank 1 failed while encoding its share of the embedding cache" in output
    assert not any(p.name.endswith(".safetensors") for p in cache_dir.rglob("*"))
