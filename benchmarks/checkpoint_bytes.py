"""Checkpoint size per network layout against the state that actually trains.

    python benchmarks/checkpoint_bytes.py

Trains the tiny SD3 pipeline of the tests (built from configs, nothing downloaded) for two
iterations in each layout, then prints, per layout: the fp32 bytes of the trained weights, the
trainable state (weights + two AdamW moments + the student EMA), the tensor payload and the
size of ``checkpoint-2``'s training state, the bytes of the loadable student it also holds
(``transformer/`` or ``pytorch_lora_weights.safetensors`` and ``scheduler/``, EMA weights, in
the teacher's dtype: fp32 here), and the frozen transformer's bytes (never written). The
difference between payload and folder is safetensors headers and JSON: a fixed amount per
tensor, which dominates only for tensors as tiny as these.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

LAYOUTS = {
    "full": [],
    "student_lora": ["--use_lora", "--rank", "4", "--lora_layout", "student_lora"],
    "separate_lora": ["--use_lora", "--rank", "4", "--lora_layout", "separate_lora"],
    "shared_lora": ["--use_lora", "--rank", "4", "--lora_layout", "shared_lora"],
}


def main() -> None:
    from safetensors import safe_open
    from tiny_pipelines import CALL_KWARGS, save_tiny_sd3

    from fastgen_diffusers.training import parse_args, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_sd3(root / "model")
        (root / "recipe.yaml").write_text("guidance_scale: 2.0\nema:\n  decay: 0.9\n")
        (root / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in "abcd"))
        base = sum(f.stat().st_size for f in (model / "transformer").glob("*.safetensors"))
        size = CALL_KWARGS["sd3"]
        for layout, flags in LAYOUTS.items():
            out = root / layout
            argv = [
                "--pretrained_model_name_or_path", str(model),
                "--recipe", str(root / "recipe.yaml"),
                "--dataset_name", str(root / "p.jsonl"),
                "--output_dir", str(out),
                "--height", str(size["height"]), "--width", str(size["width"]),
                "--train_batch_size", "2", "--max_train_steps", "2",
                "--report_to", "none", *flags,
            ]  # fmt: skip
            train(parse_args(argv))
            ckpt = out / "checkpoint-2"
            tensors: dict[str, int] = {}
            for f in (ckpt / "state").glob("*.safetensors"):
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        t = st.get_slice(k)
                        n = 4
                        for d in t.get_shape():
                            n *= d
                        tensors[k] = n
            weights = {
                r: sum(v for k, v in tensors.items() if k.startswith(f"{r}/"))
                for r in ("student", "fake_score")
            }
            trainable = 3 * sum(weights.values()) + weights["student"]
            payload = sum(tensors.values())
            files = [p for p in ckpt.rglob("*") if p.is_file()]
            loadable = ("transformer", "scheduler", "pytorch_lora_weights.safetensors")
            student = sum(
                p.stat().st_size for p in files if p.relative_to(ckpt).parts[0] in loadable
            )
            total = sum(p.stat().st_size for p in files) - student
            rows.append((layout, sum(weights.values()), trainable, payload, total, student, base))
    print()
    header = ("layout", "trained weights", "trainable state", "tensor payload", "state folder")
    header += ("ratio", "loadable student", "frozen transformer (not saved)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layout, w, t, p, total, student, base in rows:
        print(
            f"| {layout} | {w:,} | {t:,} | {p:,} | {total:,} | {p / t:.3f} | {student:,} "
            f"| {base:,} |"
        )


if __name__ == "__main__":
    main()
