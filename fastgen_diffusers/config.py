"""Pydantic configuration for diffusion step distillation.

:class:`DMDConfig` extends :class:`DistillationConfig` with the DMD2-specific knobs. Every model
forbids unknown keys and validates ranges, so a typo in a recipe fails with an error that names
the field instead of being silently ignored. Defaults follow the FastGen Wan 2.2 5B experiment.

Example::

    from fastgen_diffusers import DMDConfig

    cfg = DMDConfig(guidance_scale=5.0, sample_t_cfg={"time_dist_type": "logitnormal"})
    print(cfg.model_dump_json(indent=2))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DMDConfig",
    "DistillationConfig",
    "EMAConfig",
    "FastGenBaseConfig",
    "PredType",
    "SampleTimestepConfig",
    "TimeDistType",
]

PredType = Literal["x0", "eps", "v", "flow"]
TimeDistType = Literal["uniform", "logitnormal", "lognormal", "shifted", "polynomial"]


class FastGenBaseConfig(BaseModel):
    """Base for every config: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SampleTimestepConfig(FastGenBaseConfig):
    """Timestep sampling distribution for diffusion training."""

    time_dist_type: TimeDistType = Field(
        default="shifted",
        description=(
            "Distribution used to sample the training timestep t. Rectified-flow models "
            "typically use shifted (Wan 2.2) or logitnormal (SD3, Flux)."
        ),
    )
    min_t: float = Field(
        default=0.001,
        ge=0.0,
        le=1.0,
        description="Lower bound of the sampling range (clamped before use).",
    )
    max_t: float = Field(
        default=0.999,
        ge=0.0,
        le=1.0,
        description="Upper bound of the sampling range (clamped before use).",
    )
    shift: float = Field(
        default=5.0,
        ge=1.0,
        description="Shift factor for time_dist_type='shifted'; must be >= 1.",
    )
    p_mean: float = Field(
        default=0.0, description="Mean of the underlying normal for logitnormal / lognormal."
    )
    p_std: float = Field(
        default=1.0,
        gt=0.0,
        description="Standard deviation of the underlying normal for logitnormal / lognormal.",
    )
    t_list: list[float] | None = Field(
        default=None,
        description=(
            "Explicit timestep schedule used when DMDConfig.student_sample_steps > 1. "
            "The final element must be 0.0."
        ),
    )

    @field_validator("t_list")
    @classmethod
    def _check_t_list(cls, t_list: list[float] | None) -> list[float] | None:
        if t_list is None:
            return None
        if len(t_list) < 2:
            raise ValueError(
                f"t_list={t_list} must hold at least 2 entries (the rungs, then the final 0.0)"
            )
        if t_list[-1] != 0.0:
            raise ValueError(f"t_list={t_list} must end with 0.0, got {t_list[-1]}")
        if any(not 0.0 <= t <= 1.0 for t in t_list):
            raise ValueError(f"t_list={t_list} must lie in [0, 1]")
        if any(a <= b for a, b in zip(t_list, t_list[1:])):
            raise ValueError(f"t_list={t_list} must be strictly decreasing")
        return t_list

    @model_validator(mode="after")
    def _check_bounds(self) -> SampleTimestepConfig:
        if not self.min_t < self.max_t:
            raise ValueError(
                f"min_t must be smaller than max_t, got min_t={self.min_t}, max_t={self.max_t}"
            )
        return self


