"""The memory planner's answer for the built-in recipes' teachers.

    python benchmarks/plan_teachers.py

Per GPU, bf16 frozen weights, fp32 trained weights, AdamW, the recipe's GAN / CFG / EMA, gradient
checkpointing on, batch 1 per GPU, at each recipe's resolution; 1 and 8 GPUs (FSDP2); whether
the peak fits 24 / 48 / 80 GB cards. The transformer configs are the copies in
``fastgen_diffusers/plan_configs/`` (sources in the README); Wan 2.2 A14B counts its two experts.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen_diffusers.plan import (  # noqa: E402  # noqa: E402
    GiB,
    PlanSettings,
    _Planner,
    _recipe_flags,
    load_experts,
    load_transformer_config,
)

R = "general/distillation/"
# (teacher, recipe, height, width, frames)
TEACHERS = [
    ("stabilityai/stable-diffusion-3.5-medium", R + "dmd2_sd35_medium", 1024, 1024, None),
    ("stabilityai/stable-diffusion-3.5-large", R + "dmd2_sd35_large", 1024, 1024, None),
    ("black-forest-labs/FLUX.1-dev", R + "dmd2_flux1_dev", 1024, 1024, None),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", R + "dmd2_wan21_t2v_1_3b", 480, 832, 81),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", R + "dmd2_wan21_t2v_14b", 480, 832, 81),
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", R + "dmd2_wan22_a14b_t2v", 480, 832, 81),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", R + "dmd2_wan22_5b", 704, 1280, 121),
    ("Qwen/Qwen-Image", R + "dmd2_qwen_image", 1328, 1328, None),
]
LAYOUTS = ("full", "student_lora", "separate_lora", "shared_lora")
CARDS = (24, 48, 80)


def main() -> None:
    only = sys.argv[1:]
    print("| teacher | size | layout | GPUs | peak / GPU | 24 GB | 48 GB | 80 GB |")
    print("| --- | --- | --- | ---: | ---: | :---: | :---: | :---: |")
    for name, recipe, height, width, frames in TEACHERS:
        if only and not any(o in name for o in only):
            continue
        planner = _Planner(load_transformer_config(name), load_experts(name))
        base = PlanSettings(
            height=height,
            width=width,
            num_frames=frames,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            **_recipe_flags(recipe),
        )
        size = f"{height}x{width}" + (f"x{frames}" if frames else "")
        for layout in LAYOUTS:
            for gpus in (1, 8):
                plan = planner.plan(dataclasses.replace(base, layout=layout, num_gpus=gpus))
                fits = ["yes" if plan.fits(c * GiB) else "no" for c in CARDS]
                print(
                    f"| {name.split('/')[1]} | {size} | `{layout}` | {gpus} | "
                    f"{plan.peak / GiB:.1f} GiB | " + " | ".join(fits) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
