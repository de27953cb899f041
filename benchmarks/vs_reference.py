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
(counted by hooks). Ratio = ours / reference, per round; median and min-max. Both sides
there share torch's default AdamW, so those rows compare the pipelines alone.

Then each side as it runs by default (ours with the fused AdamW ``train_dmd2.py`` builds; the
reference with ``torch.optim.AdamW()``, its pipeline leaving the optimizer to the caller),
optionally ours compiled (``--compiled``), with the FLOPs per iteration and the rate they run
at against this thread's matmul rate at the model's shapes; and ``as trained``: SD3 without T5
as ``train_dmd2.py`` trains it (identical tokens collapsed).

Without the reference installed the script says what is missing and prints our side only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
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


def against_reference(label: str, times: dict[str, list[float]], side: str) -> str:
    """``| label | side s | reference s | side/reference | spread |`` from per-round times."""
    ratios = [o / r for o, r in zip(times[side], times["reference"])]
    return (
        f"| {label} | {statistics.median(times[side]):.3f} | "
        f"{statistics.median(times['reference']):.3f} | {statistics.median(ratios):.2f}x | "
        f"{min(ratios):.2f}-{max(ratios):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_scaling", action="store_true")
    parser.add_argument(
        "--as_trained_only", action="store_true", help="only the SD3-without-T5 comparison"
    )
    parser.add_argument(
        "--defaults_only", action="store_true", help="only the comparison of each side's defaults"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="add ours with compile_blocks to the defaults comparison (compiling takes minutes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_reference()
    if args.as_trained_only or args.defaults_only:
        if reference is not None and args.as_trained_only:
            as_trained(reference, args.rounds)
        if reference is not None and args.defaults_only:
            defaults(reference, args.rounds, args.compiled)
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
        defaults(reference, args.rounds, args.compiled)
        as_trained(reference, args.rounds)

    print("\nNetwork calls per step (forwards, and backwards reaching the network's input)\n")
    print("| step | pipeline | calls |\n| --- | --- | --- |")
    print("\n".join(count_lines))


def defaults(reference, rounds: int, compiled: bool) -> None:
    """Distinct tokens (nothing to collapse), each side as it runs by default: ours with the
    optimizer ``train_dmd2.py`` builds (``--adam_implementation auto``: fused AdamW), the
    reference with ``torch.optim.AdamW()`` (its pipeline leaves the optimizer to the caller;
    on a CPU torch's default is the per-tensor loop). With ``compiled``, also ours with
    ``compile_blocks`` on student, fake score and teacher (compile time reported apart)."""
    from fastgen_diffusers.plugins import sd3
    from fastgen_diffusers.plugins.common import compile_blocks

    x = sd3_inputs()
    rates: dict[str, tuple[float, float]] = {}
    print("\nEach side's defaults, distinct tokens (ours: fused AdamW as train_dmd2.py builds it;")
    print("reference: torch.optim.AdamW defaults)\n")
    print("| case | ours (s) | reference (s) | ours/reference | spread |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for gan in (False, True):
        base = sd3.SD3Wrapper(sd3_model(), dedup_text_tokens=False)
        built = {
            "ours": build("ours", reference, base, gan=gan, fused=True),
            "reference": build("reference", reference, base, gan=gan),
        }
        if compiled:
            built["compiled"] = build("ours", reference, base, gan=gan, fused=True)
        fns = {s: steps(b[0], b[1], x) for s, b in built.items()}
        compile_seconds = 0.0
        if compiled:
            pipe = built["compiled"][0]
            start = time.perf_counter()
            for net in (pipe.student, pipe.teacher, pipe.fake_score):
                compile_blocks(net)
            fns["compiled"]["cycle"]()  # the first calls compile
            compile_seconds = time.perf_counter() - start
        tag = "GAN" if gan else "no GAN"
        names = ["student", "fake"] + (["disc"] if gan else []) + ["cycle"]
        for name in names:
            times = interleaved({s: f[name] for s, f in fns.items()}, rounds)
            if name == "cycle":
                times = {s: [v / 5 for v in t] for s, t in times.items()}
                for side in ("ours", "reference"):
                    flops = cycle_flops(fns[side]["cycle"]) / 5
                    rates[f"{side}, {tag}"] = (flops, statistics.median(times[side]))
            label = f"{name} step, {tag}" if name != "cycle" else f"iteration (amortised), {tag}"
            pairs = [("ours", label)]
            if compiled:
                pairs.append(("compiled", f"{label}, ours compiled"))
            for side, text in pairs:
                print(against_reference(text, times, side), flush=True)
            if name == "cycle" and compiled:
                saved = statistics.median(times["ours"]) - statistics.median(times["compiled"])
                even = f"{compile_seconds / saved:.0f} iterations" if saved > 0 else "never"
                print(
                    f"| compiling ({tag}): {compile_seconds:.0f} s, repaid after {even} | | | | |"
                )

    gemm = gemm_rate()
    print(
        "\nWork per amortised iteration (FLOPs counted by torch's FlopCounterMode) and the rate "
        f"it runs at, against {gemm:.0f} GFLOP/s, this thread's matmul rate at the model's "
        "linear shapes (the ceiling for the same work)\n"
    )
    print("| pipeline | GFLOP / iteration | s / iteration | GFLOP/s | of the matmul rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, (flops, seconds) in rates.items():
        rate = flops / seconds / 1e9
        print(f"| {label} | {flops / 1e9:.1f} | {seconds:.3f} | {rate:.0f} | {rate / gemm:.0%} |")


def cycle_flops(cycle) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        cycle()
    return float(counter.get_total_flops())


def gemm_rate() -> float:
    """GFLOP/s of ``F.linear`` at the benchmark model's shapes (64 image and 77 text tokens per
    sample, batch 2, against its 384 and 1536 wide layers), median of 20 calls each, then the
    mean."""
    rates = []
    for rows, k, n in ((128, 384, 384), (128, 384, 1536), (128, 1536, 384), (154, 384, 1536)):
        a, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
        torch.nn.functional.linear(a, w, b)
        seconds = []
        for _ in range(20):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w, b)
            seconds.append(time.perf_counter() - start)
        rates.append(2 * rows * k * n / statistics.median(seconds) / 1e9)
    return statistics.mean(rates)


def as_trained(reference, rounds: int) -> None:
    """Each step and the amortised iteration with GAN as each side would run SD3 without T5
    (77 CLIP tokens, then the 256 zero rows the pipeline pads T5 with): ours as
    ``train_dmd2.py`` runs it (identical tokens collapsed, fused AdamW), the reference on the
    stock transformer with torch's default AdamW. Same math; ours does less work for the same
    result. The cycle also with torch's AdamW for ours (the collapse alone)."""
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
        "ours": steps(ours_fused[0], ours_fused[1], x),
        "ours, torch AdamW": steps(ours[0], ours[1], x),
        "reference": steps(ref[0], ref[1], x),
    }
    print("\nAs trained, SD3 without T5 (77 CLIP + 256 zero T5 tokens), with GAN (ours: tokens ")
    print("collapsed, fused AdamW; reference: stock model, AdamW)\n")
    print("| case | ours (s) | reference (s) | ours/reference | spread |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("student", "fake", "disc"):
        times = interleaved({s: fns[s][name] for s in ("ours", "reference")}, rounds)
        print(against_reference(f"{name} step", times, "ours"), flush=True)
    times = interleaved({s: f["cycle"] for s, f in fns.items()}, rounds)
    times = {s: [v / 5 for v in t] for s, t in times.items()}
    for label, side in (
        ("iteration (amortised), as trained", "ours"),
        ("iteration (amortised), ours with torch's AdamW", "ours, torch AdamW"),
    ):
        print(against_reference(label, times, side), flush=True)


if __name__ == "__main__":
    main()
