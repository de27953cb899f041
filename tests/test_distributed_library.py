"""Multi-rank behaviour of the loss library on 2 CPU ranks (gloo): FSDP2 (fully_shard) EMA in
both modes, and the backward-simulation rung shared by every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastgen_diffusers as fgd

WORLD = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 4))


def _reference_ema(mode_steps: int) -> dict[str, torch.Tensor]:
    model = _net()
    ema = fgd.ExponentialMovingAverage(model, fgd.EMAConfig(decay=0.7))
    for it in range(mode_steps):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.1 * (it + 1) * (i + 1))
        ema.update(model, iteration=it)
    return {k: v.clone() for k, v in ema.state_dict().items()}


def _worker(rank: int, out_dir: str) -> None:
    # A file rendezvous: no TCP port to race other processes for.
    rendezvous = f"file://{out_dir}/rendezvous"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        results = {}
        for mode in ("full_tensor", "local_shard"):
            model = _net()
            fully_shard(model)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            ema = fgd.ExponentialMovingAverage(model, fgd.EMAConfig(decay=0.7, mode=mode))
            for it in range(4):
                with torch.no_grad():
                    for i, p in enumerate(model.parameters()):
                        p.add_(0.1 * (it + 1) * (i + 1))
                ema.update(model, iteration=it)
            state = {k: v.clone() for k, v in ema.state_dict().items()}
            # round trip on this rank, then publish into the sharded model itself
            fresh = fgd.ExponentialMovingAverage(model, fgd.EMAConfig(decay=0.7, mode=mode))
            fresh.load_state_dict(state)
            target = _net()
            fully_shard(target)
            fresh.copy_to(target)
            full_target = {n: p.full_tensor() for n, p in target.named_parameters()}
            results[mode] = {
                "state": state,
                "target": full_target,
                "local": {n: p.to_local().clone() for n, p in model.named_parameters()},
            }

        # create_fake_score refuses to deep-copy a sharded teacher; reusing it is allowed
        sharded = _net()
        fully_shard(sharded)
        try:
            fgd.create_fake_score(sharded)
            results["fsdp_guard"] = "no error"
        except RuntimeError as err:
            results["fsdp_guard"] = str(err)
        results["reuse_ok"] = fgd.create_fake_score(sharded, deep_copy=False) is sharded

        # backward simulation: each rank seeds differently, the rung must still agree
        torch.manual_seed(100 + rank)
        cfg = fgd.DMDConfig(
            student_sample_steps=3,
            backward_simulation=True,
            sample_t_cfg={"t_list": [0.9, 0.6, 0.3, 0.0]},
        )
        calls = []

        class Student(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.ones(()))

            def forward(self, hidden_states, timestep, encoder_hidden_states=None):
                calls.append(float(timestep[0]))
                return hidden_states * self.w

        pipe = fgd.DMDPipeline(Student(), Student(), Student(), cfg)
        rungs = []
        for _ in range(8):
            calls.clear()
            pipe._student_input(None, torch.randn(2, 3), None, {})
            rungs.append(len(calls))
        results["rungs"] = rungs
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank that closes its connections
        # while the other is still in its last collective aborts that one.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_full_tensor_ema_equals_single_process_ema(rank_results):
    reference = _reference_ema(4)
    for rank in range(WORLD):
        state = rank_results[rank]["full_tensor"]["state"]
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            # same float32 arithmetic on gathered values: equal up to summation order
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
        for name, value in rank_results[rank]["full_tensor"]["target"].items():
            torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7)


def test_local_shard_ema_keeps_each_ranks_shard(rank_results):
    reference = _reference_ema(4)
    for key, full in reference.items():
        shards = [rank_results[r]["local_shard"]["state"][key] for r in range(WORLD)]
        # each rank holds only its dim-0 shard, and together they are the full EMA
        assert all(s.shape[0] < full.shape[0] or full.shape[0] == 1 for s in shards)
        torch.testing.assert_close(torch.cat(shards), full, rtol=1e-6, atol=1e-7)
        for r in range(WORLD):
            local = rank_results[r]["local_shard"]["local"][key]
            assert shards[r].shape == local.shape
        # copy_to of per-rank shards rebuilt the full EMA in the sharded target
        torch.testing.assert_close(
            rank_results[0]["local_shard"]["target"][key], full, rtol=1e-6, atol=1e-7
        )


def test_backward_simulation_rung_is_shared_by_all_ranks(rank_results):
    rungs = [rank_results[r]["rungs"] for r in range(WORLD)]
    assert rungs[0] == rungs[1]
    assert len(set(rungs[0])) > 1  # it is random, just shared


def test_create_fake_score_refuses_a_sharded_teacher(rank_results):
    for rank in range(WORLD):
        assert "FSDP-wrapped teacher" in rank_results[rank]["fsdp_guard"]
        assert rank_results[rank]["reuse_ok"]


def test_create_fake_score_refuses_an_fsdp1_wrapped_teacher():
    teacher = nn.Module()
    teacher._fsdp_wrapped_module = _net()  # FSDP1 keeps the wrapped module under this name
    with pytest.raises(RuntimeError, match="FSDP-wrapped"):
        fgd.create_fake_score(teacher)
