"""FSDP2 on 2 CPU ranks (gloo), through accelerate's FSDP2 path forced on by
``tests/fsdp2_harness.py``: every network sharded in every layout; a 2-rank run over a global
batch equals the one-process run over the same batch (losses, exported weights, validation
grids); checkpoint at step k + resume equals the straight run, with a per-rank EMA; offloaded
parameters and blocks compiled before sharding train as the plain run does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import CALL_KWARGS, save_tiny_sd3, save_tiny_wan

from fastgen_diffusers.training import parse_args, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "fsdp2_harness.py"
PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a boat", "a bird", "a fish"]
RECIPE = """\
guidance_scale: 2.0
student_update_freq: 2
sample_t_cfg:
  time_dist_type: logitnormal
ema:
  decay: 0.9
"""
GLOBAL_BATCH = 4
STEPS = 4


def torchrun(
    script: Path,
    *argv: str,
    nproc: int = 2,
    timeout: int = 600,
    config: Path | None = None,
    expect_success: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``script`` on ``nproc`` ranks (under the accelerate ``config``: the README's by
    default); its output."""
    # The tree under test first: an installed fastgen_diffusers elsewhere must not shadow it.
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    if config is not None:
        env["FSDP_TEST_CONFIG"] = str(config)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(script),
        *argv,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == expect_success, output[-9000:]
    return output