class EMAConfig(FastGenBaseConfig):
    """Exponential moving average (EMA) hyperparameters for the student network."""

    decay: float = Field(
        default=0.9999,
        ge=0.0,
        le=1.0,
        description="Decay coefficient for type='constant'. Ignored for halflife/power.",
    )
    type: Literal["constant", "halflife", "power"] = Field(
        default="constant", description="Schedule used to compute the per-step decay coefficient."
    )
    start_iter: int = Field(
        default=0,
        ge=0,
        description=(
            "Iteration at which EMA tracking begins (EMA is initialized from the live weights "
            "at this step)."
        ),
    )
    gamma: float = Field(
        default=16.97,
        ge=0.0,
        description="Exponent for type='power' (beta = (1 - 1/iter)**(gamma + 1)).",
    )
    halflife_kimg: float = Field(
        default=500.0, gt=0.0, description="Halflife in thousands of images for type='halflife'."
    )
    rampup_ratio: float | None = Field(
        default=0.05,
        gt=0.0,
        description="Rampup fraction for type='halflife'; pass None to disable rampup.",
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        description=(
            "Per-step global batch size used to convert iterations to nimg for the halflife "
            "schedule."
        ),
    )
    fsdp2: bool = Field(
        default=True,
        description=(
            "If True, the EMA uses DTensor.full_tensor() to gather sharded parameters before "
            "updating."
        ),
    )
    mode: Literal["full_tensor", "local_shard"] = Field(
        default="full_tensor",
        description=(
            "full_tensor performs an all_gather per parameter (higher memory, exact global EMA). "
            "local_shard updates each rank's local DTensor shard in place (low memory fallback)."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default="float32",
        description=(
            "Precision of the EMA parameter shadows. float32 keeps EMA updates meaningful when "
            "the live model is bf16/fp16. None keeps param shadows in the live parameter's "
            "dtype. Buffer shadows always track the live dtype."
        ),
    )


class DistillationConfig(FastGenBaseConfig):
    """Shared hyperparameters for diffusion step-distillation methods.

    Concrete methods subclass this config to add method-specific fields (see :class:`DMDConfig`).
    """

    pred_type: PredType = Field(
        default="flow", description="Quantity predicted by the teacher / student network."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=1.0,
        description=(
            "Classifier-free guidance scale (DMD2 convention, 1.0 = conditional only). "
            "If None CFG is disabled."
        ),
    )
    sample_t_cfg: SampleTimestepConfig = Field(
        default_factory=SampleTimestepConfig,
        description=(
            "Timestep distribution used for both the teacher forward and the VSD / DSM losses. "
            "null selects the defaults."
        ),
    )
    student_sample_steps: int = Field(
        default=1,
        ge=1,
        description="Number of denoising steps the distilled student performs at inference.",
    )
    student_sample_type: Literal["sde", "ode"] = Field(
        default="ode",
        description=(
            "Integrator used when unrolling the student over student_sample_steps > 1 steps. "
            "Consumed by inference samplers and by backward simulation."
        ),
    )
    num_train_timesteps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "If set, the pipeline rescales the continuous RF timestep t in [0, 1] to "
            "num_train_timesteps * t before passing it to the model. Leave None when the model "
            "wrapper already handles the rescaling internally."
        ),
    )

    @field_validator("sample_t_cfg", mode="before")
    @classmethod
    def _default_sample_t_cfg(cls, value: Any) -> Any:
        # The documented default JSON shows ``null``: accept it as "use the defaults".
        return SampleTimestepConfig() if value is None else value

    @model_validator(mode="after")
    def _check_student_steps(self) -> DistillationConfig:
        t_list = self.sample_t_cfg.t_list
        if self.student_sample_steps > 1:
            if t_list is None:
                raise ValueError(
                    f"student_sample_steps={self.student_sample_steps} needs sample_t_cfg.t_list "
                    f"with {self.student_sample_steps + 1} entries (the rungs, then 0.0)"
                )
            if len(t_list) != self.student_sample_steps + 1:
                raise ValueError(
                    f"sample_t_cfg.t_list={t_list} has {len(t_list)} entries; "
                    f"student_sample_steps={self.student_sample_steps} expects "
                    f"{self.student_sample_steps + 1} (the rungs, then 0.0)"
                )
        return self


