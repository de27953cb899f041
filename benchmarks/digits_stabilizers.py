"""The recipe stabilizers on the shipped digits teacher, each on top of the 4-step recipe.

Every row trains ``dmd2_digits_sd3_4step`` (ODE steps, shift-3 rungs, backward simulation; its
ISG term off, ``isg_weight=0``, except in the ISG rows) with one option added through
``--recipe_overrides``, with the same iterations, batch, learning rate and seed, then scores
the student at 1 / 2 / 4 steps with
``examples/digits/digits_eval.py report`` (class accuracy and Frechet distance to the 360
held-out digits). The first rows train from ``examples/digits/prompts.txt`` (prompts only, as
the README's command); the last rows from the training split written by ``digits_eval.py
export-dataset`` (images + the same captions), which the backward-simulation mix and the GAN
branch need. One training process at a time, one thread (``OMP_NUM_THREADS=1``)::

    python benchmarks/digits_stabilizers.py                      # every row, seed 0
    python benchmarks/digits_stabilizers.py --seeds 0 1 --rows none images-none

Results are kept in ``<work_dir>/results.json``: a rerun skips the runs already measured (same
row, seed and budget) and prints the table again; ``--force`` measures them again. FD moves by
several points between training seeds: with several ``--seeds`` each cell is their mean, the
spread column the largest minus the smallest FD, and a second table lists every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
sys.path.insert(0, str(ROOT))

RECIPE = "general/distillation/dmd2_digits_sd3_4step"
# The SD3.5 recipes' generator weight for the teacher-feature discriminator, with their shared
# t / noise for real and fake samples.
GAN = ["gan_loss_weight_gen=0.03", "gan_use_same_t_noise=true"]

# (key, label, data, overrides): data "prompts" (prompts.txt) or "images" (the training split).
ROWS = [
    ("none", "none (the recipe without ISG)", "prompts", []),
    ("rescale", "`guidance_norm: rescale`", "prompts", ["guidance_norm=rescale"]),
    (
        "clamp",
        "`guidance_norm: clamp`, k = 1.5",
        "prompts",
        ["guidance_norm=clamp", "guidance_norm_clamp=1.5"],
    ),
    (
        "cfg-range",
        "`guidance_scale_range: [1.5, 3.0]`",
        "prompts",
        ["guidance_scale_range=[1.5,3.0]"],
    ),
    ("ida", "`ida_ratio: 0.03`", "prompts", ["ida_ratio=0.03"]),
    ("isg", "`isg_weight: 1`, `isg_margin: 0.02`", "prompts", ["isg_weight=1", "isg_margin=0.02"]),
    (
        "isg-rescale",
        "ISG + `guidance_norm: rescale`",
        "prompts",
        ["isg_weight=1", "isg_margin=0.02", "guidance_norm=rescale"],
    ),
    ("images-none", "none", "images", []),
    ("bsim-mix", "`backward_simulation_prob: 0.5`", "images", ["backward_simulation_prob=0.5"]),
    ("gan", "GAN, `gan_loss_weight_gen: 0.03`", "images", GAN),
    (
        "gan-rung",
        "GAN + `gan_rung_weighting: one_minus_t_squared`",
        "images",
        [*GAN, "gan_rung_weighting=one_minus_t_squared"],
    ),
]
STEPS = (1, 2, 4)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], log: Path) -> tuple[float | None, float]:
    """Runs ``cmd`` with its output in ``log``; returns the seconds between the run summary and
    the "Student written" line (the training iterations: loading and caching excluded) and the
    whole wall-clock time."""
    start = time.time()
    began = ended = None
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if began is None and b"***** DMD2 distillation *****" in line:
                began = time.time()
            elif b"Student written to" in line:
                ended = time.time()
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed with status {rc}; see {log}")
    train = None if began is None or ended is None else ended - began
    return train, time.time() - start


def measure(key: str, data: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / f"{key}-s{seed}"
    dataset = (
        ROOT / "examples" / "digits" / "prompts.txt"
        if data == "prompts"
        else Path(args.work_dir) / "digits-train"
    )
    train_cmd = [
        sys.executable,
        "train_dmd2.py",
        "--pretrained_model_name_or_path",
        str(ROOT / "embedded" / "digits-sd3"),
        "--recipe",
        RECIPE,
        "--dataset_name",
        str(dataset),
        "--resolution",
        "32",
        "--train_batch_size",
        "16",
        "--max_train_steps",
        str(args.max_train_steps),
        "--learning_rate",
        "1e-4",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
    ]
    if not any(o.startswith("isg_weight=") for o in overrides):
        # Each option is measured against the recipe without its own ISG term.
        overrides = ["isg_weight=0", *overrides]
    if overrides:
        train_cmd += ["--recipe_overrides", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[{key} seed {seed}] training: {' '.join(overrides) or 'recipe as shipped'} ({data})",
        flush=True,
    )
    train_s, wall_s = _run(train_cmd, out / "train.log")
    report_cmd = [
        sys.executable,
        "examples/digits/digits_eval.py",
        "report",
        "--output_dir",
        str(out),
        "--teacher_steps",  # no teacher rows: the student's alone
        "--student_steps",
        *map(str, STEPS),
        "--per_digit",
        str(args.per_digit),
        "--threads",
        "1",
    ]
    _run(report_cmd, out / "report.log")
    rows = json.loads((out / "quality" / "quality.json").read_text())["rows"]
    scores = {r["steps"]: r for r in rows if str(r.get("name", "")).startswith("student_")}
    result = {
        "key": key,
        "seed": seed,
        "budget": _budget(args),
        "train_s": None if train_s is None else round(train_s, 1),
        "wall_s": round(wall_s, 1),
        "fd": [scores[s]["fd"] for s in STEPS],
        "accuracy": [scores[s]["accuracy"] for s in STEPS],
    }
    print(f"[{key} seed {seed}] {json.dumps(result)}", flush=True)
    return result


def _budget(args: argparse.Namespace) -> str:
    return f"{args.max_train_steps} it, batch 16, lr 1e-4, {args.per_digit} per digit"


def _fmt(values: list[float], spec: str) -> str:
    return " / ".join(format(v, spec) for v in values)


def table(results: dict[str, dict], seeds: list[int], budget: str) -> str:
    lines = [
        "| data | option | FD 1 / 2 / 4 steps | FD spread over seeds | accuracy 1 / 2 / 4 steps "
        "| train s |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    per_seed = []
    for key, label, data, _ in ROWS:
        runs = [results.get(f"{key}-s{s}") for s in seeds]
        runs = [r for r in runs if r is not None and r["budget"] == budget]
        if not runs:
            continue
        fd = [statistics.mean(r["fd"][i] for r in runs) for i in range(len(STEPS))]
        acc = [100 * statistics.mean(r["accuracy"][i] for r in runs) for i in range(len(STEPS))]
        secs = [r["train_s"] for r in runs if r["train_s"] is not None]
        where = "prompts" if data == "prompts" else "images"
        train = f"{statistics.mean(secs):.0f}" if secs else "-"
        # max - min over the seeds at each step count: how far a single run can land.
        spread = [max(r["fd"][i] for r in runs) - min(r["fd"][i] for r in runs) for i in range(3)]
        spread_cell = _fmt(spread, ".0f") if len(runs) > 1 else "-"
        cells = [where, label, _fmt(fd, ".1f"), spread_cell, _fmt(acc, ".1f") + "%", train]
        lines.append("| " + " | ".join(cells) + " |")
        for r in runs:
            per_seed.append(
                f"| {where} | {label} | {r['seed']} | {_fmt(r['fd'], '.1f')} | "
                f"{_fmt([100 * a for a in r['accuracy']], '.0f')}% | {r['train_s']} |"
            )
    text = "\n".join(lines)
    if len(seeds) > 1:
        text += (
            f"\n\nMeans over seeds {', '.join(map(str, seeds))}; each seed:\n\n"
            "| data | option | seed | FD 1 / 2 / 4 steps | accuracy 1 / 2 / 4 steps | train s |\n"
            "| --- | --- | ---: | --- | --- | ---: |\n" + "\n".join(per_seed)
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "digits-stabilizers"))
    parser.add_argument(
        "--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--per_digit", type=int, default=20)
    parser.add_argument("--force", action="store_true", help="measure runs already in results.json")
    parser.add_argument("--table_only", action="store_true", help="print the table, run nothing")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = work / "results.json"
    results: dict[str, dict] = json.loads(record.read_text()) if record.is_file() else {}
    budget = _budget(args)
    todo = [row for row in ROWS if row[0] in args.rows]
    if not args.table_only:
        if any(data == "images" for _, _, data, _ in todo) and not (work / "digits-train").is_dir():
            import digits_eval

            digits_eval.export_training_split(work / "digits-train")
        for seed in args.seeds:
            for key, _, data, overrides in todo:
                name = f"{key}-s{seed}"
                if not args.force and results.get(name, {}).get("budget") == budget:
                    continue
                results[name] = measure(key, data, overrides, seed, args)
                from fastgen_diffusers.io import write_json_atomic

                write_json_atomic(record, results)
    print(f"\n{RECIPE}, {budget}, seeds {' '.join(map(str, args.seeds))}:\n")
    print(table(results, args.seeds, budget))


if __name__ == "__main__":
    main()
