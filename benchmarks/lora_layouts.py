"""Peak memory and seconds per DMD2 iteration for the four network layouts.

    python benchmarks/lora_layouts.py                 # CPU: ~220M-parameter SD3 transformer
    python benchmarks/lora_layouts.py --device cuda --num_layers 12

Each layout runs in its own process (peak memory is per process: ``ru_maxrss`` on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU) on the same randomly initialised SD3 transformer,
with AdamW on every trainable network, for ``--iterations`` DMD2 iterations in the recipe's
alternation (one student step, then ``student_update_freq - 1`` fake-score steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

LAYOUTS = ("full", "student_lora", "separate_lora", "shared_lora")


def run_layout(args: argparse.Namespace) -> dict:
    from diffusers import SD3Transformer2DModel

    import fastgen_diffusers as fgd
    from fastgen_diffusers.lora import (
        LoraSettings,
        build_dmd_networks,
        enable_gradient_checkpointing,
    )
    from fastgen_diffusers.plugins.sd3 import SD3Wrapper

    device = torch.device(args.device)
    torch.manual_seed(0)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    transformer = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=args.num_layers,
        attention_head_dim=64,
        num_attention_heads=16,
        joint_attention_dim=1024,
        caption_projection_dim=1024,
        pooled_projection_dim=256,
        pos_embed_max_size=64,
    ).to(device)
    n_params = sum(p.numel() for p in transformer.parameters())
    nets = build_dmd_networks(SD3Wrapper(transformer), args.layout, LoraSettings(rank=args.rank))
    if args.gradient_checkpointing:
        for net in (nets.student, nets.fake_score):
            if hasattr(net, "adapter"):
                enable_gradient_checkpointing(net.module)
            else:
                net.enable_gradient_checkpointing()
    cfg = fgd.DMDConfig(guidance_scale=args.guidance_scale)
    pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    student_opt = torch.optim.AdamW(nets.student.parameters(), lr=1e-5)
    fake_opt = torch.optim.AdamW(nets.fake_score.parameters(), lr=1e-5)
    trainable = sum(p.numel() for p in [*nets.student.parameters(), *nets.fake_score.parameters()])

    b, s = args.batch_size, args.latent_size
    latents = torch.randn(b, 16, s, s, device=device)
    ehs = torch.randn(b, 32, 1024, device=device)
    pooled = torch.randn(b, 256, device=device)
    kwargs = {"pooled_projections": pooled}
    if args.guidance_scale is not None:
        kwargs.update(
            negative_encoder_hidden_states=torch.zeros_like(ehs),
            negative_model_kwargs={"pooled_projections": torch.zeros_like(pooled)},
        )

    def iteration(i: int) -> None:
        noise = torch.randn_like(latents)
        if i % cfg.student_update_freq == 0:
            student_opt.zero_grad(set_to_none=True)
            pipe.compute_student_loss(latents, noise, ehs, **kwargs)["total"].backward()
            student_opt.step()
        else:
            fake_opt.zero_grad(set_to_none=True)
            pipe.compute_fake_score_loss(latents, noise, ehs, pooled_projections=pooled)[
                "total"
            ].backward()
            fake_opt.step()

    iteration(0)  # warm-up (allocates optimizer states)
    iteration(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.iterations):
        iteration(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "layout": args.layout,
        "params": n_params,
        "trainable": trainable,
        "seconds_per_iteration": (time.perf_counter() - start) / args.iterations,
        "peak_gib": peak,
        "baseline_gib": baseline_rss if device.type == "cpu" else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--layout", choices=LAYOUTS, help="run one layout (used internally)")
    args = parser.parse_args()

    if args.layout:
        print(json.dumps(run_layout(args)))
        return
    rows = []
    for layout in LAYOUTS:
        cmd = [sys.executable, __file__, "--layout", layout] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{layout:>14}: {rows[-1]}", flush=True)
    full = rows[0]["peak_gib"]
    print(
        f"\n{'layout':>14} | {'trainable':>12} | {'s / iteration':>13} | {'peak GiB':>8} | vs full"
    )
    for row in rows:
        print(
            f"{row['layout']:>14} | {row['trainable']:>12,} | "
            f"{row['seconds_per_iteration']:>13.2f} | {row['peak_gib']:>8.2f} | "
            f"{row['peak_gib'] / full:.2f}x"
        )
    print(
        f"transformer parameters: {rows[0]['params']:,}; device {args.device}; "
        f"process baseline {rows[0]['baseline_gib']:.2f} GiB (CPU peaks include it)"
    )


if __name__ == "__main__":
    main()
