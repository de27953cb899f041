"""Every family wrapper feeds the time projection exactly what the stock pipeline feeds it.

Three precision modes: fp32 weights (against the fp32 pipeline), bf16 weights (against the bf16
pipeline), and fp32 weights under bf16 autocast, which is how ``--mixed_precision bf16`` runs the
full student and the fake score; its stock equivalent is the bf16 pipeline (latents in bf16).

A forward pre-hook on every ``Timesteps`` module of the transformer records the values it gets
(Flux's time projection also embeds the guidance value). The stock pipeline runs the student's
schedule (``student_scheduler_config`` / ``stock_pipeline_kwargs``); the wrapper is then called at
the sigmas the pipeline visited. Values are compared exactly: any rounding difference is a
different time embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import Timesteps
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from tiny_pipelines import (
    CALL_KWARGS,
    TEXT_LENGTHS,
    save_tiny_flux,
    save_tiny_qwen_image,
    save_tiny_sd3,
    save_tiny_wan,
)

from fastgen_diffusers.plugins import family_from_pretrained
from fastgen_diffusers.plugins.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG
from fastgen_diffusers.plugins.wan import closest_reachable_t_list

pytestmark = pytest.mark.usefixtures("single_thread")

BF16 = torch.bfloat16
PROMPT = "a red cube"
# 0.74925 rounds differently through the pipelines' bf16 path (1000 t -> 748) than t itself
# (0.75); 0.3337 and 0.999 are further rungs where they differ for Flux or Qwen-Image.
T_LIST = [0.999, 0.74925, 0.5, 0.3337, 0.0]


def qwen_stock_sigmas(size: int = 1328, steps: int = 50) -> list[float]:
    """The sigmas of Qwen-Image's stock 50-step schedule at ``size`` x ``size`` pixels."""
    c = QWEN_IMAGE_SCHEDULER_CONFIG
    mu = calculate_shift(
        (size // 16) ** 2,
        c["base_image_seq_len"],
        c["max_image_seq_len"],
        c["base_shift"],
        c["max_shift"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(c)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return [float(s) for s in scheduler.sigmas[:-1]]


SAVERS = {
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
    "qwen_image": save_tiny_qwen_image,
    "wan": save_tiny_wan,
    "wan_expand": lambda path: save_tiny_wan(path, expand_timesteps=True),
}


class Recorder:
    """Records every input of the transformer's ``Timesteps`` modules, as float64."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.values: list[torch.Tensor] = []
        self.dtypes: set[torch.dtype] = set()
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in transformer.modules()
            if isinstance(m, Timesteps)
        ]
        assert self.handles, "no Timesteps module found"

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.dtypes.add(args[0].dtype)
        self.values.append(args[0].detach().double().flatten().clone())

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


class Case:
    """One family's tiny pipeline in fp32 and bf16, and the student's schedule."""

    def __init__(self, name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        path = SAVERS[name](tmp_path_factory.mktemp(name))
        self.family = family_from_pretrained(str(path))
        self.key = self.family.name
        self.pipes = {
            dtype: self.family.load_pipeline(str(path), torch_dtype=dtype)
            for dtype in (torch.float32, BF16)
        }
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        base = dict(self.pipes[torch.float32].scheduler.config)
        if self.key == "wan":
            self.t_list = closest_reachable_t_list(T_LIST, base)
        elif self.key == "qwen_image":
            self.t_list = sorted(set(qwen_stock_sigmas()) | set(T_LIST), reverse=True)
        else:
            self.t_list = list(T_LIST)
        self.scheduler_config = self.family.student_scheduler_config(self.t_list, base_config=base)

    def run_pipeline(self, dtype: torch.dtype) -> tuple[list[float], list[torch.Tensor]]:
        """The sigmas the stock pipeline visits and the time-projection inputs at each step."""
        pipe = self.pipes[dtype]
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kwargs = dict(self.family.stock_pipeline_kwargs(self.t_list))
        with Recorder(pipe.transformer) as rec, torch.no_grad():
            pipe(
                prompt=PROMPT,
                output_type="latent",
                max_sequence_length=TEXT_LENGTHS[self.key],
                generator=torch.Generator().manual_seed(0),
                **CALL_KWARGS[self.key],
                **kwargs,
            )
        sigmas = [float(s) for s in pipe.scheduler.sigmas[:-1]]
        return sigmas, rec.values

    def run_wrapper(self, weights: torch.dtype, autocast: bool, sigmas: list[float]) -> list:
        pipe = self.pipes[weights]
        wrapper = self.family.wrap(pipe.transformer)
        cond = self.family.encode_prompts(
            pipe, [PROMPT], max_sequence_length=TEXT_LENGTHS[self.key]
        )
        sizes = CALL_KWARGS[self.key]
        shape = self.family.latent_shape(
            pipe, sizes["height"], sizes["width"], sizes.get("num_frames")
        )
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        with (
            Recorder(pipe.transformer) as rec,
            torch.no_grad(),
            torch.autocast("cpu", dtype=BF16, enabled=autocast),
        ):
            for sigma in sigmas:
                # The training code holds t as a float32 tensor.
                wrapper(hidden_states=x, timestep=torch.tensor([sigma]), **cond)
        return rec.values


@pytest.fixture(scope="module", params=list(SAVERS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(request.param, tmp_path_factory)


def test_time_projection_gets_the_stock_pipelines_values_in_every_precision_mode(case: Case):
    sigmas32, stock32 = case.run_pipeline(torch.float32)
    sigmas16, stock16 = case.run_pipeline(BF16)
    assert sigmas32 == sigmas16
    assert len(sigmas32) == len(case.t_list) - 1
    # One time-projection call per step (two with Flux's embedded guidance).
    assert len(stock32) % len(sigmas32) == 0 and len(stock16) == len(stock32)
    modes = {
        "fp32 weights": (case.run_wrapper(torch.float32, False, sigmas32), stock32),
        "bf16 weights": (case.run_wrapper(BF16, False, sigmas32), stock16),
        "fp32 weights, bf16 autocast": (case.run_wrapper(torch.float32, True, sigmas32), stock16),
    }
    per_step = len(stock32) // len(sigmas32)
    for mode, (ours, stock) in modes.items():
        assert len(ours) == len(stock), mode
        for i, (a, b) in enumerate(zip(ours, stock)):
            assert torch.equal(a, b), (
                f"{case.key}, {mode}, sigma {sigmas32[i // per_step]}: wrapper fed "
                f"{a.unique().tolist()}, the stock pipeline {b.unique().tolist()}"
            )


def _naive_bf16(case: Case, sigma: float) -> float:
    """What the time projection got before the rounding fix (t cast to the compute dtype)."""
    t = torch.tensor([sigma]).to(BF16)
    return float(t * 1000 if case.key == "flux" else t)


def test_the_rungs_exercise_the_bf16_rounding(case: Case):
    """Guards the test above: for Flux and Qwen-Image some rungs reach the model differently
    through the pipeline's ``(1000 t).to(bf16) / 1000`` than through ``t`` cast to bf16; for
    SD3 and Wan the bf16 pipeline passes float32 values that are not bf16-representable."""
    sigmas, stock = case.run_pipeline(BF16)
    per_step = len(stock) // len(sigmas)
    first = [float(stock[i * per_step][0]) for i in range(len(sigmas))]
    if case.key in ("flux", "qwen_image"):
        naive = [_naive_bf16(case, s) for s in sigmas]
        differ = [s for s, a, b in zip(sigmas, first, naive) if a != b]
        assert any(abs(s - 0.74925) < 1e-6 for s in differ), differ
        if case.key == "qwen_image":
            stock_rungs = qwen_stock_sigmas()
            # 11 of the 50 rungs of the stock 1328 x 1328 schedule.
            assert len([s for s in differ if any(abs(s - r) < 1e-7 for r in stock_rungs)]) == 11
            assert first[sigmas.index(next(s for s in sigmas if abs(s - 0.74925) < 1e-6))] == (
                pytest.approx(0.746094, abs=1e-6)
            )
    else:
        assert any(v != float(torch.tensor(v).to(BF16)) for v in first)
