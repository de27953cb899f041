"""Meta-device fake score loaded from rank 0 (no full copy per rank), sharded with FSDP2 on 2 CPU
ranks (gloo), for a real diffusers transformer with non-persistent rotary buffers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel

import fastgen_diffusers as fgd
from fastgen_diffusers.factory import load_from_rank0
from fastgen_diffusers.plugins.wan import WanWrapper

CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


def build() -> WanWrapper:
    return WanWrapper(WanTransformer3DModel(**CONFIG))


def teacher() -> WanWrapper:
    torch.manual_seed(0)
    return build()


def _worker(rank: int, out: str) -> None:
    # A file rendezvous: no TCP port to race other processes for.
    rendezvous = f"file://{out}/rendezvous"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        source = teacher() if rank == 0 else None  # only rank 0 ever holds the full weights

        def shard(model):
            for block in model.transformer.blocks:
                fully_shard(block)
            fully_shard(model)

        fake = fgd.create_fake_score_meta(build, source, shard=shard)
        result = {
            "all_dtensor": all(isinstance(p, DTensor) for p in fake.parameters()),
            "trainable": all(p.requires_grad for p in fake.parameters()) and fake.training,
            "params": {n: p.full_tensor() for n, p in fake.named_parameters()},
            "buffers": {n: b.clone() for n, b in fake.named_buffers()},
        }
        # Unsharded variant: plain parameters, same weights on every rank.
        plain = fgd.create_fake_score_meta(build, source)
        result["plain"] = {n: p.detach().clone() for n, p in plain.named_parameters()}
        # A forward of the sharded fake score equals the teacher's (same input on both ranks).
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 2, 4, 6, generator=g)
        ehs = torch.randn(1, 5, 16, generator=g)
        result["out"] = fake(x, torch.tensor([0.5]), ehs).detach()
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    mp.spawn(_worker, args=(str(out),), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_sharded_fake_score_equals_the_teacher_on_every_rank(ranks):
    reference = teacher()
    expected = dict(reference.named_parameters())
    buffers = dict(reference.named_buffers())
    non_persistent = [n for n in buffers if n not in reference.state_dict()]
    assert non_persistent  # the rotary tables: the case a state dict alone misses
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 2, 4, 6, generator=g)
        ehs = torch.randn(1, 5, 16, generator=g)
        out = reference(x, torch.tensor([0.5]), ehs)
    for result in ranks:
        assert result["all_dtensor"] and result["trainable"]
        for name, value in result["params"].items():
            assert torch.equal(value, expected[name].detach()), name
        for name, value in result["buffers"].items():
            assert torch.equal(value, buffers[name]), name
        for name, value in result["plain"].items():
            assert torch.equal(value, expected[name].detach()), name
        torch.testing.assert_close(result["out"], out, rtol=1e-5, atol=1e-6)


def test_single_process_and_errors():
    source = teacher()
    fake = fgd.create_fake_score_meta(build, source)
    assert all(torch.equal(a, b) for a, b in zip(fake.parameters(), source.parameters()))
    with pytest.raises(ValueError, match="non-persistent"):
        fgd.create_fake_score_meta(build, source.state_dict())
    with pytest.raises(ValueError, match="rank 0 must pass"):
        load_from_rank0(build(), None)
