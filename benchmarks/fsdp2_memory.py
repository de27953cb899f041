"""Host memory of the FSDP2 set-up and training steps, per rank, against one process.

Runs the real training code (``train_dmd2.py``'s) on 2 CPU ranks through the FSDP2 test harness
(``tests/fsdp2_harness.py``, gloo) and once as a single process without FSDP, for an SD3
transformer of ~230M parameters built from its config (random weights, saved to a temporary
pipeline folder with tiny text encoders and VAE). Each rank samples its resident set size
(psutil, every 20 ms) and reports the peak during set-up (until the networks are prepared
and resumed) and the peak during the training steps; the checkpoint folder is measured after the
last step. Not a test: prints a table.

Besides RSS, each rank samples the bytes it has malloc'd and not freed (glibc ``mallinfo2``):
live tensors without the allocator's free memory. At the peak of those it records where the
training thread is and what FSDP2 holds beyond the shards (gathered blocks, all-gather
outputs, reduce-scatter buffers), printed below the table.

    python benchmarks/fsdp2_memory.py  # ~218M parameters, 6 blocks of ~144 MiB
    python benchmarks/fsdp2_memory.py --layers 24 --heads 8  # ~225M, 24 blocks of ~36 MiB
    python benchmarks/fsdp2_memory.py --layers 2 --steps 2  # ~66M parameters

On accelerators the same split holds for device memory: under FSDP2 every network is built on
the meta device and nothing full-sized is ever allocated there.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def _rank_entry(argv: list[str]) -> None:
    """One rank: sample RSS, run the training, write the peaks to ``$FSDP2_MEMORY_OUT``."""
    import psutil
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import fastgen_diffusers.training.loop as loop
    import fastgen_diffusers.training.setup as setup
    from fastgen_diffusers.training import parse_args, train

    proc = psutil.Process()
    peaks = {"setup": 0, "steps": 0, "save": 0, "steps_live": 0}
    phase = ["setup"]
    done = threading.Event()

    groups: list = []  # FSDP2's parameter groups, to tally what they hold at the live peak
    main_thread = threading.main_thread().ident

    def sample() -> None:
        while not done.is_set():
            rss = proc.memory_info().rss
            peaks[phase[0]] = max(peaks[phase[0]], rss)
            if phase[0] == "steps":
                live = _malloc_live()
                if live > peaks["steps_live"]:
                    peaks["steps_live"] = live
                    peaks["at_live_peak"] = _fsdp_held(groups)
                    peaks["where"] = _where(sys._current_frames().get(main_thread))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    resume = loop.resume

    def local_bytes(tensors) -> int:
        local = [getattr(t, "to_local", lambda t=t: t)() for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    def resume_then_mark(run, trainer, num_samples, **kwargs):
        progress = resume(run, trainer, num_samples, **kwargs)
        peaks["setup"] = max(peaks["setup"], proc.memory_info().rss)
        phase[0] = "steps"
        trained = {
            id(p): p
            for net in (trainer.prepared.student, trainer.prepared.fake_score)
            for p in net.parameters()
        }
        local = [getattr(p, "to_local", lambda p=p: p)() for p in trained.values()]
        peaks["trained_bytes"] = sum(t.numel() * t.element_size() for t in local)
        # Every weight this rank holds: trained and frozen (a LoRA layout's bases, the teacher).
        nets = (trainer.prepared.student, trainer.prepared.fake_score, trainer.prepared.teacher)
        held = {id(p): p for net in nets for p in getattr(net, "module", net).parameters()}
        peaks["held_bytes"] = local_bytes(held.values())
        from torch.distributed.fsdp import FSDPModule

        for base in getattr(trainer.prepared, "sharded", []):
            for module in base.modules():
                if isinstance(module, FSDPModule):
                    groups.extend(module._get_fsdp_state()._fsdp_param_groups)
        return progress

    load_teacher = loop.load_teacher

    def load_teacher_after_baseline(run):
        # The process with its libraries, accelerate and the process group, before any weights.
        peaks["baseline"] = proc.memory_info().rss
        peaks["baseline_live"] = _malloc_live()
        return load_teacher(run)

    save_checkpoint = loop.save_checkpoint

    def save_checkpoint_marked(run, trainer, *args, **kwargs):
        # What the checkpoint holds: trained weights and the optimizers' state (no EMA in
        # this recipe), this rank's shards.
        params = {
            id(p): p
            for opt in trainer.prepared.optimizers.values()
            for g in opt.param_groups
            for p in g["params"]
        }
        states = [
            t
            for opt in trainer.prepared.optimizers.values()
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        ]
        peaks["state_bytes"] = local_bytes(params.values()) + local_bytes(states)
        phase[0] = "save"
        try:
            return save_checkpoint(run, trainer, *args, **kwargs)
        finally:
            phase[0] = "steps"

    finish = loop.finish

    def finish_marked(*args, **kwargs):
        phase[0] = "save"  # the export of the student
        return finish(*args, **kwargs)

    loop.save_checkpoint = save_checkpoint_marked
    loop.finish = finish_marked
    loop.resume = resume_then_mark
    loop.load_teacher = load_teacher_after_baseline
    torch.set_num_threads(1)
    if os.environ.get("FSDP2_MEMORY_NO_PREFETCH") == "1":
        # Measurement only: FSDP2 gathers the next block of the backward while computing this
        # one (on a GPU, to overlap the all-gather with compute); off, one block at a time.
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        FSDPParamGroup._backward_prefetch = lambda self: None
    if os.environ.get("FSDP2_MEMORY_FSDP") == "1":
        from fsdp2_harness import CPUFSDP2Accelerator

        setup.Accelerator = CPUFSDP2Accelerator
    train(parse_args(argv))
    done.set()
    thread.join()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["FSDP2_MEMORY_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps(peaks))


def _fsdp_held(groups: list) -> dict:
    """Bytes FSDP2 holds beyond the shards: gathered (unsharded) parameters, their gradients,
    pending all-gather outputs and the buffers its communication context keeps."""
    out = {"unsharded": 0, "unsharded_grads": 0, "all_gather": 0, "ctx": 0}
    seen: set[int] = set()

    def nbytes(t: Any) -> int:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    try:
        ctxs = {}
        for group in groups:
            for fp in group.fsdp_params:
                for t in getattr(fp, "all_gather_outputs", []) or []:
                    out["unsharded"] += nbytes(t)
                param = getattr(fp, "_unsharded_param", None)
                if param is not None:
                    out["unsharded"] += nbytes(param)
                    if param.grad is not None:
                        out["unsharded_grads"] += nbytes(param.grad)
            result = group._all_gather_result
            if result is not None:
                out["all_gather"] += nbytes(result.all_gather_output)
            ctxs[id(group.comm_ctx)] = group.comm_ctx
        for ctx in ctxs.values():
            if ctx.all_gather_state is not None:
                out["ctx"] += nbytes(ctx.all_gather_state.all_gather_result.all_gather_output)
            for state in ctx.reduce_scatter_states:
                out["ctx"] += nbytes(state.reduce_scatter_input)
    except (AttributeError, RuntimeError) as e:  # torch internals: measurement only
        out["error"] = repr(e)  # type: ignore[assignment]
    return out


def _where(frame: Any) -> list[str]:
    """The project's and FSDP's frames on the training thread's stack, innermost last."""
    stack = []
    while frame is not None:
        name = frame.f_code.co_filename
        if "fastgen_diffusers" in name or "fsdp" in name or "autograd" in name:
            stack.append(f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return stack[::-1][-8:]


@functools.cache
def _mallinfo2() -> Any:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def _malloc_live() -> int:
    """Bytes the process has malloc'd and not freed (glibc ``mallinfo2``: in-use arena chunks
    plus mmapped chunks): tensors and Python objects, without the free memory glibc keeps."""
    info = _mallinfo2()()
    return int(info.uordblks + info.hblkhd)


def _save_pipeline(path: Path, layers: int, heads: int) -> int:
    import torch
    from diffusers import SD3Transformer2DModel

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from tiny_pipelines import save_tiny_sd3

    save_tiny_sd3(path)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=32,  # the tiny T5's width
        caption_projection_dim=64 * heads,
        pooled_projection_dim=24,  # the two tiny CLIPs' projections
        out_channels=4,
        pos_embed_max_size=16,
    )
    transformer.save_pretrained(path / "transformer")
    return sum(p.numel() for p in transformer.parameters())


