"""Seconds per DMD2 step / iteration with each speed option off and on, interleaved A B A B.

    python benchmarks/speed_options.py                    # all tables, one thread
    python benchmarks/speed_options.py --only dedup adam  # some of them

Tables (ratio = on / off per round; median and min-max over rounds):

- ``cfg``: batched vs sequential CFG for the student step, with and without the GAN branch
  (SD3-config transformer, ~21M parameters, latents 2x16x16x16, 77 distinct text tokens, CFG
  4.5). With the GAN the batched pass is split (only the conditional half keeps a graph).
- ``dedup``: the README's main command's iteration (``embedded/digits-sd3``, recipe
  ``dmd2_digits_sd3``, batch 16, 16 CLIP + 256 zero T5 tokens), identical text tokens collapsed
  or not; one round is ``student_update_freq`` iterations (1 student + 4 fake-score steps).
- ``compile``: the same iteration with the transformer blocks of student, fake score and
  teacher compiled (``compile_blocks``), dedup on; compile time reported separately.
- ``adam``: ``AdamW.step`` over the ~21M parameters: torch's default for CPU tensors (a
  per-tensor loop), ``foreach=True``, ``fused=True``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, ratio_row, table_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "embedded" / "digits-sd3"


def sd3_model(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=6,
        joint_attention_dim=256,
        caption_projection_dim=384,
        pooled_projection_dim=256,
        pos_embed_max_size=16,
    )


def sd3_inputs(batch: int = 2, size: int = 16, tokens: int = 77, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 16, size, size, generator=g),
        "noise": torch.randn(batch, 16, size, size, generator=g),
        "ehs": torch.randn(batch, tokens, 256, generator=g),
        "neg": torch.randn(batch, tokens, 256, generator=g),
        "pooled": torch.randn(batch, 256, generator=g),
    }


def build_pipeline(wrapper, cfg, *, gan: bool, batch_cfg: bool, pipeline_class=None):
    """Student, fake score (copies) and teacher around one SD3 wrapper, our DMDPipeline."""
    import fastgen_diffusers as fgd
    from fastgen_diffusers.plugins import sd3

    teacher = copy.deepcopy(wrapper).requires_grad_(False)
    student, fake = copy.deepcopy(wrapper), copy.deepcopy(wrapper)
    disc = None
    if gan:
        sd3.attach_feature_capture(teacher)
        disc = sd3.build_discriminator(teacher)
    return fgd.DMDPipeline(student, teacher, fake, cfg, discriminator=disc, batch_cfg=batch_cfg)


def cfg_table(rounds: int) -> None:
    import fastgen_diffusers as fgd
    from fastgen_diffusers.plugins import sd3

    x = sd3_inputs()
    wrapper = sd3.SD3Wrapper(sd3_model())
    print("\n### Batched CFG vs sequential (student step: forward + backward)\n")
    print(table_header("sequential", "batched"))
    for gan in (False, True):
        cfg = fgd.DMDConfig(guidance_scale=4.5, gan_loss_weight_gen=0.03 if gan else 0.0)
        pipes = {b: build_pipeline(wrapper, cfg, gan=gan, batch_cfg=b) for b in (False, True)}

        def step(pipe):
            def run():
                loss = pipe.compute_student_loss(
                    x["latents"],
                    x["noise"],
                    x["ehs"],
                    negative_encoder_hidden_states=x["neg"],
                    pooled_projections=x["pooled"],
                )["total"]
                loss.backward()
                pipe.student.zero_grad(set_to_none=True)

            return run

        times = interleaved(
            {"sequential": step(pipes[False]), "batched": step(pipes[True])}, rounds
        )
        print(
            ratio_row(
                "student step, GAN" if gan else "student step", times, "sequential", "batched"
            )
        )


def digits_iteration_factory(batch: int = 16):
    """A closure running one alternation cycle of the main command's training (the recipe's
    ``student_update_freq`` iterations) on the digits teacher, and the three wrappers."""
    from diffusers import StableDiffusion3Pipeline

    import fastgen_diffusers as fgd
    from fastgen_diffusers.lora import build_dmd_networks
    from fastgen_diffusers.plugins import sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(TEACHER)
    prompts = [f"a handwritten digit {i % 10}" for i in range(batch)]
    emb = sd3.encode_prompt(pipe, prompts)
    cfg = fgd.load_dmd_config("general/distillation/dmd2_digits_sd3")
    nets = build_dmd_networks(sd3.SD3Wrapper(pipe.transformer).requires_grad_(False), "full")
    for net in (nets.student, nets.fake_score):
        net.float()
    dmd = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    opts = [
        torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.0, 0.999))
        for net in (nets.student, nets.fake_score)
    ]
    g = torch.Generator().manual_seed(0)
    shape = (batch, 4, 8, 8)
    neg = {"pooled_projections": emb["negative_pooled_prompt_embeds"]}

    def cycle() -> None:
        for i in range(cfg.student_update_freq):
            noise = torch.randn(shape, generator=g)
            if i == 0:
                loss = dmd.compute_student_loss(
                    None,
                    noise,
                    emb["prompt_embeds"],
                    negative_encoder_hidden_states=emb["negative_prompt_embeds"],
                    negative_model_kwargs=neg,
                    pooled_projections=emb["pooled_prompt_embeds"],
                )["total"]
                opt = opts[0]
            else:
                loss = dmd.compute_fake_score_loss(
                    None,
                    noise,
                    emb["prompt_embeds"],
                    pooled_projections=emb["pooled_prompt_embeds"],
                )["total"]
                opt = opts[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return cycle, (nets.student, nets.fake_score, nets.teacher)


def set_dedup(wrappers, value) -> None:
    for wrapper in wrappers:
        wrapper.dedup_text_tokens = value


def dedup_table(rounds: int) -> None:
    cycle, wrappers = digits_iteration_factory()

    def variant(value):
        def run():
            set_dedup(wrappers, value)
            cycle()

        return run

    times = interleaved({"all tokens": variant(False), "dedup": variant(None)}, rounds)
    print("\n### Identical text tokens collapsed (digits main command, 5 iterations)\n")
    print(table_header("all tokens", "dedup"))
    print(ratio_row("1 student + 4 fake-score steps", times, "all tokens", "dedup"))


def compile_table(rounds: int) -> None:
    from fastgen_diffusers.plugins.common import compile_blocks

    plain, _ = digits_iteration_factory()
    compiled, wrappers = digits_iteration_factory()
    start = time.perf_counter()
    for wrapper in wrappers:
        compile_blocks(wrapper)
    compiled()  # first call compiles
    compile_seconds = time.perf_counter() - start
    times = interleaved({"eager": plain, "compiled": compiled}, rounds)
    print(
        f"\n### Regional compilation (digits, dedup on; compiling took {compile_seconds:.0f} s)\n"
    )
    print(table_header("eager", "compiled"))
    print(ratio_row("1 student + 4 fake-score steps", times, "eager", "compiled"))


def adam_table(rounds: int) -> None:
    params = [p.detach().clone().requires_grad_() for p in sd3_model().parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {
        "default": torch.optim.AdamW(params, lr=1e-5),
        "foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-5, fused=True),
    }
    times = interleaved({k: o.step for k, o in opts.items()}, rounds * 4, warmup=2)
    print(f"\n### AdamW step ({sum(p.numel() for p in params) / 1e6:.1f}M parameters)\n")
    print(table_header("default", "other"))
    for kind in ("foreach", "fused"):
        print(
            ratio_row(kind, {"default": times["default"], "other": times[kind]}, "default", "other")
        )


TABLES = {"cfg": cfg_table, "dedup": dedup_table, "compile": compile_table, "adam": adam_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for name in args.only:
        TABLES[name](args.rounds)


if __name__ == "__main__":
    main()
