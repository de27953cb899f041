"""Model card and Hub upload of an exported student.

The upload runs against a stand-in Hub on 127.0.0.1 that speaks the part of the Hub HTTP API
``huggingface_hub`` uses for ``create_repo`` and ``upload_folder``: repo creation, README metadata
validation, ``preupload`` (every file answered "regular", so contents travel base64 inside the
NDJSON commit payload) and ``commit``. It keeps committed files in memory.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from hub_server import TOKEN, StandInHub
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from fastgen_diffusers.config import DMDConfig
from fastgen_diffusers.plugins import flux, sd3, wan
from fastgen_diffusers.training.hub import (
    HubUploadError,
    IncompleteOutputError,
    push_to_hub,
)
from fastgen_diffusers.training.model_card import write_model_card

pytestmark = pytest.mark.usefixtures("single_thread")

T_LIST = [0.999, 0.833, 0.0]


@pytest.fixture
def hub():
    with StandInHub() as server:
        yield server


# -- exported folders -----------------------------------------------------------------------------


def recipe() -> DMDConfig:
    return DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": T_LIST}, guidance_scale=4.0)


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def export_sd3(out: Path, **card: Any) -> Path:
    """A full SD3 student as the export step writes it, plus a model card."""
    tiny_sd3().save_pretrained(out / "transformer")
    write_json(out / "scheduler" / "scheduler_config.json", sd3.student_scheduler_config(T_LIST))
    write_model_card(
        out,
        base_model="stabilityai/stable-diffusion-3.5-medium",
        family="sd3",
        recipe_name="general/distillation/dmd2_sd35_medium",
        recipe=recipe(),
        t_list=T_LIST,
        sample_type="ode",
        lora=False,
        pipeline_class_name="StableDiffusion3Pipeline",
        **card,
    )
    return out


def export_flux_lora(out: Path, **card: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(
                4, 16, generator=g
            ),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(
                16, 4, generator=g
            ),
        },
        str(out / "pytorch_lora_weights.safetensors"),
    )
    write_json(out / "scheduler" / "scheduler_config.json", flux.student_scheduler_config(T_LIST))
    write_model_card(
        out,
        base_model="black-forest-labs/FLUX.1-dev",
        family="flux",
        recipe_name="general/distillation/dmd2_flux1_dev",
        recipe=recipe(),
        t_list=T_LIST,
        sample_type="ode",
        lora=True,
        pipeline_class_name="FluxPipeline",
        **card,
    )
    return out


def export_wan(out: Path, **card: Any) -> Path:
    tiny_wan().save_pretrained(out / "transformer")
    write_json(out / "scheduler" / "scheduler_config.json", wan.student_scheduler_config(T_LIST))
    write_model_card(
        out,
        base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        family="wan",
        recipe_name="general/distillation/dmd2_wan21_t2v_1_3b",
        recipe=recipe(),
        t_list=T_LIST,
        sample_type="ode",
        lora=False,
        pipeline_class_name="WanPipeline",
        **card,
    )
    return out


def add_training_state(out: Path) -> None:
    """What a training run leaves next to the export and must stay local."""
    for rel in (
        "checkpoint-500/model.safetensors",
        "checkpoint-500/optimizer.bin",
        "checkpoints/checkpoint-1000/random_states_0.pkl",
        "logs/dmd2/events.out.tfevents.1",
        ".tmp-transformer-abc/config.json",
        "transformer/.tmp-partial.safetensors",
        "scheduler/scheduler_config.json.tmp123",
    ):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"training state " + rel.encode())


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def tree_digest(root: Path) -> str:
    """Hash of every path, its bytes and its mode: any change to the folder changes it."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(oct(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# -- push_to_hub ----------------------------------------------------------------------------------


def test_push_uploads_the_export_and_leaves_training_state_local(hub, tmp_path):
    out = export_sd3(tmp_path / "out", repo_id="team/sd35m-dmd2")
    (out / "validation").mkdir()
    (out / "validation" / "student-0.png").write_bytes(bytes(range(256)) * 8)
    add_training_state(out)
    before = tree_digest(out)

    url = push_to_hub(out, "team/sd35m-dmd2", token=TOKEN, private=True, endpoint=hub.url)

    repo = hub.repos["team/sd35m-dmd2"]
    assert repo["private"] is True
    assert len(repo["commits"]) == 1
    assert url == f"{hub.url}/team/sd35m-dmd2/commit/{repo['commits'][0]['oid']}"
    weights = "transformer/diffusion_pytorch_model.safetensors"
    expected = {
        "README.md",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        weights,
        "validation/student-0.png",
    }
    assert set(repo["files"]) == expected
    local = local_files(out)
    assert all(repo["files"][name] == local[name] for name in expected)
    assert tree_digest(out) == before
    assert hub.unexpected == []
    assert hub.requests and all(
        h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests
    )