def accelerate_config(path: Path, **changes: object) -> Path:
    """The README's FSDP2 config with ``changes`` to its ``fsdp_config`` (top-level keys when
    given as ``top__<key>``)."""
    config = yaml.safe_load((ROOT / "examples" / "accelerate" / "fsdp2_8gpu.yaml").read_text())
    for key, value in changes.items():
        if key.startswith("top__"):
            config[key[len("top__") :]] = value
        else:
            config["fsdp_config"][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    model = save_tiny_sd3(root / "model")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    (root / "gan.yaml").write_text(RECIPE + "gan_loss_weight_gen: 0.1\ngan_r1_reg_weight: 0.1\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    size = CALL_KWARGS["sd3"]
    rows = []
    for i, prompt in enumerate(PROMPTS):
        pixels = rng.integers(0, 255, (size["height"], size["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": prompt}) + "\n")
    (images / "metadata.jsonl").write_text("".join(rows))
    return root, model


def argv(root: Path, model: Path, out: Path, batch: int, *extra: str) -> list[str]:
    size = CALL_KWARGS["sd3"]
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--recipe",
        str(root / "recipe.yaml"),
        "--dataset_name",
        str(root / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--height",
        str(size["height"]),
        "--width",
        str(size["width"]),
        "--train_batch_size",
        str(batch),
        "--max_train_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "5",
        *extra,
    ]


def losses(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "logs" / "losses.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def logged_steps(out: Path) -> list[int]:
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def assert_same_losses(
    a: Path, b: Path, rtol: float, atol: float = 1e-7, monitor_atol: float | None = None
) -> None:
    """Every logged value within ``rtol`` / ``atol``; the monitors' statistics within
    ``monitor_atol`` (absolute) when given."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert la[step].keys() == lb[step].keys()
        for key in la[step]:
            if monitor_atol is not None and key.startswith("monitor/"):
                np.testing.assert_allclose(lb[step][key], la[step][key], rtol=0, atol=monitor_atol)
                continue
            np.testing.assert_allclose(lb[step][key], la[step][key], rtol=rtol, atol=atol)


def exported(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("transformer/*.safetensors")) or [
        out / "pytorch_lora_weights.safetensors"
    ]
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


# fp32 sums in a different order (2 ranks reduce-scatter vs one process): a few ulps per op,
# amplified over a handful of Adam steps; losses are O(0.1-1).
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


GAN = ["--recipe", "gan.yaml", "--dataset_name", "images", "--gradient_checkpointing"]


# bf16 (the README's config): both runs compute every forward in bf16 (8 significant bits:
# relative rounding 2^-8 = 0.4% per op) from the same fp32 weights; the 2-rank run reduces in
# another order and rounds each rank's half-batch separately. Measured over 4 steps: the O(1)
# fake-score losses differ by 1.1e-3 relative (bound: 5e-3, about one bf16 rounding); the
# student's VSD loss (~5e-4) is a difference of two bf16 score predictions, so its error is
# absolute: measured 2.8e-5 (bound 1e-4). Exported fp32 weights: measured 2.3e-3; Adam moves a
# weight by at most ~lr = 1e-3 per step whatever the gradient's size, so runs whose bf16
# gradients differ in sign drift apart by up to 2 * lr per step (bound 5e-3, well below the
# 8e-3 that 4 steps allow; an unloaded or wrongly loaded weight is off by O(0.1-1)).
BF16_LOSS_RTOL = 5e-3
BF16_LOSS_ATOL = 1e-4
BF16_WEIGHT_ATOL = 5e-3
# The monitors' statistics of the bf16 student and teacher x0 (O(1) latents, diversity, std,
# mean; the O(0.03) VSD step and gradient norm are differences of bf16 predictions): measured
# up to 1.7e-3 absolute between the runs, about half a bf16 rounding of an O(1) value (3.9e-3).
BF16_MONITOR_ATOL = 5e-3

FP32 = ["--mixed_precision", "no"]  # overrides the README config's bf16
# The README's config as it is (bf16) on 2 ranks; the one process told bf16 on the command line.
# Weights saved in fp32 (a bf16 run saves bf16 by default): compared to the bound above.
BF16_ONE = ["--mixed_precision", "bf16", "--upcast_before_saving"]
BF16_TWO = ["--upcast_before_saving"]


@pytest.mark.parametrize(
    "name,layout,precision",
    [
        ("full", [], "fp32"),
        ("shared", ["--use_lora", "--lora_layout", "shared_lora", "--rank", "4"], "fp32"),
        # GAN + R1 on images: the sharded discriminator and a backward through the teacher
        ("full-gan", GAN, "fp32"),
        ("full-bf16", [], "bf16"),
    ],
)
def test_two_ranks_equal_one_process(setup, name, layout, precision):
    root, model = setup
    one = root / f"one-{name}"
    two = root / f"two-{name}"
    layout = [str(root / a) if a in ("gan.yaml", "images") else a for a in layout]
    extra = [*layout, "--validation_prompts", "a cat", "--validation_steps", str(STEPS)]
    one_extra, two_extra = (FP32, FP32) if precision == "fp32" else (BF16_ONE, BF16_TWO)
    train(parse_args(argv(root, model, one, GLOBAL_BATCH, *extra, *one_extra)))
    torchrun(HARNESS, *argv(root, model, two, GLOBAL_BATCH // 2, *extra, *two_extra))
    # The last checkpoint holds the student gathered as the final export is.
    assert_same_weights(two / f"checkpoint-{STEPS}", two, atol=0)
    # the monitors' check of step 0 runs on the gathered global batch: compared below too
    assert {"monitor/diversity_batch", "monitor/saturation"} <= losses(two)[1].keys()
    if precision == "bf16":
        assert_same_losses(one, two, BF16_LOSS_RTOL, BF16_LOSS_ATOL, BF16_MONITOR_ATOL)
        assert_same_weights(one, two, BF16_WEIGHT_ATOL)
        return
    assert_same_losses(one, two, LOSS_RTOL)
    assert_same_weights(one, two, WEIGHT_ATOL)  # the EMA student, gathered on rank 0
    for grid in ("teacher-000000.png", f"student-{STEPS:06d}.png"):
        a = np.asarray(Image.open(one / "validation" / grid), dtype=np.int16)
        b = np.asarray(Image.open(two / "validation" / grid), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, grid  # 8-bit rounding of equal-to-1e-5 images


def test_resume_on_two_ranks_equals_straight_run(setup):
    root, model = setup
    straight, resumed, one = root / "straight", root / "resumed", root / "one-local-shard"
    # local_shard: each rank keeps (and checkpoints) only its shard of the EMA.
    extra = [*FP32, "--checkpointing_steps", "2", "--recipe_overrides", "ema.mode=local_shard"]
    torchrun(HARNESS, *argv(root, model, straight, GLOBAL_BATCH // 2, *extra))
    checkpoint = straight / "checkpoint-2"
    # Sharded: one safetensors file per rank (DCP), each holding its shards of every trained
    # tensor, the EMA included; JSON for the rest; nothing pickled.
    files = sorted((checkpoint / "state").glob("*.safetensors"))
    assert len(files) == 2
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "COMPLETE",
        "run.json",
        "scheduler",  # with transformer/: the student as the stock pipeline loads it
        "state",
        "trainer_state.json",
        "transformer",
    ]
    shards = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            shards.append({k: st.get_tensor(k) for k in st.keys() if k.startswith("ema/")})
    sharded = [k for k in shards[0] if k in shards[1] and shards[0][k].shape[0] > 0]
    assert sharded and any(not torch.equal(shards[0][k], shards[1][k]) for k in sharded)
    # The checkpoint's transformer/ is the EMA its ranks' shards form, gathered exactly.
    student = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in shards[0]:
        if key.startswith("ema/transformer."):
            full = torch.cat([shards[0][key], shards[1][key]])
            assert torch.equal(student[key.removeprefix("ema/transformer.")], full), key

    # A second run picks the straight run up at its step-2 checkpoint.
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    # The log as a run killed after iteration 3 leaves it: cut back to the checkpoint.
    head = (straight / "logs" / "losses.jsonl").read_text().splitlines()[:3]
    (resumed / "logs").mkdir()
    (resumed / "logs" / "losses.jsonl").write_text("\n".join(head) + "\n")
    resume = [*extra, "--resume_from_checkpoint", "latest"]
    torchrun(HARNESS, *argv(root, model, resumed, GLOBAL_BATCH // 2, *resume))
    assert_same_losses(straight, resumed, rtol=0)
    assert logged_steps(resumed) == list(range(1, STEPS + 1))  # each iteration once
    assert_same_weights(straight, resumed, atol=0)
    # The EMA gathered from the ranks' shards is the one-process EMA.
    train(parse_args(argv(root, model, one, GLOBAL_BATCH)))
    assert_same_weights(one, straight, WEIGHT_ATOL)


PREPARE_CHECK = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    from torch.distributed.tensor import DTensor
    from fsdp2_harness import CPUFSDP2Accelerator
    from fastgen_diffusers.lora import LoraSettings, build_dmd_networks
    from fastgen_diffusers.plugins import family_from_pretrained
    from fastgen_diffusers.training.parallel import (
        load_pipeline, prepare_networks, take_host_transformer, unsharded_class
    )

    layout, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    acc = CPUFSDP2Accelerator(cpu=True)
    family = family_from_pretrained(path)
    pipe = load_pipeline(acc, family, path)
    # Every rank, rank 0 included, holds an empty (meta) transformer; rank 0 alone has read the
    # weights, onto the host.
    assert all(p.is_meta for p in pipe.transformer.parameters())
    host = take_host_transformer(pipe)
    assert (host is not None) == (acc.process_index == 0)
    if host is not None:
        assert all(p.device.type == "cpu" for p in host.parameters())
    teacher = family.wrap(pipe.transformer)
    teacher.requires_grad_(False)
    source = family.wrap(host) if host is not None else None
    nets = build_dmd_networks(teacher, layout, LoraSettings(rank=4), source=source)
    del host, source
    # No full-size network exists anywhere before sharding: all on the meta device.
    for role in ("student", "fake_score", "teacher"):
        net = getattr(nets, role)
        held = list(getattr(net, "module", net).parameters())
        assert held and all(p.is_meta for p in held), role
    disc = family.build_discriminator(nets.teacher)
    disc_init = {n: q.detach().clone() for n, q in disc.named_parameters()}
    prepared = prepare_networks(
        acc,
        nets,
        make_optimizer=lambda role, params: torch.optim.AdamW(params),
        make_scheduler=lambda role, opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        discriminator=disc,
    )
    for name in ("student", "fake_score", "discriminator"):
        net = getattr(prepared, name)
        params = list(net.parameters())
        assert params and all(isinstance(p, DTensor) for p in params), name
        held = {id(p) for g in prepared.optimizers[name].param_groups for p in g["params"]}
        assert held == {id(p) for p in params}, name  # the optimizer steps the shards
    base = nets.teacher.module if hasattr(nets.teacher, "adapter") else nets.teacher
    frozen = list(base.parameters())
    assert frozen and all(isinstance(p, DTensor) for p in frozen), "teacher"
    local = sum(p.to_local().numel() for p in frozen)
    assert local < sum(p.numel() for p in frozen)
    block = base.transformer._no_split_modules[0]
    blocks = [m for m in base.modules() if type(m).__name__.endswith(block)]
    assert blocks and all(isinstance(b, FSDPModule) for b in blocks), block  # per-block units
    # Every rank holds rank 0's weights and buffers (non-persistent rotary tables included).
    reference = family.wrap(
        unsharded_class(pipe.transformer).from_pretrained(path, subfolder="transformer")
    )
    expected = dict(reference.named_parameters())
    for name, p in base.named_parameters():
        if "lora_" not in name:  # peft keeps the wrapped weight as <module>.base_layer
            assert torch.equal(p.full_tensor(), expected[name.replace(".base_layer", "")]), name
    expected = dict(reference.named_buffers())
    for name, b in base.named_buffers():
        assert torch.equal(b, expected[name.replace(".base_layer", "")]), name
    # One discriminator initialisation, rank 0's (the ranks' random streams differ here).
    for name, q in prepared.discriminator.named_parameters():
        full = q.full_tensor()
        if acc.process_index == 0:
            assert torch.equal(full, disc_init[name]), name
    # fsdp_activation_checkpointing: every trained transformer's blocks run checkpointed,
    # adapter-aware, set before sharding (accelerate would skip an already sharded model).
    checkpointing = sys.argv[3] == "checkpointing"
    for name in ("student", "fake_score"):
        net = getattr(nets, name)
        model = getattr(net, "module", net).transformer
        assert model.gradient_checkpointing is checkpointing, name
        if checkpointing:
            assert model._gradient_checkpointing_func._fastgen_adapter_aware, name
    # fsdp_offload_params: every unit of every network keeps its shards on the host under
    # the offload policy (page-locking needs an accelerator: off on this CPU machine).
    offload = sys.argv[4] == "offload"
    for name in ("student", "fake_score", "teacher", "discriminator"):
        net = prepared.discriminator if name == "discriminator" else getattr(nets, name)
        units = [m for m in getattr(net, "module", net).modules() if isinstance(m, FSDPModule)]
        assert units, name
        for unit in units:
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:  # a unit that holds no parameters of its own
                continue
            policy = group.offload_policy
            assert isinstance(policy, CPUOffloadPolicy) is offload, (name, policy)
            if offload:
                assert policy.pin_memory is False, name
        for p in net.parameters():
            assert p.to_local().device.type == "cpu", name
    # A dynamo backend in the accelerate config: each transformer block compiled on its own
    # before sharding (FSDP's hooks outside the graphs), the model itself left uncompiled.
    compiled = sys.argv[5] == "compiled"
    for name in ("student", "fake_score", "teacher"):
        net = getattr(nets, name)
        model = getattr(net, "module", net)
        assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule), name
        blocks = list(model.transformer.transformer_blocks if hasattr(model.transformer,
                      "transformer_blocks") else model.transformer.blocks)
        for b in blocks:
            assert isinstance(b, FSDPModule), name
            assert (getattr(b, "_compiled_call_impl", None) is not None) is compiled, name
    print("OK", layout, local)
    acc.wait_for_everyone()  # no rank tears gloo down while its peer still uses it
    acc.end_training()
    # Everything is checked: skip interpreter finalization, where gloo's threads now and then
    # still release work objects and abort the process (SIGABRT after a clean run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


@pytest.mark.parametrize(
    "family,layout,config",
    [
        ("sd3", "full", {}),
        ("sd3", "student_lora", {"fsdp_activation_checkpointing": True}),
        ("sd3", "separate_lora", {"fsdp_offload_params": True}),
        ("sd3", "shared_lora", {"fsdp_activation_checkpointing": True}),
        ("wan", "shared_lora", {"top__dynamo_config": {"dynamo_backend": "AOT_EAGER"}}),
    ],
)
def test_every_network_is_sharded(setup, tmp_path, family, layout, config):
    _, model = setup
    if family == "wan":
        model = save_tiny_wan(tmp_path / "wan")
    script = tmp_path / "check.py"
    script.write_text(PREPARE_CHECK)
    checkpointing = "checkpointing" if config.get("fsdp_activation_checkpointing") else "none"
    offload = "offload" if config.get("fsdp_offload_params") else "none"
    compiled = "compiled" if "top__dynamo_config" in config else "none"
    accelerate = accelerate_config(tmp_path / "accelerate.yaml", **config)
    torchrun(script, layout, str(model), checkpointing, offload, compiled, config=accelerate)


@pytest.fixture(scope="module")
def plain_run(setup) -> Path:
    """A 2-rank fp32 run under the README's config, checkpointed at step 2."""
    root, model = setup
    plain = root / "plain"
    torchrun(
        HARNESS, *argv(root, model, plain, GLOBAL_BATCH // 2, *FP32, "--checkpointing_steps", "2")
    )
    return plain


def test_offloaded_parameters_train_and_resume_as_without(setup, plain_run, tmp_path):
    """fsdp_offload_params: true (shards, gradients and optimizer states on the host): the run,
    its checkpoint and a resume from it equal the run without offloading. On this CPU machine
    the copies to the compute device are no-ops, so both compute the same sums: equal within
    the fp32 bounds above (measured: bitwise)."""
    root, model = setup
    offload = accelerate_config(tmp_path / "offload.yaml", fsdp_offload_params=True)
    plain, offloaded, resumed = plain_run, root / "offloaded", root / "offloaded-resumed"
    extra = [*FP32, "--checkpointing_steps", "2"]
    torchrun(HARNESS, *argv(root, model, offloaded, GLOBAL_BATCH // 2, *extra), config=offload)
    assert_same_losses(plain, offloaded, LOSS_RTOL)
    assert_same_weights(plain, offloaded, WEIGHT_ATOL)
    shutil.copytree(offloaded / "checkpoint-2", resumed / "checkpoint-2")
    resume = [*extra, "--resume_from_checkpoint", "latest"]
    torchrun(HARNESS, *argv(root, model, resumed, GLOBAL_BATCH // 2, *resume), config=offload)
    assert logged_steps(resumed) == [3, 4]
    la, lr = losses(offloaded), losses(resumed)
    for step in (3, 4):
        for key in la[step]:
            np.testing.assert_allclose(lr[step][key], la[step][key], rtol=LOSS_RTOL, atol=1e-7)
    assert_same_weights(plain, resumed, WEIGHT_ATOL)


def test_compiled_blocks_train_under_fsdp2(setup, plain_run, tmp_path):
    """A dynamo backend in the accelerate config compiles each transformer block before
    sharding; the run traces graphs, trains and equals the uncompiled run (aot_eager: the same
    kernels, so the fp32 bounds above hold; measured bitwise; inductor, as ``--compile_blocks``
    uses, takes minutes to compile on CPU)."""
    root, model = setup
    config = accelerate_config(
        tmp_path / "dynamo.yaml", top__dynamo_config={"dynamo_backend": "AOT_EAGER"}
    )
    compiled = root / "compiled"
    extra = [*FP32, "--checkpointing_steps", "2"]
    output = torchrun(
        HARNESS,
        *argv(root, model, compiled, GLOBAL_BATCH // 2, *extra),
        config=config,
        env={"TORCH_LOGS": "graph_code"},  # prints each graph dynamo traces
    )
    assert "__compiled_fn" in output, output[-3000:]
    assert_same_losses(plain_run, compiled, LOSS_RTOL)
    assert_same_weights(plain_run, compiled, WEIGHT_ATOL)  # and no _orig_mod. in the names


# Divisible by 1, 2 and 3 ranks.
RESHARD_BATCH = 6


def max_differences(a: Path, b: Path, steps: list[int]) -> tuple[float, float]:
    """Largest relative loss difference over ``steps`` and largest exported-weight difference."""
    la, lb = losses(a), losses(b)
    loss = max(abs(lb[s][k] - la[s][k]) / max(abs(la[s][k]), 1e-7) for s in steps for k in la[s])
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys() and wa
    return loss, max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_resume_on_another_rank_count_equals_the_straight_run_there(setup):
    """A checkpoint of a 2-rank FSDP2 run resumes on 1 process and on 3 ranks, one of a
    1-process run on 2 ranks; each equals the straight run at the new count (the global batch
    fixed: --train_batch_size is per device). The EMA is kept per shard under FSDP2 and whole in
    one process."""
    root, model = setup
    base = root / "reshard"
    extra = [*FP32, "--checkpointing_steps", "2"]

    def run(out: Path, nproc: int, *more: str) -> None:
        args = argv(root, model, out, RESHARD_BATCH // nproc, *extra, *more)
        if nproc == 1:
            train(parse_args(args))
        else:
            torchrun(HARNESS, *args, nproc=nproc)

    straight = {n: base / f"straight-{n}" for n in (1, 2, 3)}
    for n, out in straight.items():
        run(out, n)
    measured = {}
    for source, target in ((2, 1), (1, 2), (2, 3)):
        out = base / f"resumed-{source}-to-{target}"
        shutil.copytree(straight[source] / "checkpoint-2", out / "checkpoint-2")
        run(out, target, "--resume_from_checkpoint", "latest")
        assert logged_steps(out) == [3, 4]
        loss, weight = measured[(source, target)] = max_differences(straight[target], out, [3, 4])
        # fp32 sums in another order on another rank count (see LOSS_RTOL / WEIGHT_ATOL)
        assert loss <= LOSS_RTOL and weight <= WEIGHT_ATOL, (source, target, loss, weight)
    print("resume across rank counts, max |diff| vs the straight run (loss rel, weight abs):")
    for (source, target), (loss, weight) in measured.items():
        print(f"  {source} -> {target}: {loss:.2e} {weight:.2e}")
    # A changed per-device batch that changes the global batch is refused, naming the fix.
    wrong = base / "wrong-batch"
    shutil.copytree(straight[2] / "checkpoint-2", wrong / "checkpoint-2")
    args = argv(
        root, model, wrong, RESHARD_BATCH // 2, *extra, "--resume_from_checkpoint", "latest"
    )
    with pytest.raises(ValueError, match="(?s)global_batch: 6 -> 3.*--train_batch_size 6 on 1"):
        train(parse_args(args))


@pytest.mark.parametrize(
    "change,key",
    [
        ({"fsdp_reshard_after_forward": False}, "fsdp_reshard_after_forward"),
        ({"fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy"),
    ],
)
def test_unsupported_accelerate_option_is_refused(setup, tmp_path, change, key):
    root, model = setup
    config = accelerate_config(tmp_path / "accelerate.yaml", **change)
    out = tmp_path / "out"
    output = torchrun(
        HARNESS, *argv(root, model, out, 1), config=config, expect_success=False, timeout=300
    )
    assert f"accelerate config fsdp_config.{key}" in output, output[-3000:]
    assert not (out / "checkpoint-1").exists()


def test_fp16_is_refused_at_start(setup, tmp_path):
    root, model = setup
    with pytest.raises(ValueError, match="mixed_precision.*fp16.*bf16"):
        train(parse_args(argv(root, model, tmp_path / "out", 1, "--mixed_precision", "fp16")))


# Two experts: the same fp32 reordering as above, over twice the trained weights, each rank's
# sample on its own expert. Measured over 4 steps: exported weights 1.1e-5 apart, losses up to
# 1.04e-4 relative (the shared_lora fake-score loss at step 4). Bounds 5e-5 and 5e-4: an expert
# gathered with the other expert's shards (ranks routing their rows to different experts
# without running both) moved the weights by 2e-3 and the first losses by 3%.
A14B_WEIGHT_ATOL = 5e-5
A14B_LOSS_RTOL = 5e-4


@pytest.mark.parametrize(
    "layout",
    [
        [],
        ["--use_lora", "--lora_layout", "shared_lora", "--rank", "4"],
        ["--use_lora", "--lora_layout", "shared_lora", "--rank", "4", "gan"],
        ["--use_lora", "--lora_layout", "shared_lora", "--rank", "4", "i2v"],
    ],
    ids=["full", "shared_lora", "shared_lora_gan", "i2v_shared_lora"],
)
def test_two_expert_wan_on_two_ranks_equals_one_process(tmp_path, layout):
    """Wan 2.2 A14B (two experts, each sharded): 2 ranks with one sample each (their rows often
    belong to different experts) equal one process over both samples; with the GAN branch each
    rank's features and logits come from its rows' expert (the other expert's one-row run
    dropped). Image-to-video (I2V-A14B): each rank encodes its share of the rows' image
    conditions into the cache, and every network takes its rows' condition."""
    i2v = layout[-1:] == ["i2v"]
    recipe = "general/distillation/dmd2_wan22_a14b_" + ("i2v" if i2v else "t2v")
    model = save_tiny_wan(
        tmp_path / "a14b", boundary_ratio=0.9 if i2v else 0.875, image_to_video=i2v
    )
    prompts = tmp_path / "prompts.jsonl"
    size = CALL_KWARGS["wan"]
    overrides = ["student_update_freq=2", "ema.decay=0.9"]
    rows = [{"text": p} for p in PROMPTS[:4]]
    if i2v:
        import numpy as np
        import PIL.Image

        layout = [*layout[:-1], "--image_column", "image"]
        rng = np.random.default_rng(1)
        for i, row in enumerate(rows):
            pixels = (rng.random((size["height"], size["width"], 3)) * 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(tmp_path / f"frame{i}.png")
            row["image"] = f"frame{i}.png"
    if "gan" in layout:
        import numpy as np
        from diffusers.utils import export_to_video

        layout = [*layout[:-1], "--video_column", "video"]
        overrides += ["gan_loss_weight_gen=0.03", "backward_simulation=false"]
        rng = np.random.default_rng(0)
        for i, row in enumerate(rows):
            shape = (size["height"], size["width"], 3)
            frames = [rng.random(shape).astype(np.float32) for _ in range(size["num_frames"])]
            export_to_video(frames, str(tmp_path / f"clip{i}.mp4"), fps=16)
            row["video"] = f"clip{i}.mp4"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def args(out: Path, batch: int) -> list[str]:
        return [
            "--pretrained_model_name_or_path",
            str(model),
            "--recipe",
            recipe,
            "--recipe_overrides",
            *overrides,
            "--guidance_scale_2",
            "3.0",
            "--dataset_name",
            str(prompts),
            "--output_dir",
            str(out),
            "--height",
            str(size["height"]),
            "--width",
            str(size["width"]),
            "--num_frames",
            str(size["num_frames"]),
            "--max_sequence_length",
            "8",
            "--train_batch_size",
            str(batch),
            "--max_train_steps",
            str(STEPS),
            "--learning_rate",
            "1e-3",
            "--report_to",
            "none",
            "--seed",
            "7",
            *FP32,
            *layout,
        ]

    one, two = tmp_path / "one", tmp_path / "two"
    train(parse_args(args(one, 2)))
    torchrun(HARNESS, *args(two, 1))
    assert_same_losses(one, two, A14B_LOSS_RTOL)
    files = (
        ["transformer", "transformer_2"]
        if not layout
        else [
            "pytorch_lora_weights.safetensors",
            "pytorch_lora_weights_transformer_2.safetensors",
        ]
    )
    for name in files:
        paths = sorted((one / name).glob("*.safetensors")) if not layout else [one / name]
        for path in paths:
            wa, wb = load_file(path), load_file(two / path.relative_to(one))
            assert wa.keys() == wb.keys() and wa
            for key in wa:
                torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=A14B_WEIGHT_ATOL)
