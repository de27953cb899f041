"""Scheduler configs that make the stock Wan pipelines follow a distilled student's rungs.

``WanPipeline`` and ``WanImageToVideoPipeline`` take neither ``sigmas`` nor ``timesteps``: they
call ``scheduler.set_timesteps(num_inference_steps)`` and nothing else. A student distilled on
a ``t_list`` such as ``[0.999, 0.833, 0.0]`` can therefore be run by the stock pipeline only if
some ``FlowMatchEulerDiscreteScheduler`` config alone produces exactly those rungs. This module
finds such a config (documented ``shift`` / ``shift_terminal`` keys, or Karras / exponential
sigmas between extra ``sigma_max`` / ``sigma_min`` keys), says which lists are reachable, and
gives the closest reachable list for those that are not, so the student can be trained on it.

The public names are re-exported by :mod:`fastgen_diffusers.plugins.wan`.

Example::

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from fastgen_diffusers.plugins import wan_schedule

    pipe = WanPipeline.from_pretrained(path)  # the exported student
    base = pipe.scheduler.config
    # FastGen's 4-step list is off every reachable curve: train on the closest one instead.
    t_list = wan_schedule.closest_reachable_t_list([0.999, 0.937, 0.833, 0.624, 0.0], base)
    config = wan_schedule.student_scheduler_config(t_list, base_config=base)
    assert wan_schedule.pipeline_t_list(config, len(t_list) - 1) == t_list
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    video = pipe("a cat surfing", num_inference_steps=len(t_list) - 1, guidance_scale=1.0)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..sampling import validate_t_list
from .common import validate_sample_type

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "closest_reachable_t_list",
    "pipeline_t_list",
    "student_scheduler_config",
]

# Every Wan checkpoint's scheduler has num_train_timesteps=1000; the transformer was trained on
# timesteps in [0, 1000].
NUM_TRAIN_TIMESTEPS = 1000


# WanPipeline / WanImageToVideoPipeline call `scheduler.set_timesteps(num_inference_steps)` and
# nothing else: no `sigmas`, no `timesteps`, no `mu`. FlowMatchEulerDiscreteScheduler (0.42)
# then builds, for N steps and static shift s:
#   init:   sigma_max = S(1) = 1.0 and sigma_min = S(1/num_train_timesteps), S(u) = s u/(1+(s-1)u)
#   set:    u = linspace(sigma_max, sigma_min, N); sigmas = S(u)          (shifted a 2nd time)
#           shift_terminal: 1 - sigmas -> (1 - sigmas) * (1 - shift_terminal) / (1 - sigmas[-1])
#           Karras / exponential / beta: rebuilt from sigma_max / sigma_min, which are read from
#           `config.sigma_max` / `config.sigma_min` if the config has those keys, else from the
#           first / last sigma above
#           then a final 0.0 is appended and timesteps = sigmas * num_train_timesteps.
# So without extra keys the first rung is always 1.0 (and shift_terminal with N = 1 divides 0 by
# 0); num_train_timesteps must stay 1000 because the same value scales the model's timestep.
# `from_config` / `from_pretrained` register unknown keys on the config (the "will be ignored"
# warning notwithstanding, configuration_utils.extract_init_dict's hidden_config_dict), which is
# how `sigma_max` / `sigma_min` reach the Karras / exponential conversions.

_FAMILY_KEYS = (
    "shift",
    "use_dynamic_shifting",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "sigma_min",
    "sigma_max",
)


def _flow_match_init_keys() -> set[str]:
    params = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    return {name for name in params if name != "self"}


def pipeline_t_list(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> list[float]:
    """The rungs (with the final 0.0) a Wan pipeline visits with this scheduler config.

    Builds the scheduler with ``from_config`` (as ``from_pretrained`` does) and calls
    ``set_timesteps(num_inference_steps)`` like ``WanPipeline.__call__``; values are the
    scheduler's float32 sigmas.
    """
    config = {k: v for k, v in dict(scheduler_config).items() if k != "_class_name"}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(int(num_inference_steps))
    return [float(s) for s in scheduler.sigmas]


def _shift_family_sigmas(shift: float, terminal: float | None, num: int) -> list[float]:
    """Closed form of the documented-keys schedule (first rung 1.0) for the shift search."""

    def shifted(u: float) -> float:
        return shift * u / (1.0 + (shift - 1.0) * u)

    sigma_min = shifted(1.0 / NUM_TRAIN_TIMESTEPS)
    if num == 1:
        return [1.0]
    sigmas = [shifted(1.0 + (sigma_min - 1.0) * i / (num - 1)) for i in range(num)]
    if terminal is not None:
        scale = (1.0 - sigmas[-1]) / (1.0 - terminal)
        sigmas = [1.0 - (1.0 - s) / scale for s in sigmas]
    return sigmas


def _fit_shift(rungs: list[float]) -> float:
    """Shift minimising the max rung error of the documented-keys family (first rung 1.0)."""
    num = len(rungs)

    def error(log_shift: float) -> float:
        sigmas = _shift_family_sigmas(math.exp(log_shift), rungs[-1], num)
        return max(abs(a - b) for a, b in zip(sigmas, rungs))

    grid = [math.log(0.02) + i * (math.log(50.0) - math.log(0.02)) / 400 for i in range(401)]
    best = min(grid, key=error)
    lo, hi = best - 0.02, best + 0.02
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if error(a) < error(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2.0)


def _candidates(rungs: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """Scheduler settings whose schedule matches ``rungs`` at least at both ends."""
    num, first, last = len(rungs), rungs[0], rungs[-1]
    off = {
        "use_dynamic_shifting": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "invert_sigmas": False,
    }
    found: list[tuple[str, dict[str, Any]]] = []
    if first == 1.0:
        # Documented keys only: preferred when it fits.
        shift = 1.0 if num <= 2 else _fit_shift(rungs)
        terminal = last if num >= 2 else None
        found.append(("shift", {**off, "shift": shift, "shift_terminal": terminal}))
    ends = {"shift": 1.0, "shift_terminal": None, "sigma_max": first, "sigma_min": last}
    found.append(("karras", {**off, **ends, "use_karras_sigmas": True}))
    found.append(("exponential", {**off, **ends, "use_exponential_sigmas": True}))
    return found


def _best_schedule(
    rungs: list[float], base: Mapping[str, Any]
) -> tuple[float, str, dict[str, Any], list[float]]:
    target = torch.tensor(rungs, dtype=torch.float32).tolist()
    best: tuple[float, str, dict[str, Any], list[float]] | None = None
    for name, overrides in _candidates(rungs):
        config = {**base, **overrides}
        visited = pipeline_t_list(config, len(rungs))
        if len(visited) != len(rungs) + 1 or visited[-1] != 0.0:
            continue
        err = max(abs(a - b) for a, b in zip(visited[:-1], target))
        if not math.isfinite(err):
            continue
        if best is None or err < best[0]:
            best = (err, name, config, visited)
    if best is None:  # unreachable: the Karras candidate always yields N + 1 finite sigmas
        raise RuntimeError(f"no FlowMatchEulerDiscreteScheduler schedule found for {rungs}")
    return best


def _base_scheduler_config(base_config: Mapping[str, Any] | None) -> dict[str, Any]:
    keys = _flow_match_init_keys()
    # Keep only FlowMatchEuler keys (the Wan checkpoints ship UniPCMultistepScheduler configs)
    # and none of the schedule-shaping ones, which the construction sets.
    base = {
        k: v
        for k, v in dict(base_config or {}).items()
        if k in keys and k not in _FAMILY_KEYS and k != "stochastic_sampling"
    }
    steps = int(base.get("num_train_timesteps") or NUM_TRAIN_TIMESTEPS)
    if steps != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"base_config has num_train_timesteps={steps}; Wan pipelines pass sigma * "
            f"num_train_timesteps to the transformer, which expects {NUM_TRAIN_TIMESTEPS}"
        )
    base["num_train_timesteps"] = NUM_TRAIN_TIMESTEPS
    return base


def closest_reachable_t_list(
    t_list: Sequence[float], base_config: Mapping[str, Any] | None = None
) -> list[float]:
    """The t_list closest to ``t_list`` (same first and last rung, same length) that a Wan
    pipeline can follow from a scheduler config alone; equal to it when it is reachable.

    Train the student on this list when ``t_list`` itself is unreachable (see
    :func:`student_scheduler_config`).
    """
    rungs = validate_t_list(t_list)[:-1]
    return _best_schedule(rungs, _base_scheduler_config(base_config))[3]


def student_scheduler_config(
    t_list: Sequence[float],
    sample_type: str = "ode",
    base_config: Mapping[str, Any] | None = None,
    *,
    atol: float = 1e-6,
) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config under which ``WanPipeline`` /
    ``WanImageToVideoPipeline``, called with
    :func:`~fastgen_diffusers.plugins.wan.stock_pipeline_kwargs`, visit the student's
    rungs ``t_list[:-1]`` (then the appended 0.0), to within ``atol`` in float32.

    Wan pipelines take neither ``sigmas`` nor ``timesteps``, so the schedule must come from
    the config alone. Reachable ``t_list`` (N rungs, ``t_list[-1] = 0``):

    - N = 1 or N = 2: every list, e.g. ``[0.999, 0.0]``, ``[0.999, 0.833, 0.0]``: Karras
      sigmas between ``sigma_max = t_list[0]`` and ``sigma_min = t_list[N-1]`` (the extra
      config keys ``sigma_max`` / ``sigma_min``; with one step the schedule is ``[sigma_max]``).
    - N >= 3: the interior rungs must lie on one of
      Karras: ``t_i = (a^(1/7) + i/(N-1) (b^(1/7) - a^(1/7)))^7``,
      exponential: ``t_i = a (b / a)^(i/(N-1))`` (``a = t_list[0]``, ``b = t_list[N-1]``), or,
      when ``t_list[0] == 1.0``, the documented-keys schedule
      ``t_i = 1 - (1 - S(u_i)) (1 - b) / (1 - S(u_{N-1}))`` with ``u = linspace(1, S(1/1000),
      N)``, ``S(u) = s u / (1 + (s - 1) u)`` (keys ``shift = s``, ``shift_terminal = b``).
      E.g. FastGen's ``[0.999, 0.937, 0.833, 0.624, 0.0]`` is not reachable (the closest,
      Karras, is about ``[0.999, 0.857, 0.733, 0.624]``).

    Unreachable lists raise ``ValueError`` naming the closest reachable list
    (:func:`closest_reachable_t_list`), which the student can be trained on instead.
    ``sample_type="sde"`` sets ``stochastic_sampling=True`` (x0, then fresh noise: the same
    transition as :func:`~fastgen_diffusers.sampling.sample_student`'s SDE). ``base_config``
    (e.g. the teacher's ``scheduler.config``, usually UniPC's) contributes only keys that
    ``FlowMatchEulerDiscreteScheduler`` knows and that do not shape the schedule. Load the result
    with ``FlowMatchEulerDiscreteScheduler.from_config`` / ``from_pretrained`` (not
    ``FlowMatchEulerDiscreteScheduler(**config)``, which rejects ``sigma_max``); ship it as
    ``scheduler/scheduler_config.json`` with ``model_index.json`` naming
    ``["diffusers", "FlowMatchEulerDiscreteScheduler"]``. A one-transformer student of a Wan 2.2
    A14B pipeline replaces ``transformer`` with ``boundary_ratio`` / ``transformer_2`` unset; a
    two-expert student (``WanFamily(boundary_ratio=...).student_scheduler_config``) keeps both.
    """
    values = validate_t_list(t_list)
    validate_sample_type(sample_type)
    rungs = values[:-1]
    err, _, config, visited = _best_schedule(rungs, _base_scheduler_config(base_config))
    if err > atol:
        raise ValueError(
            f"t_list={values} cannot be followed by a Wan pipeline: WanPipeline takes no sigmas, "
            "and a FlowMatchEulerDiscreteScheduler config alone reaches any 1- or 2-step list but "
            "3+ rungs only on the Karras / exponential curve between the first and last rung (or "
            "the shift / shift_terminal curve when the list starts at 1.0). Closest reachable: "
            f"{[round(v, 6) for v in visited]} (max rung error {err:.3g} > atol={atol}); train "
            "the student on closest_reachable_t_list(t_list)"
        )
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        **config,
        "stochastic_sampling": sample_type == "sde",
    }
