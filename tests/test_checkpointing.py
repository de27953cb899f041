"""Training checkpoints: only what trains is saved (no frozen base), nothing is unpickled on
resume, a kill at any point of a save or a rotation never leaves a complete-looking checkpoint
with files missing, SIGTERM saves and ends the run cleanly and the resumed run equals the
straight one bit for bit, and ``run.json`` records the run (without the token) and guards resume.
The rank-count cases are in ``tests/test_fsdp2.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import CALL_KWARGS, save_tiny_sd3

from fastgen_diffusers.training import parse_args, train
from fastgen_diffusers.training.run_record import ResumeMismatchError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
RECIPE = """\
guidance_scale: 2.0
student_update_freq: 2
sample_t_cfg:
  time_dist_type: logitnormal
ema:
  decay: 0.9
"""
STEPS = 4
LORA = ["--use_lora", "--rank", "4", "--lora_layout"]
LAYOUTS = {
    "full": [],
    "student_lora": [*LORA, "student_lora"],
    "separate_lora": [*LORA, "separate_lora"],
    "shared_lora": [*LORA, "shared_lora"],
}
SECRET = "hf_secret_token_value_123"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = save_tiny_sd3(root / "model")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    return root, model


def argv(root: Path, model: Path, out: Path, *extra: str, recipe: str = "recipe.yaml") -> list:
    size = CALL_KWARGS["sd3"]
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--recipe",
        str(root / recipe),
        "--dataset_name",
        str(root / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--height",
        str(size["height"]),
        "--width",
        str(size["width"]),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "7",
        *extra,
    ]


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # The tree under test first: an installed fastgen_diffusers elsewhere must not shadow it.
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def logged_steps(out: Path) -> list[int]:
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def exported(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("transformer/*.safetensors")) or [
        out / "pytorch_lora_weights.safetensors"
    ]
    return {k: v for f in files for k, v in load_file(f).items()}


def assert_identical_runs(a: Path, b: Path) -> None:
    """Same losses (every row, float for float, each iteration once) and the same exported
    student, bit for bit."""
    assert logged_steps(b) == list(range(1, STEPS + 1))
    assert (a / "logs" / "losses.jsonl").read_text() == (b / "logs" / "losses.jsonl").read_text()
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def checkpoint_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def state_keys(path: Path) -> dict[str, int]:
    """Every tensor in a checkpoint's state files with its size in bytes."""
    out = {}
    for f in sorted((path / "state").glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


@pytest.fixture(scope="module")
def straight(tiny):
    """The full layout, 4 iterations, a checkpoint every 2."""
    root, model = tiny
    out = root / "straight"
    train(parse_args(argv(root, model, out, "--checkpointing_steps", "2")))
    return out


def _trainable_bytes(model: Path, layout: str) -> dict[str, int]:
    """Bytes of one fp32 copy of what each role trains, counted on the networks themselves."""
    from diffusers import SD3Transformer2DModel

    from fastgen_diffusers.lora import LoraSettings, build_dmd_networks
    from fastgen_diffusers.plugins.sd3 import SD3Wrapper

    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    nets = build_dmd_networks(SD3Wrapper(transformer), layout, LoraSettings(rank=4))
    return {
        role: 4 * sum(p.numel() for p in net.parameters() if p.requires_grad)
        for role, net in (("student", nets.student), ("fake_score", nets.fake_score))
    }


def test_checkpoints_hold_only_what_trains(tiny, straight):
    """Per layout: the adapters (or the full student / fake score), their Adam moments and the
    EMA, never a frozen base; the folder is within 1.1x of that trainable state."""
    root, model = tiny
    for layout, flags in LAYOUTS.items():
        out = straight if layout == "full" else root / f"layout-{layout}"
        if layout != "full":
            train(parse_args(argv(root, model, out, "--max_train_steps", "2", *flags)))
        ckpt = out / "checkpoint-2"
        keys = state_keys(ckpt)
        roles = {k.split("/")[0] for k in keys}
        assert roles == {"student", "fake_score", "student.optim", "fake_score.optim", "ema"}
        for role in ("student", "fake_score"):
            lora = layout == "shared_lora" or (layout, role) in {
                ("student_lora", "student"),
                ("separate_lora", "student"),
                ("separate_lora", "fake_score"),
            }
            names = [k for k in keys if k.startswith(f"{role}/")]
            assert names and all(("lora_" in k) == lora for k in names), (layout, role)
        trainable = _trainable_bytes(model, layout)
        for role, size in trainable.items():
            assert sum(v for k, v in keys.items() if k.startswith(f"{role}/")) == size
        # weights + two Adam moments per trained role, and the student's EMA
        expected = 3 * sum(trainable.values()) + trainable["student"]
        payload = sum(keys.values())
        assert expected <= payload <= 1.1 * expected, (layout, payload, expected)
        # Headers and JSON add a fixed amount per tensor (large next to these tiny tensors,
        # small on real ones: benchmarks/checkpoint_bytes.py); no other tensor hides in them.
        total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        assert total <= payload + 700 * len(keys) + 40_000, (layout, total, payload, len(keys))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(tiny, straight, tmp_path):
    """Pickles where accelerate, torch or DCP would look (and in place of the state file)
    are never opened by an unpickler: resume reads safetensors and JSON only."""
    root, model = tiny
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.py"
    payload.write_text(
        "import pickle, pathlib\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path({str(marker)!r}).touch, ())\n"
        "import sys\n"
        "sys.stdout.buffer.write(pickle.dumps(Evil()))\n"
    )
    blob = subprocess.run([sys.executable, str(payload)], capture_output=True, check=True).stdout
    out = tmp_path / "out"
    ckpt = out / "checkpoint-2"
    shutil.copytree(straight / "checkpoint-2", ckpt)
    shutil.copytree(straight / "logs", out / "logs")  # rows 3-4 are cut and written again
    for name in (
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
        "random_states_0.pkl",
        "ema_rank0.pt",
        "ema.pt",
        "optimizer.bin",
        "pytorch_model.bin",
        "scheduler.bin",
        "state/.metadata",
        "state/__0_0.distcp",
    ):
        (ckpt / name).write_bytes(blob)
    train(parse_args(argv(root, model, out, "--resume_from_checkpoint", "latest")))
    assert not marker.exists()
    assert_identical_runs(straight, out)  # the planted files changed nothing
    # A pickle in place of the state file is refused as malformed, never run.
    next((ckpt / "state").glob("*.safetensors")).write_bytes(blob)
    with pytest.raises(ValueError, match="(cannot be read|is damaged).*header"):
        train(parse_args(argv(root, model, out, "--resume_from_checkpoint", str(ckpt))))
    assert not marker.exists()


SIGNAL_SCRIPT = """
import os, signal, sys
import fastgen_diffusers.training.loop as loop
from fastgen_diffusers.training import parse_args, train

AT, COUNT = 2, int(os.environ["SIGNALS"])
real = loop.train_step

def train_step(run, teacher, data, trainer, progress):
    logs = real(run, teacher, data, trainer, progress)
    if progress.step == AT:  # mid-run, as SLURM / Kubernetes would
        for _ in range(COUNT):
            os.kill(os.getpid(), signal.SIGTERM)
    return logs

loop.train_step = train_step
train(parse_args(sys.argv[1:]))
"""


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_identical(tiny, straight, tmp_path):
    root, model = tiny
    out = tmp_path / "out"
    args = argv(root, model, out, "--checkpointing_steps", "100")
    os.environ["SIGNALS"] = "1"
    try:
        result = run_script(SIGNAL_SCRIPT, *args)
    finally:
        del os.environ["SIGNALS"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "saved checkpoint-2; resume with --resume_from_checkpoint latest" in result.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "transformer").exists()  # stopped before the export
    assert logged_steps(out) == [1, 2]
    train(parse_args([*args, "--resume_from_checkpoint", "latest"]))
    assert_identical_runs(straight, out)

    # A second signal ends the process at once (the default action), saving nothing.
    os.environ["SIGNALS"] = "2"
    try:
        killed = run_script(SIGNAL_SCRIPT, *argv(root, model, tmp_path / "twice"))
    finally:
        del os.environ["SIGNALS"]
    assert killed.returncode == -signal.SIGTERM
    assert not list((tmp_path / "twice").glob("checkpoint-*"))


KILL_SCRIPT = """
import os, shutil, signal, sys
from pathlib import Path
import fastgen_diffusers.io as io
import fastgen_diffusers.training.checkpointing as checkpointing
from fastgen_diffusers.training import parse_args, train

where = os.environ["KILL_AT"]
real_rmtree, real_commit = shutil.rmtree, checkpointing.commit_directory

def rmtree(path, *args, **kwargs):
    path = Path(path)
    if where == "rotation" and "checkpoint-" in path.name and path.name.startswith(".tmp-old-"):
        # half deleted, then killed
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)

def commit_directory(tmp, final, **kwargs):
    if where == "save" and Path(final).name == "checkpoint-3":
        os.kill(os.getpid(), signal.SIGKILL)  # written and marked, not yet renamed
    return real_commit(tmp, final, **kwargs)

io.shutil.rmtree = rmtree
checkpointing.commit_directory = commit_directory
train(parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["rotation", "save"])
def test_a_kill_during_save_or_rotation_leaves_only_complete_checkpoints(
    tiny, straight, tmp_path, where
):
    root, model = tiny
    out = tmp_path / "out"
    args = argv(root, model, out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    os.environ["KILL_AT"] = where
    try:
        result = run_script(KILL_SCRIPT, *args)
    finally:
        del os.environ["KILL_AT"]
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    reference = checkpoint_files(straight / "checkpoint-2")
    visible = sorted(p.name for p in out.glob("checkpoint-*"))
    assert visible == ["checkpoint-2"]  # rotation: checkpoint-1 half deleted; save: 3 unrenamed
    for name in visible:  # every checkpoint that says COMPLETE has all its files
        assert checkpoint_files(out / name) == reference
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers, "the interrupted folder stays out of the visible names"
    # The next start removes what the killed run left and resumes from the complete one.
    train(parse_args([*args, "--resume_from_checkpoint", "latest"]))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert_identical_runs(straight, out)


def test_run_json_records_the_run_and_guards_resume(tiny, straight, tmp_path):
    root, model = tiny
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(straight / "logs", out / "logs")
    record = json.loads((out / "checkpoint-2" / "run.json").read_text())
    assert record["layout"] == "full" and record["family"] == "sd3"
    assert record["recipe"]["guidance_scale"] == 2.0 and record["global_batch"] == 2
    assert record["world_size"] == 1 and record["model"] == str(model)
    assert set(record["versions"]) == {"torch", "diffusers", "accelerate", "peft"} | {
        "fastgen_diffusers"
    }
    assert record["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert "hub_token" not in record["arguments"]
    # A changed recipe is refused, naming the change ...
    (root / "recipe5.yaml").write_text(RECIPE.replace("guidance_scale: 2.0", "guidance_scale: 5.0"))
    args = argv(
        root,
        model,
        out,
        "--resume_from_checkpoint",
        "latest",
        "--hub_token",
        SECRET,
        recipe="recipe5.yaml",
    )
    with pytest.raises(ResumeMismatchError, match=r"recipe\.guidance_scale: 2\.0 -> 5\.0"):
        train(parse_args(args))
    # ... and allowed with --allow_resume_changes.
    train(parse_args([*args, "--allow_resume_changes"]))
    assert logged_steps(out) == [1, 2, 3, 4]
    now = json.loads((out / "run.json").read_text())
    assert now["recipe"]["guidance_scale"] == 5.0
    for path in out.rglob("*"):  # the token is in no file the run wrote
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