def test_push_lora_student_public_and_again_to_the_same_repo(hub, tmp_path):
    out = export_flux_lora(tmp_path / "out", repo_id="team/flux-dmd2-lora")
    # Leaves transformer/.tmp-partial.safetensors: ignored, so no half transformer/ is required.
    add_training_state(out)
    first = push_to_hub(out, "team/flux-dmd2-lora", token=TOKEN, endpoint=hub.url)
    repo = hub.repos["team/flux-dmd2-lora"]
    assert repo["private"] is False
    assert set(repo["files"]) == {
        "README.md",
        "pytorch_lora_weights.safetensors",
        "scheduler/scheduler_config.json",
    }
    assert (
        repo["files"]["pytorch_lora_weights.safetensors"]
        == (out / "pytorch_lora_weights.safetensors").read_bytes()
    )

    # A second push (the repo exists: create answers 409) commits the new card on top.
    (out / "README.md").write_text((out / "README.md").read_text() + "\nRetrained.\n")
    second = push_to_hub(out, "team/flux-dmd2-lora", token=TOKEN, endpoint=hub.url)
    assert second != first and len(repo["commits"]) == 2
    assert repo["files"]["README.md"].endswith(b"Retrained.\n")
    assert hub.unexpected == []


def test_endpoint_defaults_to_huggingface_hub_setting(hub, tmp_path, monkeypatch):
    # HF_ENDPOINT is read into huggingface_hub.constants.ENDPOINT at import.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    out = export_flux_lora(tmp_path / "out")
    url = push_to_hub(out, "team/default-endpoint", token=TOKEN, commit_message="first student")
    assert url.startswith(f"{hub.url}/team/default-endpoint/commit/")
    assert hub.repos["team/default-endpoint"]["commits"][0]["summary"] == "first student"


def test_commit_failure_raises_hub_upload_error_and_keeps_local_files(hub, tmp_path):
    out = export_flux_lora(tmp_path / "out")
    add_training_state(out)
    before = tree_digest(out)
    hub.fail["commit"] = 500

    with pytest.raises(HubUploadError) as info:
        push_to_hub(out, "team/broken", token=TOKEN, endpoint=hub.url)

    err = info.value
    message = str(err)
    assert "'team/broken'" in message and hub.url in message
    assert "500" in message and "uploading the folder" in message
    assert f"local files at {str(out)!r} are intact" in message
    assert isinstance(err.__cause__, HfHubHTTPError)
    assert (err.repo_id, err.endpoint, err.output_dir) == ("team/broken", hub.url, out)
    assert hub.commit_attempts >= 1
    assert hub.repos["team/broken"]["files"] == {}
    assert tree_digest(out) == before


def test_unreachable_hub_raises_hub_upload_error(tmp_path):
    out = export_flux_lora(tmp_path / "out")
    before = tree_digest(out)
    with StandInHub() as closed:  # a port that was just listening, now closed
        url = closed.url
    with pytest.raises(HubUploadError, match="creating the repo") as info:
        push_to_hub(out, "team/offline", token=TOKEN, endpoint=url)
    assert url in str(info.value) and "intact" in str(info.value)
    assert tree_digest(out) == before


def _without(path: str):
    def edit(out: Path) -> None:
        (out / path).unlink()

    return edit


def _without_transformer(out: Path) -> None:
    shutil.rmtree(out / "transformer")


def _sharded(out: Path) -> None:
    # A sharded save whose second shard never landed.
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (out / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        out / "transformer" / "model-00001-of-00002.safetensors"
    )
    write_json(out / "transformer" / "diffusion_pytorch_model.safetensors.index.json", index)


@pytest.mark.parametrize(
    "edit, missing",
    [
        (_without("README.md"), "README.md"),
        (_without("scheduler/scheduler_config.json"), "scheduler/scheduler_config.json"),
        (_without("transformer/config.json"), "transformer/config.json"),
        (
            _without("transformer/diffusion_pytorch_model.safetensors"),
            "transformer/*.safetensors",
        ),
        (_sharded, "transformer/model-00002-of-00002.safetensors"),
        (_without_transformer, "transformer/ or pytorch_lora_weights.safetensors"),
    ],
    ids=["no-card", "no-scheduler", "no-config", "no-weights", "missing-shard", "no-student"],
)
def test_incomplete_export_is_refused_before_any_request(hub, tmp_path, edit, missing):
    out = export_sd3(tmp_path / "out")
    edit(out)
    with pytest.raises(IncompleteOutputError, match=re.escape(missing)) as info:
        push_to_hub(out, "team/incomplete", token=TOKEN, endpoint=hub.url)
    assert "nothing was uploaded" in str(info.value)
    assert hub.requests == []