def _run(
    root: Path, model: Path, name: str, layout: list[str], nproc: int, steps: int, env_extra: dict
) -> dict:
    out = root / name
    stats = root / f"{name}-stats"
    stats.mkdir()
    (root / "prompts.jsonl").write_text("".join(f'{{"text": "prompt {i}"}}\n' for i in range(8)))
    (root / "recipe.yaml").write_text("guidance_scale: 2.0\nstudent_update_freq: 2\n")
    args = [
        *("--pretrained_model_name_or_path", str(model), "--recipe", str(root / "recipe.yaml")),
        *("--dataset_name", str(root / "prompts.jsonl"), "--output_dir", str(out)),
        *("--height", "64", "--width", "64", "--train_batch_size", str(2 // nproc)),
        *("--max_train_steps", str(steps), "--checkpointing_steps", "1"),
        *("--report_to", "none", "--mixed_precision", "no", *layout),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "FSDP2_MEMORY_OUT": str(stats),
        "FSDP2_MEMORY_FSDP": "1" if nproc > 1 else "0",
        **env_extra,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--standalone", __file__, "--rank-entry", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    ranks = [json.loads((stats / f"rank{r}.json").read_text()) for r in range(nproc)]
    from safetensors import safe_open

    checkpoint = out / f"checkpoint-{steps}"
    state = checkpoint / "state"
    ckpt = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
    ema = 0  # the EMA's payload, if the recipe keeps one
    for f in state.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.startswith("ema/"):
                    t = st.get_slice(key)
                    ema += _numel(t.get_shape()) * _itemsize(t.get_dtype())
    return {"ranks": ranks, "checkpoint": ckpt, "ema": ema}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "F64": 8}.get(dtype, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="SD3 joint blocks (6: ~230M)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads of 64 (width)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default="full,student_lora,shared_lora")
    parser.add_argument(
        "--no-backward-prefetch",
        action="store_true",
        help="measure with FSDP2's backward prefetch of the next block off",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=2**20,
        help="MALLOC_MMAP_THRESHOLD_ for every run (bytes; default 1 MiB): glibc then maps each "
        "allocation at least this large on its own and returns it to the system when freed, "
        "instead of raising the threshold as it goes and keeping freed memory in its heaps; 0: "
        "glibc's default",
    )
    args = parser.parse_args()
    env_extra = {}
    if args.no_backward_prefetch:
        env_extra["FSDP2_MEMORY_NO_PREFETCH"] = "1"
    if args.malloc_mmap_threshold:
        env_extra["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    all_layouts = {
        "full": [],
        "student_lora": ["--use_lora", "--lora_layout", "student_lora", "--rank", "16"],
        "shared_lora": ["--use_lora", "--lora_layout", "shared_lora", "--rank", "16"],
    }
    layouts = {name: all_layouts[name] for name in args.layouts.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = _save_pipeline(root / "model", args.layers, args.heads)
        model_bytes = params * 4
        print(
            f"SD3 transformer: {params / 1e6:.0f}M parameters, {model_bytes / MiB:.0f} MiB fp32, "
            f"{args.layers} blocks of width {64 * args.heads}"
        )
        print(f"{args.steps} steps, global batch 2, 64x64, fp32 (--mixed_precision no)")
        threshold = args.malloc_mmap_threshold or "glibc's default"
        print(f"MALLOC_MMAP_THRESHOLD_: {threshold}\n")
        header = (
            f"{'layout':<13}{'run':<10}{'rank':>5}{'libs':>7}{'setup':>8}{'goal':>7}"
            f"{'steps':>8}{'goal':>7}{'+live':>7}{'goal':>7}{'saving':>8}{'trained':>9}"
            f"{'ckpt state':>12}{'/ state':>9}"
        )
        print(header + "\n" + "-" * len(header) + "   (MiB; peak RSS of the process)")
        details: list[str] = []
        for name, layout in layouts.items():
            single = None
            for nproc in (1, 2):
                run = "1 process" if nproc == 1 else "FSDP2 x2"
                result = _run(
                    root, root / "model", f"{name}-{nproc}", layout, nproc, args.steps, env_extra
                )
                state = sum(r["state_bytes"] for r in result["ranks"]) + result["ema"]
                for rank, peaks in enumerate(result["ranks"]):
                    base = peaks["baseline"]
                    if nproc == 1:
                        single = peaks
                        # one process: every network's weights
                        setup_goal = base + peaks["held_bytes"]
                        steps_goal = peaks["steps"]
                        # the teacher's weights stay memory-mapped from its safetensors in one
                        # process (resident, not malloc'd); under FSDP2 its shards are malloc'd
                        single_live = peaks["steps_live"] + model_bytes - peaks["baseline_live"]
                        live_goal = single_live
                    else:
                        # rank 0 reads the teacher onto the host once; every rank holds its
                        # shards (1/N) of the frozen and the trained weights
                        host = model_bytes if rank == 0 else 0
                        setup_goal = base + host + peaks["held_bytes"]
                        assert single is not None
                        steps_goal = base + (single["steps"] - single["baseline"]) / nproc
                        live_goal = single_live / nproc
                    cells = ""
                    if rank == 0:
                        cells = f"{result['checkpoint'] / MiB:>12.0f}"
                        cells += f"{result['checkpoint'] / state:>8.2f}x"
                    details.append(
                        f"{name} {run} rank {rank}: at the +live peak, FSDP2 held "
                        + ", ".join(
                            f"{k} {v / MiB:.0f} MiB" if isinstance(v, int) else f"{k} {v}"
                            for k, v in peaks.get("at_live_peak", {}).items()
                        )
                        + "; in "
                        + " > ".join(peaks.get("where", []))
                    )
                    print(
                        f"{name:<13}{run:<10}{rank:>5}{base / MiB:>7.0f}"
                        f"{peaks['setup'] / MiB:>8.0f}{setup_goal / MiB:>7.0f}"
                        f"{peaks['steps'] / MiB:>8.0f}{steps_goal / MiB:>7.0f}"
                        f"{(peaks['steps_live'] - peaks['baseline_live']) / MiB:>7.0f}"
                        f"{live_goal / MiB:>7.0f}"
                        f"{peaks['save'] / MiB:>8.0f}{peaks['trained_bytes'] / MiB:>9.0f}" + cells,
                        flush=True,
                    )
        print(
            "\nlibs: RSS before the teacher loads. setup: until the networks are prepared; goal: "
            "libs + the\nteacher on rank 0's host + this rank's share (1/N) of every network's "
            "weights. steps: the training\niterations; goal: libs + 1/N of what one process adds. "
            "+live: malloc'd bytes the steps add (the\nteacher memory-mapped in one "
            "process counted in); goal: 1/N of one process's. "
            "saving: checkpoint writes and the\nfinal export. trained: trained weights on this "
            "rank. "
            f"ckpt state: checkpoint-{args.steps}/state (all\nranks; the loadable student beside "
            "it not counted); / state: over the trained weights,\nthe optimizers' state and the "
            "EMA held at the save."
        )

        print("\n" + "\n".join(details))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-entry":
        _rank_entry(sys.argv[2:])
    else:
        main()
