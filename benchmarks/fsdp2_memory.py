"""Host memory of the FSDP2 set-up and training steps, per rank, against one process.

Runs the real training code (``train_dmd2.py``'s) on 2 CPU ranks through the FSDP2 test harness
(``tests/fsdp2_harness.py``, gloo) and once as a single process without FSDP, for an SD3
transformer of ~230M parameters built from its config (random weights, saved to a temporary
pipeline folder with tiny text encoders and VAE). Each rank samples its resident set size
(psutil, every 20 ms) and reports the peak during set-up (until the networks are prepared
and resumed) and the peak during the training steps; the checkpoint folder is measured after the
last step. Not a test: prints a table.

    python benchmarks/fsdp2_memory.py  # ~230M parameters
    python benchmarks/fsdp2_memory.py --layers 2 --steps 2  # ~66M parameters

On accelerators the same split holds for device memory: under FSDP2 every network is built on
the meta device and nothing full-sized is ever allocated there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
    peaks = {"setup": 0, "steps": 0, "save": 0}
    phase = ["setup"]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = proc.memory_info().rss
            peaks[phase[0]] = max(peaks[phase[0]], rss)
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
        return progress

    load_teacher = loop.load_teacher

    def load_teacher_after_baseline(run):
        # The process with its libraries, accelerate and the process group, before any weights.
        peaks["baseline"] = proc.memory_info().rss
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
    if os.environ.get("FSDP2_MEMORY_FSDP") == "1":
        from fsdp2_harness import CPUFSDP2Accelerator

        setup.Accelerator = CPUFSDP2Accelerator
    train(parse_args(argv))
    done.set()
    thread.join()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["FSDP2_MEMORY_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps(peaks))


def _save_pipeline(path: Path, layers: int) -> int:
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
        num_attention_heads=16,
        joint_attention_dim=32,  # the tiny T5's width
        caption_projection_dim=1024,
        pooled_projection_dim=24,  # the two tiny CLIPs' projections
        out_channels=4,
        pos_embed_max_size=16,
    )
    transformer.save_pretrained(path / "transformer")
    return sum(p.numel() for p in transformer.parameters())


def _run(root: Path, model: Path, name: str, layout: list[str], nproc: int, steps: int) -> dict:
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
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    layouts = {
        "full": [],
        "student_lora": ["--use_lora", "--lora_layout", "student_lora", "--rank", "16"],
        "shared_lora": ["--use_lora", "--lora_layout", "shared_lora", "--rank", "16"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = _save_pipeline(root / "model", args.layers)
        model_bytes = params * 4
        print(f"SD3 transformer: {params / 1e6:.0f}M parameters, {model_bytes / MiB:.0f} MiB fp32")
        print(f"{args.steps} steps, global batch 2, 64x64, fp32 (--mixed_precision no)\n")
        header = (
            f"{'layout':<13}{'run':<10}{'rank':>5}{'libs':>7}{'setup':>8}{'goal':>7}"
            f"{'steps':>8}{'goal':>7}{'saving':>8}{'trained':>9}{'ckpt state':>12}{'/ state':>9}"
        )
        print(header + "\n" + "-" * len(header) + "   (MiB; peak RSS of the process)")
        for name, layout in layouts.items():
            single = None
            for nproc in (1, 2):
                run = "1 process" if nproc == 1 else "FSDP2 x2"
                result = _run(root, root / "model", f"{name}-{nproc}", layout, nproc, args.steps)
                state = sum(r["state_bytes"] for r in result["ranks"]) + result["ema"]
                for rank, peaks in enumerate(result["ranks"]):
                    base = peaks["baseline"]
                    if nproc == 1:
                        single = peaks
                        # one process: every network's weights
                        setup_goal = base + peaks["held_bytes"]
                        steps_goal = peaks["steps"]
                    else:
                        # rank 0 reads the teacher onto the host once; every rank holds its
                        # shards (1/N) of the frozen and the trained weights
                        host = model_bytes if rank == 0 else 0
                        setup_goal = base + host + peaks["held_bytes"]
                        assert single is not None
                        steps_goal = base + (single["steps"] - single["baseline"]) / nproc
                    cells = ""
                    if rank == 0:
                        cells = f"{result['checkpoint'] / MiB:>12.0f}"
                        cells += f"{result['checkpoint'] / state:>8.2f}x"
                    print(
                        f"{name:<13}{run:<10}{rank:>5}{base / MiB:>7.0f}"
                        f"{peaks['setup'] / MiB:>8.0f}{setup_goal / MiB:>7.0f}"
                        f"{peaks['steps'] / MiB:>8.0f}{steps_goal / MiB:>7.0f}"
                        f"{peaks['save'] / MiB:>8.0f}{peaks['trained_bytes'] / MiB:>9.0f}" + cells,
                        flush=True,
                    )
        print(
            "\nlibs: RSS before the teacher loads. setup: until the networks are prepared; goal: "
            "libs + the\nteacher on rank 0's host + this rank's share (1/N) of every network's "
            "weights. steps: the training\niterations; goal: libs + 1/N of what one process adds. "
            "saving: checkpoint writes and the\nfinal export. trained: trained weights on this "
            "rank. "
            f"ckpt state: checkpoint-{args.steps}/state (all\nranks; the loadable student beside "
            "it not counted); / state: over the trained weights,\nthe optimizers' state and the "
            "EMA held at the save."
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-entry":
        _rank_entry(sys.argv[2:])
    else:
        main()