def test_missing_output_dir_is_refused(hub, tmp_path):
    with pytest.raises(IncompleteOutputError, match="is not a directory"):
        push_to_hub(tmp_path / "nope", "team/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


# -- model card -----------------------------------------------------------------------------------


def snippet_of(readme: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


class Recorder:
    """Stands in for a diffusers pipeline class: records how the snippet builds and calls it."""

    calls: list[tuple[str, tuple, dict]]

    def __init__(self) -> None:
        self.calls = []

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Recorder:
        self.calls.append(("from_pretrained", args, kwargs))
        return self

    def load_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("load_lora_weights", args, kwargs))

    def to(self, *args: Any) -> Recorder:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("__call__", args, kwargs))
        sample = type("Sample", (), {"save": lambda self, path: None})()
        return type("Output", (), {"images": [sample], "frames": [sample]})()


def run_snippet(code: str, pipeline_class: str) -> tuple[Recorder, dict[str, Any]]:
    """Execute the snippet with the real scheduler / transformer classes and a recording
    pipeline (the base model is not available offline). Imports are checked, then replaced."""
    tree = ast.parse(code)
    imported = {
        alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    recorder = Recorder()
    namespace: dict[str, Any] = {
        "torch": torch,
        "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        "WanTransformer3DModel": WanTransformer3DModel,
        pipeline_class: recorder,
        "export_to_video": lambda *a, **k: None,
    }
    import diffusers

    assert imported <= set(dir(diffusers)) | {"export_to_video"}
    tree.body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    exec(compile(tree, "<model card>", "exec"), namespace)
    return recorder, namespace


def test_card_front_matter_and_gallery(tmp_path):
    out = tmp_path / "out"
    (out / "validation").mkdir(parents=True)
    (out / "validation" / "student-0.png").write_bytes(b"png")
    export_sd3(
        out,
        repo_id="team/sd35m-dmd2",
        validation_images=[("validation/student-0.png", "a red fox"), "validation/student-0.png"],
        extra={"max_train_steps": 2000},
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium"
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image"
    # diffusers-training and the family's task as in the diffusers training scripts.
    assert card.data.tags == [
        "diffusers",
        "diffusers-training",
        "dmd2",
        "distillation",
        "few-step",
        "sd3",
        "text-to-image",
    ]
    assert card.data.widget == [
        {"text": "a red fox", "output": {"url": "validation/student-0.png"}},
        {"text": " ", "output": {"url": "validation/student-0.png"}},
    ]
    text = card.text
    assert "2-step DMD2 student of [stabilityai/stable-diffusion-3.5-medium]" in text
    assert "`general/distillation/dmd2_sd35_medium` recipe" in text
    assert "| student timesteps (`t_list`) | [0.999, 0.833, 0] |" in text
    assert "| teacher CFG scale | 4 |" in text and "| max_train_steps | 2000 |" in text
    assert "<Gallery />" in text
    # No temp file left behind.
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "scheduler",
        "transformer",
        "validation",
    ]


def test_sd3_full_student_snippet_loads_the_export(tmp_path):
    out = export_sd3(tmp_path / "out")  # repo_id=None: the snippet points at the local folder
    code = snippet_of(out / "README.md")
    recorder, ns = run_snippet(code, "StableDiffusion3Pipeline")

    assert ns["student"] == str(out.resolve())
    assert ns["base_model"] == "stabilityai/stable-diffusion-3.5-medium"
    transformer, scheduler = ns["transformer"], ns["scheduler"]
    assert isinstance(transformer, SD3Transformer2DModel)
    assert transformer.dtype == torch.bfloat16
    saved = tiny_sd3().state_dict()
    assert all(
        torch.equal(v.to(torch.bfloat16), saved[k].to(torch.bfloat16))
        for k, v in transformer.state_dict().items()
    )
    (name, args, kwargs), *_ = recorder.calls
    assert name == "from_pretrained" and args == ("stabilityai/stable-diffusion-3.5-medium",)
    assert kwargs["transformer"] is transformer and kwargs["scheduler"] is scheduler
    call = recorder.calls[-1]
    assert call[0] == "__call__"
    assert call[2] == sd3.stock_pipeline_kwargs(T_LIST)
    # The call arguments are written literally.
    for line in ("num_inference_steps=2,", "sigmas=[0.999, 0.833],", "guidance_scale=1.0,"):
        assert f"    {line}\n" in code
    # The shipped scheduler, called as the pipeline calls it, visits the student's rungs.
    scheduler.set_timesteps(num_inference_steps=2, sigmas=call[2]["sigmas"])
    assert scheduler.sigmas.tolist() == pytest.approx(T_LIST, abs=1e-6)


def test_flux_lora_snippet_loads_the_adapter(tmp_path):
    out = export_flux_lora(tmp_path / "out", repo_id="team/flux-dmd2-lora")
    code = snippet_of(out / "README.md")
    card = ModelCard.load(out / "README.md")
    assert {"lora", "template:sd-lora", "flux"} <= set(card.data.tags)
    # FLUX.1-dev's non-commercial licence is inherited, not left out.
    assert card.data.license == "other"
    assert card.data.license_name == "flux-1-dev-non-commercial-license"
    assert "FluxTransformer2DModel" not in code  # the base model's transformer is kept

    # Point the snippet at the local export to run it offline.
    recorder, ns = run_snippet(
        code.replace("'team/flux-dmd2-lora'", repr(str(out))), "FluxPipeline"
    )
    assert [c[0] for c in recorder.calls] == ["from_pretrained", "load_lora_weights", "__call__"]
    _, args, kwargs = recorder.calls[0]
    assert args == ("black-forest-labs/FLUX.1-dev",) and "transformer" not in kwargs
    assert kwargs["scheduler"] is ns["scheduler"]
    _, args, kwargs = recorder.calls[1]
    assert (out / kwargs["weight_name"]).is_file() and args == (str(out),)
    assert recorder.calls[2][2] == flux.stock_pipeline_kwargs(T_LIST)
    assert recorder.calls[2][2]["sigmas"] == [0.999, 0.833]
    ns["scheduler"].set_timesteps(2, sigmas=recorder.calls[2][2]["sigmas"], mu=1.0)
    assert ns["scheduler"].sigmas.tolist() == pytest.approx(T_LIST, abs=1e-6)


def test_wan_snippet_passes_no_sigmas(tmp_path):
    out = export_wan(tmp_path / "out", repo_id="team/wan-dmd2")
    readme = (out / "README.md").read_text()
    code = snippet_of(out / "README.md")
    assert "sigmas" not in code
    assert "Wan pipelines take no `sigmas`" in readme
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-to-video" and "text-to-video" in card.data.tags

    recorder, ns = run_snippet(code.replace("'team/wan-dmd2'", repr(str(out))), "WanPipeline")
    assert isinstance(ns["transformer"], WanTransformer3DModel)
    _, _, kwargs = recorder.calls[0]
    assert kwargs["transformer"] is ns["transformer"] and kwargs["scheduler"] is ns["scheduler"]
    assert recorder.calls[-1][2] == {"num_inference_steps": 2, "guidance_scale": 1.0}
    # WanPipeline calls set_timesteps(num_inference_steps) only: the config carries the schedule.
    ns["scheduler"].set_timesteps(2)
    assert ns["scheduler"].sigmas.tolist() == pytest.approx(T_LIST, abs=1e-6)


def test_card_rejects_mismatches(tmp_path):
    common = dict(
        base_model="a/b",
        recipe_name="r",
        recipe=recipe(),
        sample_type="ode",
        lora=False,
    )
    with pytest.raises(ValueError, match="family='sdxl'"):
        write_model_card(
            tmp_path, family="sdxl", t_list=T_LIST, pipeline_class_name="FluxPipeline", **common
        )
    with pytest.raises(ValueError, match="pipeline_class_name='FluxPipe'"):
        write_model_card(
            tmp_path, family="flux", t_list=T_LIST, pipeline_class_name="FluxPipe", **common
        )
    with pytest.raises(ValueError, match="student_sample_steps=2"):
        write_model_card(
            tmp_path,
            family="flux",
            t_list=[0.999, 0.0],
            pipeline_class_name="FluxPipeline",
            **common,
        )
    with pytest.raises(ValueError, match="outside output_dir"):
        write_model_card(
            tmp_path,
            family="flux",
            t_list=T_LIST,
            pipeline_class_name="FluxPipeline",
            validation_images=["../elsewhere.png"],
            **common,
        )
    assert not (tmp_path / "README.md").exists()
