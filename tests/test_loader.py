"""Recipe resolution: built-in names, filesystem paths, suffixes, and clear failures."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from fastgen_diffusers import DMDConfig, load_config, load_dmd_config
from fastgen_diffusers.loader import builtin_recipes

WAN = "general/distillation/dmd2_wan22_5b"


def test_builtin_wan22_recipe_has_the_documented_values():
    cfg = load_dmd_config(WAN)
    assert cfg.pred_type == "flow"
    assert cfg.guidance_scale == 5.0
    assert cfg.student_sample_steps == 2
    assert cfg.student_sample_type == "ode"
    assert cfg.student_update_freq == 5
    assert cfg.fake_score_pred_type == "x0"
    assert cfg.gan_loss_weight_gen == 0.03
    assert cfg.gan_use_same_t_noise is True
    assert cfg.sample_t_cfg.time_dist_type == "shifted"
    assert cfg.sample_t_cfg.shift == 5.0
    assert cfg.sample_t_cfg.t_list == [0.999, 0.833, 0.0]
    assert cfg.ema is not None
    assert (cfg.ema.type, cfg.ema.decay, cfg.ema.mode) == ("constant", 0.9999, "full_tensor")


def test_suffix_is_optional_and_from_yaml_matches():
    assert load_config(WAN) == load_config(WAN + ".yaml")
    assert DMDConfig.from_yaml(WAN) == load_dmd_config(WAN)
    assert WAN in builtin_recipes()


def test_filesystem_paths_with_and_without_suffix(tmp_path):
    (tmp_path / "mine.yml").write_text("guidance_scale: 3.0\nsample_t_cfg:\n  shift: 3.0\n")
    cfg = load_dmd_config(tmp_path / "mine")
    assert cfg.guidance_scale == 3.0 and cfg.sample_t_cfg.shift == 3.0
    assert load_dmd_config(str(tmp_path / "mine.yml")) == cfg


def test_empty_file_is_an_empty_mapping(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == {}
    assert load_dmd_config(tmp_path / "empty.yaml") == DMDConfig()


def test_non_mapping_is_a_clear_error(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping.*list"):
        load_config(tmp_path / "list.yaml")


def test_missing_recipe_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dmd_config("general/distillation/no_such_recipe")
    message = str(info.value)
    assert "no_such_recipe" in message
    assert "no_such_recipe.yaml" in message and "no_such_recipe.yml" in message
    assert WAN in message  # lists what exists


def test_unknown_key_in_recipe_is_a_validation_error(tmp_path):
    (tmp_path / "typo.yaml").write_text("guidance_scal: 5.0\n")
    with pytest.raises(ValidationError, match="guidance_scal"):
        load_dmd_config(tmp_path / "typo.yaml")


def test_recipes_ship_inside_the_wheel(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("fastgen_diffusers-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert f"fastgen_diffusers/recipes/{WAN}.yaml" in names
    # ... and resolve from an install of that wheel, away from the checkout.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import fastgen_diffusers as f; "
        f"assert f.__file__.startswith({str(target)!r}), f.__file__; "
        f"print(f.load_dmd_config({WAN!r}).student_sample_steps)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "2"
