"""Train a "thick strokes" style LoRA on the shipped digits teacher (CPU, a few minutes).

(Needs scikit-learn for the digits data: ``pip install -e ".[digits]"``.)

    python examples/digits/train_style_lora.py --output_dir embedded/digits-thick-lora

wrote the shipped ``embedded/digits-thick-lora`` (200 steps of batch 32, rank 8: 326 s of
training on one thread of a busy 2-core machine; ``style_summary.json`` holds its scores).

The style: every training digit's strokes are dilated (a 3x3 max filter on the 32x32 image in
[-1, 1], so bright strokes grow by one pixel each side). A peft LoRA on the teacher's attention
projections and feed-forwards is trained with the teacher's own rectified-flow objective
(logit-normal t, target ``noise - x0``, 10% empty prompts) on the VAE latents of those images,
then saved in diffusers' LoRA format with ``StableDiffusion3Pipeline.save_lora_weights``::

    pipe = StableDiffusion3Pipeline.from_pretrained("embedded/digits-sd3")
    pipe.load_lora_weights("outputs/thick-lora")
    images = pipe("a handwritten digit 7").images  # thick strokes

``digits_eval.py`` measures the style as the mean image intensity (``ink``: thicker strokes, more
bright pixels); the script prints it for the teacher with and without the LoRA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict

from fastgen_diffusers.io import atomic_directory
from fastgen_diffusers.plugins import sd3

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_eval  # noqa: E402

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]


def thicken(images: torch.Tensor) -> torch.Tensor:
    """The style: bright strokes dilated by one pixel (3x3 max filter), images in [-1, 1]."""
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def train_style_lora(
    teacher: str | Path = digits_eval.DEFAULT_TEACHER,
    *,
    steps: int = 200,
    rank: int = 8,
    lr: float = 2e-3,
    batch_size: int = 32,
    cond_dropout: float = 0.1,
    seed: int = 0,
    log=print,
) -> tuple[StableDiffusion3Pipeline, LoraConfig]:
    """The teacher's pipeline with a trained ``rank`` LoRA (adapter ``"default"``) on it."""
    torch.manual_seed(seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    images, labels = digits_eval.load_digits_32()
    train = digits_eval.split_indices()[0]
    x, y = thicken(images[train]), labels[train]
    vae = pipe.vae
    with torch.no_grad():
        raw = torch.cat(
            [vae.encode(c.expand(-1, 3, -1, -1)).latent_dist.mean for c in x.split(256)]
        )
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    prompts = [digits_eval.PROMPT.format(d) for d in range(10)] + [""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False
        )
    transformer = pipe.transformer
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
    transformer.add_adapter(config)
    # The wrapper collapses the 256 identical zero T5 tokens into one (exact), ~10x faster.
    model = sd3.SD3Wrapper(transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    transformer.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        x0, cond = latents[idx], y[idx].clone()
        cond[torch.rand(batch_size, generator=gen) < cond_dropout] = 10  # the "" prompt
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch_size, generator=gen))  # logit-normal(0, 1)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = model(
            hidden_states=xt,
            timestep=t,
            encoder_hidden_states=embeds[cond],
            pooled_projections=pooled[cond],
        )
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        if step % 100 == 0:
            log(f"step {step} loss {running / 100:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
    transformer.eval().requires_grad_(False)
    return pipe, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/thick-lora")
    parser.add_argument("--teacher", default=str(digits_eval.DEFAULT_TEACHER))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_digit", type=int, default=10, help="images per digit to score")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe, config = train_style_lora(
        args.teacher,
        steps=args.steps,
        rank=args.rank,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out = Path(args.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling folder and renamed into place: never a half-written LoRA.
    with atomic_directory(out) as staging:
        StableDiffusion3Pipeline.save_lora_weights(
            staging,
            transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
            transformer_lora_adapter_metadata=config.to_dict(),
        )
        seconds = round(time.time() - start)
        # The style at the teacher's 28 steps, with and without the LoRA.
        scores = {}
        classifier = digits_eval.load_classifier()
        for name, enabled in (("teacher", False), ("teacher+style", True)):
            if enabled:
                pipe.transformer.enable_adapters()
            else:
                pipe.transformer.disable_adapters()
            images, labels = digits_eval.generate(pipe, 28, 2.0, args.per_digit)
            scores[name] = digits_eval.evaluate(images, labels, classifier)
            print(json.dumps({name: scores[name]}), flush=True)
        real_images, _ = digits_eval.load_digits_32()
        scores["real digits"] = {"ink": digits_eval.ink(real_images)}
        scores["real digits, thickened"] = {"ink": digits_eval.ink(thicken(real_images))}
        summary = {"train_seconds": seconds, "args": vars(args), "scores": scores}
        (staging / "style_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    print(f"style LoRA written to {out}/pytorch_lora_weights.safetensors", flush=True)


if __name__ == "__main__":
    main()
