"""Side by side with the reference: our DMDPipeline against NVIDIA ModelOpt's
``modelopt.torch.fastgen.DMDPipeline`` on the same wrapped SD3 model and inputs.

    pip install nvidia-modelopt omegaconf pulp     # the optional reference (0.47 has fastgen)
    python benchmarks/vs_reference.py              # one thread, 3 interleaved rounds

Model: ``SD3Transformer2DModel`` (~21M parameters: 4 layers, 6 heads x 64) in our
``SD3Wrapper`` with token deduplication OFF (77 distinct text tokens: nothing to collapse),
CFG 4.5, GAN on the teacher's blocks (1, 2, 3) with our discriminator for both. Rows: each
step (ours also with batched CFG), the amortised iteration (the alternation
``student_update_freq = 5``: 1 student step, 4 fake-score + discriminator steps) and its
scaling over latent size and batch, then the forwards / backwards each pipeline runs per step
(counted by hooks). Ratio = ours / reference, per round; median and min-max.

Without the reference installed the script says what is missing and prints our side only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_options import sd3_inputs, sd3_model  # noqa: E402
from timing import interleaved  # noqa: E402

GUIDANCE = 4.5


def load_reference():
    try:
        import modelopt.torch.fastgen as reference
    except ImportError as err:
        print(
            f"SKIP reference: modelopt.torch.fastgen is not importable ({err}). Install the "
            "optional reference with `pip install nvidia-modelopt omegaconf pulp` (nvidia-modelopt "
            ">= 0.47 ships modelopt.torch.fastgen); printing our side only.\n"
        )
        return None
    return reference


class Counts:
    """Forwards of each network, and backward passes reaching its patch embedding."""

    def __init__(self, **nets: torch.nn.Module) -> None:
        self.count: Counter[str] = Counter()
        for name, net in nets.items():
            net.register_forward_hook(lambda m, a, o, key=f"{name} fwd": self.count.update([key]))
            first = net.transformer.pos_embed if hasattr(net, "transformer") else net
            first.register_forward_hook(self._backward(f"{name} bwd"))

    def _backward(self, key: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda grad: self.count.update([key]))

        return hook

    def take(self) -> str:
        text = ", ".join(f"{k} {v}" for k, v in sorted(self.count.items()))
        self.count.clear()
        return text


def reference_capture(teacher: torch.nn.Module, indices) -> None:
    """The reference reads captured features from ``teacher._fastgen_captured``: the same
    image-stream maps our SD3 capture yields."""
    from fastgen_diffusers.plugins.common import tokens_to_map

    teacher._fastgen_captured = []
    grid = {}
    transformer = teacher.transformer

    def note_grid(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        grid["hw"] = (x.shape[-2] // 2, x.shape[-1] // 2)

    transformer.register_forward_pre_hook(note_grid, with_kwargs=True)
    for i in indices:
        transformer.transformer_blocks[i].register_forward_hook(
            lambda m, a, out: teacher._fastgen_captured.append(tokens_to_map(out[1], grid["hw"]))
        )


def build(side: str, reference, base, *, gan: bool, batch_cfg: bool = False, fused: bool = False):
    import fastgen_diffusers as fgd
    from fastgen_diffusers.plugins import sd3

    kwargs = dict(guidance_scale=GUIDANCE, student_update_freq=5)
    if gan:
        kwargs |= dict(gan_loss_weight_gen=0.03, gan_r1_reg_weight=0.1)
    teacher = copy.deepcopy(base).requires_grad_(False)
    student, fake = copy.deepcopy(base), copy.deepcopy(base)
    indices = (1, 2, 3)
    disc = sd3.build_discriminator(teacher, indices) if gan else None
    if side == "ours":
        if gan:
            sd3.attach_feature_capture(teacher, indices)
        pipe = fgd.DMDPipeline(
            student, teacher, fake, fgd.DMDConfig(**kwargs), discriminator=disc, batch_cfg=batch_cfg
        )
    else:
        if gan:
            reference_capture(teacher, indices)
        pipe = reference.DMDPipeline(
            student, teacher, fake, reference.DMDConfig(**kwargs), discriminator=disc
        )
    adam = {"fused": True} if fused else {}
    opts = {
        "student": torch.optim.AdamW(student.parameters(), lr=1e-5, **adam),
        "fake": torch.optim.AdamW(fake.parameters(), lr=1e-5, **adam),
    }
    if disc is not None:
        opts["disc"] = torch.optim.AdamW(disc.parameters(), lr=1e-5, **adam)
    counts = Counts(student=student, teacher=teacher, fake=fake)
    return pipe, opts, counts


def steps(pipe, opts, x):
    """The step closures: student, fake score, discriminator, and one alternation cycle.

    Student and fake-score steps draw fresh noise, as the training loop does each iteration;
    the discriminator step takes the noise of the fake-score step before it (the loop runs
    both on one batch)."""
    g = torch.Generator().manual_seed(0)
    state = {"noise": x["noise"]}

    def fresh() -> torch.Tensor:
        state["noise"] = torch.randn(x["noise"].shape, generator=g)
        return state["noise"]

    def update(loss, key):
        loss.backward()
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)

    def student():
        update(
            pipe.compute_student_loss(
                x["latents"],
                fresh(),
                x["ehs"],
                negative_encoder_hidden_states=x["neg"],
                pooled_projections=x["pooled"],
            )["total"],
            "student",
        )

    def fake():
        update(
            pipe.compute_fake_score_loss(
                x["latents"], fresh(), x["ehs"], pooled_projections=x["pooled"]
            )["total"],
            "fake",
        )

    def disc():
        update(
            pipe.compute_discriminator_loss(
                x["latents"], state["noise"], x["ehs"], pooled_projections=x["pooled"]
            )["total"],
            "disc",
        )

    def cycle():
        student()
        for _ in range(4):
            fake()
            if "disc" in opts:
                disc()

    return {"student": student, "fake": fake, "disc": disc, "cycle": cycle}


def row(label: str, times: dict[str, list[float]], names: list[str]) -> str:
    cells = [f"{statistics.median(times[n]):.3f}" for n in names]
    if "reference" in times:
        ratios = [o / r for o, r in zip(times["ours"], times["reference"])]
        cells += [f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}"]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_scaling", action="store_true")
    parser.add_argument(
        "--as_trained_only", action="store_true", help="only the SD3-without-T5 comparison"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_reference()
    if args.as_trained_only:
        if reference is not None:
            as_trained(reference, args.rounds)
        return
    from fastgen_diffusers.plugins import sd3

    base = sd3.SD3Wrapper(sd3_model(), dedup_text_tokens=False)
    sides = ["ours"] + (["reference"] if reference is not None else [])
    header = "| case | " + " | ".join(f"{s} (s)" for s in sides)
    header += " | ours/reference | spread |" if reference is not None else " |"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds\n")
    print(header)
    print("| --- |" + " ---: |" * (len(sides) + (2 if reference is not None else 0)))
    x = sd3_inputs()
    count_lines = []
    for gan in (False, True):
        built = {s: build(s, reference, base, gan=gan) for s in sides}
        fns = {s: steps(built[s][0], built[s][1], x) for s in sides}
        tag = "GAN" if gan else "no GAN"
        names = ["student", "fake"] + (["disc"] if gan else []) + ["cycle"]
        for name in names:
            times = interleaved({s: fns[s][name] for s in sides}, args.rounds)
            label = f"{name} step, {tag}" if name != "cycle" else f"iteration (amortised), {tag}"
            if name == "cycle":
                times = {s: [v / 5 for v in t] for s, t in times.items()}
            print(row(label, times, sides), flush=True)
            for s in sides:
                if name != "cycle":
                    built[s][2].take()  # drop the timing rounds' calls
                    fns[s][name]()
                    count_lines.append(f"| {name}, {tag} | {s} | {built[s][2].take()} |")
        batched = build("ours", reference, base, gan=gan, batch_cfg=True)
        fn = steps(batched[0], batched[1], x)["student"]
        sequential = fns["ours"]["student"]
        times = interleaved({"ours": fn, "sequential": sequential}, args.rounds)
        ratios = [b / s for b, s in zip(times["ours"], times["sequential"])]
        print(
            f"| student step, {tag}, ours batched CFG (vs ours sequential: "
            f"{statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{statistics.median(times['ours']):.3f} |"
            + " |"
            * (len(sides) - 1 + (2 if reference else 0))
        )
        batched[2].take()
        fn()
        count_lines.append(f"| student, {tag}, batched CFG | ours | {batched[2].take()} |")

    if not args.no_scaling:
        print("\nScaling of the amortised iteration with GAN (seconds per iteration)\n")
        print(header)
        print("| --- |" + " ---: |" * (len(sides) + (2 if reference is not None else 0)))
        for batch, size in ((2, 16), (4, 16), (2, 32)):
            xs = sd3_inputs(batch=batch, size=size)
            built = {s: build(s, reference, base, gan=True) for s in sides}
            fns = {s: steps(built[s][0], built[s][1], xs)["cycle"] for s in sides}
            times = interleaved(fns, args.rounds)
            times = {s: [v / 5 for v in t] for s, t in times.items()}
            print(row(f"batch {batch}, latents 16x{size}x{size}", times, sides), flush=True)

    if reference is not None:
        as_trained(reference, args.rounds)

    print("\nNetwork calls per step (forwards, and backwards reaching the network's input)\n")
    print("| step | pipeline | calls |\n| --- | --- | --- |")
    print("\n".join(count_lines))


def as_trained(reference, rounds: int) -> None:
    """The amortised iteration with GAN as each side would run SD3 without T5 (77 CLIP tokens,
    then the 256 zero rows the pipeline pads T5 with): ours as ``train_dmd2.py`` runs it
    (identical tokens collapsed, fused AdamW), the reference on the stock transformer with
    torch's default AdamW. Same math; ours does less work for the same result."""
    from fastgen_diffusers.plugins import sd3

    x = sd3_inputs(tokens=77)
    for key in ("ehs", "neg"):
        x[key] = torch.cat([x[key], torch.zeros(x[key].shape[0], 256, x[key].shape[2])], 1)
    model = sd3_model()
    ours = build("ours", reference, sd3.SD3Wrapper(model, dedup_text_tokens=True), gan=True)
    ours_fused = build(
        "ours", reference, sd3.SD3Wrapper(model, dedup_text_tokens=True), gan=True, fused=True
    )
    ref = build("reference", reference, sd3.SD3Wrapper(model, dedup_text_tokens=False), gan=True)
    fns = {
        "ours": steps(ours_fused[0], ours_fused[1], x)["cycle"],
        "ours, torch AdamW": steps(ours[0], ours[1], x)["cycle"],
        "reference": steps(ref[0], ref[1], x)["cycle"],
    }
    times = interleaved(fns, rounds)
    times = {s: [v / 5 for v in t] for s, t in times.items()}
    print("\nAs trained, SD3 without T5 (77 CLIP + 256 zero T5 tokens), amortised iteration ")
    print("with GAN (ours: tokens collapsed, fused AdamW; reference: stock model, AdamW)\n")
    print("| case | ours (s) | reference (s) | ours/reference | spread |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, side in (("as trained", "ours"), ("ours with torch's AdamW", "ours, torch AdamW")):
        ratios = [o / r for o, r in zip(times[side], times["reference"])]
        print(
            f"| {label} | {statistics.median(times[side]):.3f} | "
            f"{statistics.median(times['reference']):.3f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
