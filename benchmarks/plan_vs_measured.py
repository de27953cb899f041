"""The memory planner against the measured peak of real DMD2 iterations on the CPU.

    python benchmarks/plan_vs_measured.py            # the table of the README
    python benchmarks/plan_vs_measured.py --only 8 9 # some configurations

Each configuration runs in a fresh process: a randomly initialised transformer built from a
config (a ~220M SD3, a small Flux), the layout's networks, AdamW (torch's, or torchao's 8-bit
one) on every trained network, the
GAN discriminator on the teacher's features, CFG, EMA; three iterations (student, fake score +
discriminator, student: the optimizer states exist by the last one). The transformer is loaded
from a checkpoint as ``train_dmd2.py`` loads it (an int8 base one layer at a time). Measured
peak: the process's ``ru_maxrss`` minus its value after imports and inputs, with glibc told to
return large blocks to the system on free (``MALLOC_MMAP_THRESHOLD_``), so RSS follows the live
bytes.
The planner runs on the meta device from the same config (``fastgen_diffusers.plan``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, not an installed one

SD3 = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 64,
    "num_attention_heads": 16,
    "joint_attention_dim": 1024,
    "caption_projection_dim": 1024,
    "pooled_projection_dim": 256,
    "pos_embed_max_size": 64,
}
FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 12,
    "joint_attention_dim": 768,
    "pooled_projection_dim": 256,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 28, 28],
}
# (name, config, layout, gradient checkpointing, quantize_base, GAN[, optimizer])
CASES = [
    ("SD3 220M", SD3, "full", False, "none", True),
    ("SD3 220M", SD3, "full", True, "none", True),
    ("SD3 220M", SD3, "shared_lora", False, "none", True),
    ("SD3 220M", SD3, "shared_lora", True, "none", True),
    ("SD3 220M", SD3, "shared_lora", False, "int8", True),
    ("SD3 220M", SD3, "shared_lora", True, "int8", True),
    ("Flux 100M", FLUX, "shared_lora", False, "none", True),
    ("Flux 100M", FLUX, "separate_lora", True, "none", True),
    ("SD3 220M", SD3, "shared_lora", True, "none", False),
    ("SD3 220M", SD3, "shared_lora", True, "int8", False),
    ("SD3 220M", SD3, "shared_lora", True, "none", True, "adamw8bit"),
    ("SD3 220M", SD3, "shared_lora", True, "int8", True, "adamw8bit"),
]
HEIGHT = WIDTH = 512  # 64x64 latents: 1024 image tokens
TEXT = 64
RANK = 16


def _case(index: int, num_layers: int | None) -> tuple:
    name, config, layout, gc, quant, gan, optimizer = (*CASES[index], "adamw")[:7]
    if num_layers is not None:
        config = {**config, "num_layers": num_layers}
    return name, config, layout, gc, quant, gan, optimizer


def measure(index: int, checkpoint: str, num_layers: int | None = None) -> dict:
    import diffusers

    import fastgen_diffusers as fgd
    from fastgen_diffusers.lora import LoraSettings, build_dmd_networks
    from fastgen_diffusers.lora import enable_gradient_checkpointing as lora_checkpointing
    from fastgen_diffusers.plugins.registry import family_for_transformer
    from fastgen_diffusers.quantize import quantize_base
    from fastgen_diffusers.quantized_loading import load_quantized_transformer
    from fastgen_diffusers.training.optim import optimizer_class

    name, config, layout, gc, quant, gan, optimizer = _case(index, num_layers)
    torch.manual_seed(0)
    cls = getattr(diffusers, config["_class_name"])
    family = family_for_transformer(cls)()
    b = 1
    latents = torch.randn(b, 16, HEIGHT // 8, WIDTH // 8)
    ehs = torch.randn(b, TEXT, config["joint_attention_dim"])
    pooled = torch.randn(b, config["pooled_projection_dim"])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Loaded from a checkpoint as train_dmd2.py loads it: an int8 base is read one layer at a
    # time into its quantized form, the unquantized one through from_pretrained.
    if quant == "none":
        transformer = cls.from_pretrained(checkpoint, subfolder="transformer")
    else:
        transformer = load_quantized_transformer(cls, checkpoint, method=quant)
    wrapped = family.wrap(transformer)
    wrapped.requires_grad_(False)
    quantize_base(wrapped, quant)
    nets = build_dmd_networks(wrapped, layout, LoraSettings(rank=RANK))
    for net in {id(n): n for n in (nets.student, nets.fake_score)}.values():
        if gc:
            if hasattr(net, "adapter"):
                lora_checkpointing(net.module)
            else:
                net.enable_gradient_checkpointing()
    disc = None
    if gan:
        family.attach_feature_capture(nets.teacher)
        disc = family.build_discriminator(nets.teacher)
    cfg = fgd.DMDConfig(
        guidance_scale=2.0,
        gan_loss_weight_gen=0.03 if gan else 0.0,
        student_update_freq=2,
        ema={"type": "constant", "decay": 0.99},
    )
    pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg, discriminator=disc)
    opt_cls = optimizer_class(optimizer)
    opts = {
        "student": opt_cls(nets.student.parameters(), lr=1e-5),
        "fake": opt_cls(nets.fake_score.parameters(), lr=1e-5),
    }
    if disc is not None:
        opts["disc"] = opt_cls(disc.parameters(), lr=1e-5)
    neg = {
        "negative_encoder_hidden_states": torch.zeros_like(ehs),
        "negative_model_kwargs": {"pooled_projections": torch.zeros_like(pooled)},
    }
    for i in range(3):
        noise = torch.randn_like(latents)
        if i % 2 == 0:
            pipe.compute_student_loss(latents, noise, ehs, pooled_projections=pooled, **neg)[
                "total"
            ].backward()
            opts["student"].step()
            opts["student"].zero_grad(set_to_none=True)
            pipe.update_ema()
        else:
            pipe.compute_fake_score_loss(latents, noise, ehs, pooled_projections=pooled)[
                "total"
            ].backward()
            opts["fake"].step()
            opts["fake"].zero_grad(set_to_none=True)
            if disc is None:
                continue
            pipe.compute_discriminator_loss(latents, noise, ehs, pooled_projections=pooled)[
                "total"
            ].backward()
            opts["disc"].step()
            opts["disc"].zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - baseline}


def _checkpoint(workdir: str, index: int, num_layers: int | None) -> str:
    """A randomly initialised (seed 0) fp32 transformer of configuration ``index``, saved once
    per configuration in a pipeline-style folder, outside the measured process."""
    _, config, *_ = _case(index, num_layers)
    folder = os.path.join(workdir, config["_class_name"] + f"_{config.get('num_layers')}")
    if not os.path.isdir(folder):
        # In a child process: a peak here would be inherited by every measuring process
        # (Linux carries ru_maxrss across fork and exec).
        code = (
            "import diffusers, json, sys, torch; torch.manual_seed(0); "
            f"getattr(diffusers, {config['_class_name']!r}).from_config("
            f"json.loads(sys.argv[1])).save_pretrained(sys.argv[2])"
        )
        subprocess.run(
            [sys.executable, "-c", code, json.dumps(config), os.path.join(folder, "transformer")],
            check=True,
            capture_output=True,
        )
    return folder


def planned(index: int, num_layers: int | None = None) -> dict:
    from fastgen_diffusers.plan import PlanSettings, plan_memory

    name, config, layout, gc, quant, gan, optimizer = _case(index, num_layers)
    settings = PlanSettings(
        layout=layout,
        rank=RANK,
        height=HEIGHT,
        width=WIDTH,
        gradient_checkpointing=gc,
        quantize_base=quant,
        text_length=TEXT,
        gan=gan,
        optimizer=optimizer,
    )
    plan = plan_memory(config, settings)
    return {"planned": plan.peak, "params": plan.num_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="+", default=None, help="configurations")
    parser.add_argument("--num_layers", type=int, default=None, help="blocks (default: 6 / 2)")
    parser.add_argument("--json", action="store_true", help="one JSON line per configuration")
    parser.add_argument("--resolution", type=int, default=512, help="pixels")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global HEIGHT, WIDTH
    HEIGHT = WIDTH = args.resolution
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.checkpoint, args.num_layers)))
        return
    layers = [] if args.num_layers is None else ["--num_layers", str(args.num_layers)]
    layers += ["--resolution", str(args.resolution)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    indices = args.only if args.only is not None else range(len(CASES))
    workdir = tempfile.mkdtemp(prefix="plan_vs_measured_")
    try:
        for i in indices:
            checkpoint = _checkpoint(workdir, i, args.num_layers)
            command = [sys.executable, __file__, "--measure", str(i), "--checkpoint", checkpoint]
            out = subprocess.run(
                [*command, *layers],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            row = {**json.loads(out.strip().splitlines()[-1]), **planned(i, args.num_layers)}
            rows.append((i, row))
            print(json.dumps(row) if args.json else f"{i}: {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        for _, row in rows:
            print(json.dumps(row))
        return
    gib = 2**30
    print(
        "| model | layout | GAN | checkpointing | base | optimizer | planned | measured "
        "| planned / measured |"
    )
    print("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for i, row in rows:
        name, _, layout, gc, quant, gan, optimizer = _case(i, None)
        print(
            f"| {name} ({row['params'] / 1e6:.0f}M) | `{layout}` | {'on' if gan else 'off'} | "
            f"{'on' if gc else 'off'} | {quant} | {optimizer} | {row['planned'] / gib:.2f} GiB | "
            f"{row['measured'] / gib:.2f} GiB | "
            f"{row['planned'] / row['measured']:.2f} |"
        )


if __name__ == "__main__":
    main()
