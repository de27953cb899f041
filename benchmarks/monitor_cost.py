"""What a collapse-monitor check costs on the README's main command (``embedded/digits-sd3``,
recipe ``dmd2_digits_sd3``, batch 16, prompt-only data), interleaved A B A B:

    python benchmarks/monitor_cost.py              # one thread, 5 rounds

- ``student step``: ``compute_student_loss`` (student forward, teacher CFG, fake score),
  backward and AdamW step;
- ``+ monitor check``: the same step recording its tensors, then what ``--monitor_every``
  adds: the teacher's conditional x0 at the student's input noise (one forward without grad,
  the reference of prompt-only data; data with images uses its latents instead) and
  ``CollapseMonitor.measure``.

The last table row spreads one check over ``--monitor_every`` (default 50) iterations of the
recipe's alternation (1 student + 4 fake-score steps per 5 iterations).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, ratio_row, table_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "embedded" / "digits-sd3"


def build(batch: int = 16):
    from diffusers import StableDiffusion3Pipeline

    import fastgen_diffusers as fgd
    from fastgen_diffusers.lora import build_dmd_networks
    from fastgen_diffusers.monitors import CollapseMonitor, prompt_groups
    from fastgen_diffusers.plugins import sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(TEACHER)
    emb = sd3.encode_prompt(pipe, [f"a handwritten digit {i % 10}" for i in range(batch)])
    cfg = fgd.load_dmd_config("general/distillation/dmd2_digits_sd3")
    nets = build_dmd_networks(sd3.SD3Wrapper(pipe.transformer).requires_grad_(False), "full")
    for net in (nets.student, nets.fake_score):
        net.float()
    dmd = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    student_opt = torch.optim.AdamW(nets.student.parameters(), lr=1e-4, betas=(0.0, 0.999))
    fake_opt = torch.optim.AdamW(nets.fake_score.parameters(), lr=1e-4, betas=(0.0, 0.999))
    monitor = CollapseMonitor()
    g = torch.Generator().manual_seed(0)
    ehs, pooled = emb["prompt_embeds"], emb["pooled_prompt_embeds"]
    neg = {"pooled_projections": emb["negative_pooled_prompt_embeds"]}

    def student_step(check: bool) -> None:
        dmd.record_student_step = check
        loss = dmd.compute_student_loss(
            None,
            torch.randn((batch, 4, 8, 8), generator=g),
            ehs,
            negative_encoder_hidden_states=emb["negative_prompt_embeds"],
            negative_model_kwargs=neg,
            pooled_projections=pooled,
        )["total"]
        loss.backward()
        student_opt.step()
        student_opt.zero_grad(set_to_none=True)
        if check:
            record = dmd.last_student_step
            assert record is not None
            reference = dmd.teacher_x0_at_student_input(ehs, pooled_projections=pooled)
            monitor.measure(
                student_x0=record["gen"],
                reference_x0=reference,
                group_ids=prompt_groups(ehs, pooled),
                teacher_x0=record["teacher_x0"],
                fake_x0=record["fake_x0"],
            )
            dmd.record_student_step, dmd.last_student_step = False, None

    def fake_step() -> None:
        loss = dmd.compute_fake_score_loss(
            None, torch.randn((batch, 4, 8, 8), generator=g), ehs, pooled_projections=pooled
        )["total"]
        loss.backward()
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)

    return student_step, fake_step, cfg.student_update_freq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--monitor_every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student_step, fake_step, freq = build()
    times = interleaved(
        {
            "student step": lambda: student_step(False),
            "+ monitor check": lambda: student_step(True),
            "fake-score step": fake_step,
        },
        args.rounds,
    )
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds\n")
    print(table_header("student step", "+ monitor check"))
    print(ratio_row("digits student step, batch 16", times, "student step", "+ monitor check"))
    student = statistics.median(times["student step"])
    extra = statistics.median(times["+ monitor check"]) - student
    fake = statistics.median(times["fake-score step"])
    window = args.monitor_every / freq * (student + (freq - 1) * fake)
    print(
        f"\none check: +{extra * 1000:.1f} ms; {args.monitor_every} iterations "
        f"({args.monitor_every // freq} student + {args.monitor_every - args.monitor_every // freq}"
        f" fake-score steps): {window:.2f} s; overhead {100 * extra / window:.2f}%"
    )


if __name__ == "__main__":
    main()