class DMDConfig(DistillationConfig):
    """Hyperparameters for DMD / DMD2 distribution-matching distillation.

    Default values are tuned for Wan 2.2 5B; callers fine-tune them per model.

    Stabilizers from the literature, all off by default (formulas in each field's description):
    ``guidance_norm`` (per-token velocity norm rescale / clamp of the guided teacher: Qwen-Image
    true CFG, LightX2V ``cfg_norm``), ``guidance_scale_range`` (per-sample CFG scale),
    ``ida_ratio`` (implicit distribution alignment), ``isg_weight`` (intra-segment guidance),
    ``backward_simulation_prob`` (mix of backward simulation and noised real latents) and
    ``gan_rung_weighting`` (GAN weight per student rung); the last four from SenseFlow (Ge et
    al., "SenseFlow: Scaling Distribution Matching for Flow-based Text-to-Image Distillation",
    ICLR 2026, github.com/XingtongGe/SenseFlow).

    Example::

        cfg = DMDConfig.from_yaml("general/distillation/dmd2_wan22_5b")
        cfg = cfg.model_copy(update={"gan_loss_weight_gen": 0.0})
    """

    student_update_freq: int = Field(
        default=5,
        ge=1,
        description=(
            "One student step for every student_update_freq fake-score / discriminator steps. "
            "Not read by DMDPipeline; the training loop enforces the alternation."
        ),
    )
    fake_score_pred_type: PredType | None = Field(
        default="x0",
        description=(
            "Parameterization used when training the fake score. If None falls back to "
            "DistillationConfig.pred_type."
        ),
    )
    gan_loss_weight_gen: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the GAN generator term in the student loss. 0 disables the GAN "
        "branch.",
    )
    gan_use_same_t_noise: bool = Field(
        default=False,
        description="If True, reuse the same t and eps for real and fake samples in the "
        "discriminator update.",
    )
    gan_r1_reg_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Weight of the approximate-R1 regularization term for the discriminator update. "
            "0 disables R1. Recommended range when enabled: 100-1000."
        ),
    )
    gan_r1_reg_alpha: float = Field(
        default=0.1,
        gt=0.0,
        description="Standard deviation of the perturbation applied to real data when computing "
        "the approximate R1 term.",
    )
    ema: EMAConfig | None = Field(
        default=None,
        description=(
            "If set, an exponential moving average of the student is maintained and updated "
            "via DMDPipeline.update_ema."
        ),
    )
    backward_simulation: bool = Field(
        default=False,
        description=(
            "Multi-step students: build the student's input by unrolling the current student "
            "(without grad) from pure noise down to a random rung of t_list, instead of noising "
            "real latents. The rung index is broadcast from rank 0."
        ),
    )

    # -- stabilizers (all off by default) ---------------------------------------------------
    guidance_norm: Literal["rescale", "clamp"] | None = Field(
        default=None,
        description=(
            "Teacher guidance normalisation, in velocity space (v = (x_t - x0) / t) after CFG "
            "and before the conversion back to x0, per token (norm over the channel dimension, "
            "dim 1 of the latent layout). 'rescale': v <- v * ||v_cond|| / ||v|| (the Qwen-Image "
            "pipeline's true-CFG norm; LightX2V cfg_norm: layer_norm). 'clamp': "
            "v <- v * min(1, k ||v_cond|| / ||v||) with k = guidance_norm_clamp. None: off."
        ),
    )
    guidance_norm_clamp: float = Field(
        default=1.0,
        ge=1.0,
        description="k of guidance_norm='clamp': the guided velocity's per-token norm is kept "
        "<= k times the conditional one's.",
    )
    guidance_scale_range: tuple[float, float] | None = Field(
        default=None,
        description=(
            "Draw the teacher's CFG scale per sample from U(low, high) at every student step "
            "instead of using guidance_scale (SenseFlow, Ge et al. ICLR 2026: SD3.5 Large true "
            "CFG U(3, 10); FLUX.1-dev embedded guidance U(1, 8)). Needs negative conditioning "
            "like guidance_scale. None: off."
        ),
    )
    ida_ratio: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Implicit distribution alignment (SenseFlow): after each student update the fake "
            "score is pulled toward the student, phi <- (1 - r) phi + r theta (r = 0.03 "
            "published, i.e. their ida_w = 0.97). For LoRA fake score and student on the same "
            "base (separate_lora / shared_lora) the fake adapter's delta B_f A_f is replaced by "
            "the best rank-r approximation of (1 - r) B_f A_f + r B_s A_s "
            "(fastgen_diffusers.alignment). 0: off."
        ),
    )
    isg_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Intra-segment guidance (SenseFlow) weight in the student loss. For the student's "
            "segment [t_prev, t] (t its input rung, t_prev the next rung of t_list, 0 after "
            "the last), t_mid ~ U(t_prev + m, t - m) (m = isg_margin); target = teacher Euler "
            "step t -> t_mid (x_mid = x_t + (t_mid - t) v_teacher), then the student (no grad) "
            "from t_mid to t_prev; loss = mean(sqrt((x_student - x_target)^2 + c^2) - c) with "
            "x_student the student's own Euler jump t -> t_prev and c = isg_huber_c. "
            "Published weight 1. 0: off."
        ),
    )
    isg_huber_c: float = Field(
        default=1e-3, gt=0.0, description="c of ISG's pseudo-Huber loss (SenseFlow: 1e-3)."
    )
    isg_margin: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description=(
            "t_mid is drawn at least this far (in t) from both ends of the segment; a segment "
            "shorter than 2 m uses its midpoint (SenseFlow: 20 of 1000 timesteps for FLUX, 50 "
            "of 1000 scheduler indices for SD3.5 Large)."
        ),
    )
    isg_guidance_scale: float | None = Field(
        default=None,
        ge=1.0,
        description="Teacher CFG scale of the ISG step (SenseFlow SD3.5 Large: 5.0). None: the "
        "scale of the distribution-matching term of the same step.",
    )
    backward_simulation_prob: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description=(
            "With backward_simulation: the probability that an iteration unrolls the student; "
            "the other iterations noise real latents to a rung (SenseFlow: 0.5, one draw per "
            "iteration shared by every rank). 1.0: always unroll."
        ),
    )
    gan_rung_weighting: Literal["constant", "one_minus_t_squared"] = Field(
        default="constant",
        description=(
            "Per-sample weight of the GAN generator term by the student's input rung t: "
            "'one_minus_t_squared' multiplies it by (1 - t)^2 (SenseFlow FLUX: timew = "
            "(1 - sigma)^2), so the pure-noise rung gets little adversarial push."
        ),
    )

    @field_validator("guidance_scale_range")
    @classmethod
    def _check_guidance_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 1.0 <= value[0] <= value[1]:
            raise ValueError(
                f"guidance_scale_range={list(value)} must be [low, high] with 1 <= low <= high"
            )
        return value

    @model_validator(mode="after")
    def _check_gan(self) -> DMDConfig:
        if self.gan_r1_reg_weight > 0 and self.gan_loss_weight_gen <= 0:
            raise ValueError(
                f"gan_r1_reg_weight={self.gan_r1_reg_weight} needs the GAN branch: set "
                f"gan_loss_weight_gen > 0 (got {self.gan_loss_weight_gen})"
            )
        return self

    @model_validator(mode="after")
    def _check_mix(self) -> DMDConfig:
        if self.backward_simulation_prob < 1.0 and not self.backward_simulation:
            raise ValueError(
                f"backward_simulation_prob={self.backward_simulation_prob} mixes backward "
                "simulation with noised real latents: set backward_simulation: true"
            )
        return self

    @classmethod
    def from_yaml(cls, config_file: str | Path) -> DMDConfig:
        """Construct a :class:`DMDConfig` from a YAML file or a built-in recipe name.

        Thin wrapper around :func:`fastgen_diffusers.loader.load_dmd_config`: built-in recipes
        are searched first, then the filesystem; ``.yaml`` / ``.yml`` may be omitted.
        """
        from .loader import load_dmd_config  # loader imports this module

        return load_dmd_config(config_file)
