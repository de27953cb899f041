"""DMD2 loss pipeline: variational score distillation, fake-score DSM and an optional GAN branch.

:class:`DMDPipeline` computes losses; the training loop owns optimizers, the alternation
(``config.student_update_freq``), device placement and sharding.

Example::

    import fastgen_diffusers as fgd

    cfg = fgd.load_dmd_config("general/distillation/dmd2_wan22_5b")
    fake_score = fgd.create_fake_score(teacher)
    pipe = fgd.DMDPipeline(student, teacher, fake_score, cfg, discriminator=disc)

    if step % cfg.student_update_freq == 0:
        losses = pipe.compute_student_loss(latents, noise, text_embeds,
                                           negative_encoder_hidden_states=neg_embeds)
        losses["total"].backward(); student_opt.step(); pipe.update_ema()
    else:
        pipe.compute_fake_score_loss(latents, noise, text_embeds)["total"].backward()
        fake_score_opt.step()
        if disc is not None:
            pipe.compute_discriminator_loss(latents, noise, text_embeds)["total"].backward()
            disc_opt.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import DMDConfig
from ..ema import ExponentialMovingAverage
from ..features import FeatureCapture, get_feature_capture
from ..flow_matching import (
    add_noise,
    convert_prediction,
    next_rung,
    renoise,
    rf_alpha,
    rf_sigma,
    sample_from_t_list,
)
from ..losses import (
    dsm_loss,
    gan_disc_loss,
    gan_gen_loss,
    pseudo_huber_loss,
    r1_loss,
    vsd_loss,
)
from ..modeling import call_model
from ..pipeline import DistillationPipeline
from ..utils import classifier_free_guidance, normalize_guidance

__all__ = ["DMDPipeline"]


@contextlib.contextmanager
def _params_frozen(module: nn.Module) -> Iterator[None]:
    """Run a forward whose graph must not reach ``module``'s weights (the autograd graph is built
    at forward time, so restoring ``requires_grad`` afterwards keeps them out of the backward)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _version(value: Any) -> int:
    """A tensor's in-place modification counter (-1 for anything else)."""
    return value._version if isinstance(value, torch.Tensor) else -1


def _batch_pair(key: str, pos: Any, neg: Any, batch: int) -> Any:
    """Concatenate the positive and negative value of one model kwarg for a batched CFG pass."""
    if isinstance(pos, torch.Tensor) or isinstance(neg, torch.Tensor):
        if not (isinstance(pos, torch.Tensor) and isinstance(neg, torch.Tensor)):
            raise TypeError(f"model kwarg {key!r}: one of positive/negative is not a Tensor")
        if pos.shape[:1] != (batch,) or neg.shape != pos.shape:
            raise ValueError(
                f"batch_cfg needs model kwarg {key!r} as [batch={batch}, ...] for both prompts, "
                f"got {tuple(pos.shape)} and {tuple(neg.shape)}"
            )
        return torch.cat([pos, neg])
    if pos is not neg and pos != neg:
        raise ValueError(f"batch_cfg: non-tensor model kwarg {key!r} differs between prompts")
    return pos


class DMDPipeline(DistillationPipeline):
    """DMD2 loss pipeline.

    Args:
        student: trainable student, called as
            ``model(hidden_states=x_t, timestep=t, encoder_hidden_states=..., **model_kwargs)``;
            returns a Tensor, a tuple whose first item is one, or an object with ``.sample``.
        teacher: frozen reference with the same call signature (frozen here). With a
            discriminator, attach feature capture to it first
            (:func:`fastgen_diffusers.features.attach_feature_capture` or a family plugin).
        fake_score: trainable auxiliary network (same signature), e.g. from
            :func:`~fastgen_diffusers.create_fake_score`.
        config: the :class:`~fastgen_diffusers.DMDConfig`.
        discriminator: maps ``list[Tensor]`` (captured teacher features) to ``[B, heads]``
            logits. Required when ``config.gan_loss_weight_gen > 0``.
        batch_cfg: run the teacher's conditional and unconditional passes as one forward over a
            doubled batch (same numbers, one launch). Every Tensor in ``model_kwargs`` must then
            have the batch as its first dimension. With the GAN branch the student step keeps
            the two passes apart: only the conditional one needs a graph.
        guidance_scale_fn: per-sample CFG scales: maps the teacher's ``t`` ``[B]`` to scales
            ``[B]`` (each >= 1), used instead of the scalar whenever CFG is on (the config's or
            the call's ``guidance_scale`` is not ``None``). E.g. a two-expert teacher's
            ``guidance_scale`` / ``guidance_scale_2`` (``WanExperts.guidance_scales`` in
            :mod:`fastgen_diffusers.plugins.wan_experts`).
    """

    config: DMDConfig
    # Monitors (fastgen_diffusers.monitors): when set, compute_student_loss keeps its tensors
    # (detached) in last_student_step: student input and t, gen, teacher and fake-score x0.
    record_student_step: bool = False
    last_student_step: dict[str, torch.Tensor] | None = None

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        fake_score: nn.Module,
        config: DMDConfig,
        *,
        discriminator: nn.Module | None = None,
        batch_cfg: bool = False,
        guidance_scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(config, DMDConfig):
            raise TypeError(f"config must be a DMDConfig, got {type(config).__name__}")
        super().__init__(student, teacher, config)
        if config.gan_loss_weight_gen > 0 and discriminator is None:
            raise ValueError(
                f"gan_loss_weight_gen={config.gan_loss_weight_gen} enables the GAN branch, which "
                "needs a discriminator: pass discriminator=... or set gan_loss_weight_gen=0"
            )
        self.fake_score = fake_score
        self.discriminator = discriminator
        self.batch_cfg = batch_cfg
        self.guidance_scale_fn = guidance_scale_fn
        self._iteration = 0
        self._data_parallel: tuple[int, int] | None = None
        self._sample_cache: tuple[tuple[Any, ...], torch.Tensor, Any] | None = None
        # The EMA tracks the module inside a DDP wrapper (DDP's own parameter listing can miss
        # parameters a wrapped view exposes, and its names carry a "module." prefix).
        self._ema_target = (
            student.module if isinstance(student, DistributedDataParallel) else student
        )
        self._ema = (
            ExponentialMovingAverage(self._ema_target, config.ema)
            if config.ema is not None
            else None
        )

    @property
    def ema(self) -> ExponentialMovingAverage | None:
        """Reference to the student EMA tracker, if configured."""
        return self._ema

    @property
    def gan_enabled(self) -> bool:
        return self.discriminator is not None and self.config.gan_loss_weight_gen > 0

    def draw_for_global_batch(self, rank: int, world_size: int) -> None:
        """Draw every timestep and noise tensor for the global batch (``world_size`` equal
        per-rank batches, rank-major) and keep this rank's rows.

        With the same seed on every rank, an N-rank run then sees the numbers a single process
        sees over the whole batch, so data-parallel and sharded runs reproduce a one-process
        run. Each rank draws ``world_size`` times the noise it uses (cheap next to a forward).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self._data_parallel = (rank, world_size) if world_size > 1 else None

    def _rows(self, draw: Any, batch: int) -> torch.Tensor:
        if self._data_parallel is None:
            return draw(batch)
        rank, world = self._data_parallel
        return draw(batch * world)[rank * batch : (rank + 1) * batch]

    def _timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        return self._rows(lambda n: self.sample_timesteps(n, device=device), batch)

    def _randn_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._rows(
            lambda n: torch.randn((n, *like.shape[1:]), device=like.device, dtype=like.dtype),
            like.shape[0],
        )

    # -- model calls ------------------------------------------------------------------------

    def _call(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Forward ``model`` in the pipeline convention and return its native prediction."""
        return call_model(
            model,
            x_t,
            t,
            encoder_hidden_states,
            model_kwargs,
            num_train_timesteps=self.config.num_train_timesteps,
        )

    def _predict_x0(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        raw = self._call(model, x_t, t, encoder_hidden_states, model_kwargs)
        return convert_prediction(raw, x_t, t, from_type=self.config.pred_type, to_type="x0")

    def _capture(self, which: str) -> FeatureCapture:
        capture = get_feature_capture(self.teacher)
        if capture is None:
            raise RuntimeError(
                f"The GAN branch ({which}) needs features from the teacher, but no feature "
                "capture is attached to it: call fastgen_diffusers.features."
                "attach_feature_capture(teacher, feature_indices=...) or the family plugin's "
                "attach_feature_capture before computing losses"
            )
        return capture

    def _teacher_features(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
        which: str,
    ) -> list[torch.Tensor]:
        with self._capture(which).record() as features:
            self._call(self.teacher, x_t, t, encoder_hidden_states, model_kwargs)
        return features

    # -- student input ----------------------------------------------------------------------

    def _rung_index(self, num_rungs: int, device: torch.device) -> int:
        """A rung of ``t_list`` drawn on rank 0 and shared by every rank."""
        index = torch.randint(0, num_rungs, (1,))
        if dist.is_available() and dist.is_initialized():
            index = index.to(device)
            dist.broadcast(index, src=0)
        return int(index.item())

    def _unroll_this_iteration(self, device: torch.device) -> bool:
        """Backward simulation on this iteration? Always, unless ``backward_simulation_prob``
        < 1: then a coin drawn on rank 0 and shared by every rank."""
        prob = self.config.backward_simulation_prob
        if prob >= 1.0:
            return True
        coin = torch.rand(1)
        if dist.is_available() and dist.is_initialized():
            coin = coin.to(device)
            dist.broadcast(coin, src=0)
        return bool(coin.item() < prob)

    def _student_input(
        self,
        latents: torch.Tensor | None,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, t)`` the student denoises: its first rung, a noised real latent at a random rung,
        or (``backward_simulation``) its own unrolled trajectory stopped at a random rung."""
        cfg = self.config
        batch, device = noise.shape[0], noise.device
        if cfg.student_sample_steps == 1:
            max_t = cfg.sample_t_cfg.max_t
            x = (noise.to(torch.float64) * max_t).to(noise.dtype)
            return x, torch.full((batch,), max_t, device=device, dtype=torch.float32)
        t_list = cfg.sample_t_cfg.t_list
        assert t_list is not None  # DMDConfig requires it when student_sample_steps > 1
        if cfg.backward_simulation and self._unroll_this_iteration(device):
            rung = self._rung_index(len(t_list) - 1, device)
            x = (noise.to(torch.float64) * t_list[0]).to(noise.dtype)
            with torch.no_grad():
                for k in range(rung):
                    t_k = torch.full((batch,), t_list[k], device=device, dtype=torch.float32)
                    t_next = torch.full_like(t_k, t_list[k + 1])
                    x0 = self._predict_x0(self.student, x, t_k, encoder_hidden_states, model_kwargs)
                    fresh = self._randn_like(x0) if cfg.student_sample_type == "sde" else None
                    x = renoise(
                        x0, x, t_k, t_next, sample_type=cfg.student_sample_type, noise=fresh
                    )
            return x, torch.full((batch,), t_list[rung], device=device, dtype=torch.float32)
        if latents is None:
            raise ValueError(
                f"student_sample_steps={cfg.student_sample_steps} without backward_simulation "
                f"(or with backward_simulation_prob={cfg.backward_simulation_prob} < 1) "
                "noises real latents to a rung of t_list: pass latents"
            )
        t = self._rows(lambda n: sample_from_t_list(n, t_list, device=device), batch)
        return add_noise(latents, noise, t), t

    def _check_inputs(self, latents: torch.Tensor | None, noise: torch.Tensor) -> None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a Tensor, got {type(noise).__name__}")
        if latents is not None and latents.shape != noise.shape:
            raise ValueError(
                f"latents and noise must have the same shape, got {tuple(latents.shape)} and "
                f"{tuple(noise.shape)}"
            )

    def _generate(
        self,
        latents: torch.Tensor | None,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        x, t = self._student_input(latents, noise, encoder_hidden_states, model_kwargs)
        return self._predict_x0(self.student, x, t, encoder_hidden_states, model_kwargs)

    def _generate_detached(
        self,
        latents: torch.Tensor | None,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The student's sample without a graph (call under ``no_grad``).

        The fake-score and discriminator steps of one iteration get the same inputs; a one-step
        student's sample is a function of them and its weights only (no draw), so the second
        step reuses the first one's. The entry holds the input objects themselves (ids cannot be
        recycled while held) and is valid while none of them, nor any student weight, changed
        in place (tensor version counters).
        """
        if self.config.student_sample_steps != 1:
            return self._generate(latents, noise, encoder_hidden_states, model_kwargs)
        inputs = (latents, noise, encoder_hidden_states, *model_kwargs.values())
        key = (
            tuple(model_kwargs),
            tuple(_version(v) for v in inputs),
            sum(p._version for p in self.student.parameters()),
        )
        cached = self._sample_cache
        if (
            cached is not None
            and cached[2] == key
            and len(cached[0]) == len(inputs)
            and all(a is b for a, b in zip(cached[0], inputs))
        ):
            return cached[1]
        gen = self._generate(latents, noise, encoder_hidden_states, model_kwargs)
        self._sample_cache = (inputs, gen, key)
        return gen

    # -- teacher with CFG -------------------------------------------------------------------

    def _guided_teacher_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        negative_encoder_hidden_states: torch.Tensor | None,
        guidance_scale: float | torch.Tensor | None,
        model_kwargs: dict[str, Any],
        negative_model_kwargs: dict[str, Any],
        capture: FeatureCapture | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Teacher x0 (detached, CFG applied, then ``guidance_norm``) and, with ``capture``,
        the conditional pass's features with their graph to ``x_t`` kept. ``guidance_scale``
        may be per sample (``[B]``)."""
        batch = x_t.shape[0]
        record: contextlib.AbstractContextManager[list[torch.Tensor]]
        record = capture.record() if capture is not None else contextlib.nullcontext([])
        grad = torch.enable_grad() if capture is not None else torch.no_grad()
        # With feature capture only the conditional half needs a graph: a doubled batch would
        # keep (and backpropagate through) the unconditional half too, so it runs split.
        if guidance_scale is not None and self.batch_cfg and capture is None:
            keys = set(model_kwargs) | set(negative_model_kwargs)
            kwargs = {
                k: _batch_pair(k, model_kwargs.get(k), negative_model_kwargs.get(k), batch)
                for k in keys
            }
            ehs = None
            if encoder_hidden_states is not None:
                ehs = _batch_pair(
                    "encoder_hidden_states",
                    encoder_hidden_states,
                    negative_encoder_hidden_states,
                    batch,
                )
            with torch.no_grad():
                both = self._predict_x0(
                    self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), ehs, kwargs
                )
            cond, uncond = both[:batch], both[batch:]
        else:
            with grad, record as features:
                cond = self._predict_x0(self.teacher, x_t, t, encoder_hidden_states, model_kwargs)
            if guidance_scale is not None:
                with torch.no_grad():
                    uncond = self._predict_x0(
                        self.teacher,
                        x_t.detach(),
                        t,
                        negative_encoder_hidden_states,
                        negative_model_kwargs,
                    )
        teacher_x0 = cond
        if guidance_scale is not None:
            scale: float | torch.Tensor = guidance_scale
            if self.guidance_scale_fn is not None:
                scale = self._per_sample_scale(t, cond)
            teacher_x0 = classifier_free_guidance(cond, uncond, scale)
            if self.config.guidance_norm is not None:
                teacher_x0 = normalize_guidance(
                    teacher_x0.detach(),
                    cond.detach(),
                    x_t.detach(),
                    self.config.guidance_norm,
                    self.config.guidance_norm_clamp,
                )
        return teacher_x0.detach(), (features if capture is not None else None)

    def _per_sample_scale(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        assert self.guidance_scale_fn is not None
        scale = torch.as_tensor(self.guidance_scale_fn(t), device=like.device)
        if scale.shape != (like.shape[0],):
            raise ValueError(
                f"guidance_scale_fn must return one scale per sample, shape ({like.shape[0]},), "
                f"got {tuple(scale.shape)}"
            )
        # Broadcast over the sample's dimensions; the CFG arithmetic stays in cond's dtype.
        return scale.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def _draw_guidance_scale(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample CFG scales from ``U(*guidance_scale_range)`` (drawn for the global
        batch like every other draw)."""
        assert self.config.guidance_scale_range is not None
        low, high = self.config.guidance_scale_range
        draw = self._rows(lambda n: torch.rand(n, device=device, dtype=torch.float64), batch)
        return (low + (high - low) * draw).to(torch.float32)

    def _isg_loss(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        gen: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        negative_encoder_hidden_states: torch.Tensor | None,
        scale: float | torch.Tensor | None,
        model_kwargs: dict[str, Any],
        negative_model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Intra-segment guidance: the student's own Euler jump ``t -> t_prev`` against the
        teacher's step ``t -> t_mid`` followed by the student's (no grad) ``t_mid -> t_prev``."""
        cfg = self.config
        t_list = cfg.sample_t_cfg.t_list
        if cfg.student_sample_steps == 1 or t_list is None:
            t_list = [cfg.sample_t_cfg.max_t, 0.0]
        t_prev = next_rung(t, t_list)
        margin = cfg.isg_margin
        low, high = t_prev + margin, t - margin
        u = self._rows(lambda n: torch.rand(n, device=t.device, dtype=torch.float32), t.shape[0])
        t_mid = torch.where(high > low, low + (high - low) * u, 0.5 * (t + t_prev))
        isg_scale = cfg.isg_guidance_scale if cfg.isg_guidance_scale is not None else scale
        with torch.no_grad():
            teacher_x0, _ = self._guided_teacher_x0(
                x.detach(),
                t,
                encoder_hidden_states,
                negative_encoder_hidden_states,
                isg_scale,
                model_kwargs,
                negative_model_kwargs,
                None,
            )
            x_mid = renoise(teacher_x0, x, t, t_mid, sample_type="ode")
            student_x0 = self._predict_x0(
                self.student, x_mid, t_mid, encoder_hidden_states, model_kwargs
            )
            target = renoise(student_x0, x_mid, t_mid, t_prev, sample_type="ode")
        own = renoise(gen, x, t, t_prev, sample_type="ode")  # keeps the graph to ``gen``
        return pseudo_huber_loss(own, target, cfg.isg_huber_c)

    def apply_ida(self) -> None:
        """Implicit distribution alignment (``config.ida_ratio`` > 0; no-op otherwise): pull
        the fake score toward the student, ``phi <- (1 - r) phi + r theta``. Call after each
        student update (every rank: the update is elementwise on each rank's shards)."""
        if self.config.ida_ratio <= 0:
            return
        from ..alignment import align_fake_score

        align_fake_score(self.fake_score, self.student, self.config.ida_ratio)

    # -- public API -------------------------------------------------------------------------

    def compute_student_loss(
        self,
        latents: torch.Tensor | None,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        negative_model_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Compute the student update losses: ``{"vsd", "total"}`` plus ``"gan_gen"`` with GAN
        and ``"isg"`` with intra-segment guidance (``config.isg_weight`` > 0).

        Gradient reaches the student only: ``teacher_x0`` is detached, the fake score runs under
        ``no_grad``, and the discriminator's weights are kept out of the graph. The GAN term
        reaches the student through the teacher's captured features (the teacher forward keeps
        its graph; its weights are frozen).

        Args:
            latents: real clean latents ``x0``; used only by multi-step students without
                backward simulation (may be ``None`` otherwise).
            noise: Gaussian noise in the latent layout (same shape as ``latents``).
            encoder_hidden_states: positive conditioning, passed to all networks.
            negative_encoder_hidden_states: conditioning of the unconditional teacher pass;
                required when CFG is on.
            guidance_scale: overrides ``config.guidance_scale`` for this call.
            negative_model_kwargs: values replacing ``model_kwargs`` entries in the
                unconditional teacher pass (negative pooled projections, attention masks).
            **model_kwargs: forwarded verbatim to student, teacher and fake score.
        """
        self._check_inputs(latents, noise)
        if guidance_scale is not None and not guidance_scale >= 1.0:
            # The config's rule (DistillationConfig.guidance_scale >= 1): DMD2's CFG is
            # cond + (s - 1)(cond - uncond), so s < 1 pushes away from the prompt.
            raise ValueError(
                f"guidance_scale={guidance_scale} must be >= 1 (1.0 = conditional only) or None "
                "for the config's value"
            )
        cfg = self.config
        batch = noise.shape[0]
        scale: float | torch.Tensor | None = (
            guidance_scale if guidance_scale is not None else cfg.guidance_scale
        )
        if guidance_scale is None and cfg.guidance_scale_range is not None:
            scale = self._draw_guidance_scale(batch, noise.device)
        negative_kwargs = {**model_kwargs, **(negative_model_kwargs or {})}
        if (
            scale is not None
            and negative_encoder_hidden_states is None
            and (encoder_hidden_states is not None or negative_model_kwargs is None)
        ):
            shown = cfg.guidance_scale_range if isinstance(scale, torch.Tensor) else scale
            raise ValueError(
                f"guidance_scale={shown} needs negative conditioning: pass "
                "negative_encoder_hidden_states (or set guidance_scale=None to disable CFG)"
            )

        self._sample_cache = None  # the student is about to change
        x_in, t_in = self._student_input(latents, noise, encoder_hidden_states, model_kwargs)
        gen = self._predict_x0(self.student, x_in, t_in, encoder_hidden_states, model_kwargs)
        t = self._timesteps(batch, gen.device)
        x_t = add_noise(gen, self._randn_like(gen), t)

        capture = self._capture("student step") if self.gan_enabled else None
        teacher_x0, features = self._guided_teacher_x0(
            x_t,
            t,
            encoder_hidden_states,
            negative_encoder_hidden_states,
            scale,
            model_kwargs,
            negative_kwargs,
            capture,
        )
        with torch.no_grad():
            fake_x0 = self._predict_x0(
                self.fake_score, x_t.detach(), t, encoder_hidden_states, model_kwargs
            )

        vsd = vsd_loss(gen, teacher_x0, fake_x0)
        if self.record_student_step:
            self.last_student_step = {
                "student_input": x_in.detach(),
                "student_t": t_in,
                "gen": gen.detach(),
                "teacher_x0": teacher_x0,
                "fake_x0": fake_x0,
            }
        losses = {"vsd": vsd}
        total = vsd
        if cfg.isg_weight > 0:
            isg = self._isg_loss(
                x_in,
                t_in,
                gen,
                encoder_hidden_states,
                negative_encoder_hidden_states,
                scale,
                model_kwargs,
                negative_kwargs,
            )
            losses["isg"] = isg
            total = total + cfg.isg_weight * isg
        if features is not None:
            assert self.discriminator is not None  # features come only with gan_enabled
            weight = None
            if cfg.gan_rung_weighting == "one_minus_t_squared":
                weight = (1.0 - t_in.float()) ** 2
            with _params_frozen(self.discriminator):
                gan_gen = gan_gen_loss(self.discriminator(features), weight)
            losses["gan_gen"] = gan_gen
            total = total + cfg.gan_loss_weight_gen * gan_gen
        losses["total"] = total
        return losses

    def compute_fake_score_loss(
        self,
        latents: torch.Tensor | None,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Fake-score update loss ``{"fake_score", "total"}`` (equal).

        Denoising score matching on the student's samples (generated under ``no_grad``), in
        ``config.fake_score_pred_type`` space (``None``: ``config.pred_type``). Gradient
        reaches the fake score only.
        """
        self._check_inputs(latents, noise)
        cfg = self.config
        with torch.no_grad():
            gen = self._generate_detached(latents, noise, encoder_hidden_states, model_kwargs)
            t = self._timesteps(noise.shape[0], gen.device)
            eps = self._randn_like(gen)
            x_t = add_noise(gen, eps, t)
        loss_type = cfg.fake_score_pred_type or cfg.pred_type
        raw = self._call(self.fake_score, x_t, t, encoder_hidden_states, model_kwargs)
        pred = convert_prediction(raw, x_t, t, from_type=cfg.pred_type, to_type=loss_type)
        loss = dsm_loss(loss_type, pred, x0=gen, eps=eps, t=t, alpha_fn=rf_alpha, sigma_fn=rf_sigma)
        return {"fake_score": loss, "total": loss}

    def compute_discriminator_loss(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Discriminator update loss ``{"gan_disc", "total"}`` plus ``"r1"`` when R1 is on.

        Student and teacher run under ``no_grad``; gradient reaches the discriminator only.
        Real latents are noised with their own ``t`` / ``eps`` (shared with the fake branch
        when ``gan_use_same_t_noise``). The approximate R1 term compares the logits of the
        noised real input with those of the same input plus ``gan_r1_reg_alpha`` noise, at the
        same ``t``.
        """
        if self.discriminator is None:
            raise RuntimeError(
                "compute_discriminator_loss needs a discriminator: pass discriminator=... to "
                "DMDPipeline"
            )
        if latents is None:
            raise ValueError("compute_discriminator_loss needs real latents for the real branch")
        self._check_inputs(latents, noise)
        cfg = self.config
        batch = noise.shape[0]
        with torch.no_grad():
            gen = self._generate_detached(latents, noise, encoder_hidden_states, model_kwargs)
            t = self._timesteps(batch, gen.device)
            eps = self._randn_like(gen)
            fake_features = self._teacher_features(
                add_noise(gen, eps, t), t, encoder_hidden_states, model_kwargs, "fake branch"
            )
            if cfg.gan_use_same_t_noise:
                t_real, eps_real = t, eps
            else:
                t_real = self._timesteps(batch, gen.device)
                eps_real = self._randn_like(latents)
            x_real = add_noise(latents, eps_real, t_real)
            real_features = self._teacher_features(
                x_real, t_real, encoder_hidden_states, model_kwargs, "real branch"
            )
        real_logits = self.discriminator(real_features)
        fake_logits = self.discriminator(fake_features)
        gan_disc = gan_disc_loss(real_logits, fake_logits)
        if cfg.gan_r1_reg_weight <= 0:
            return {"gan_disc": gan_disc, "total": gan_disc}
        with torch.no_grad():
            x_perturbed = x_real + cfg.gan_r1_reg_alpha * self._randn_like(x_real)
            perturbed_features = self._teacher_features(
                x_perturbed, t_real, encoder_hidden_states, model_kwargs, "R1"
            )
        r1 = r1_loss(real_logits, self.discriminator(perturbed_features))
        total = gan_disc + cfg.gan_r1_reg_weight * r1
        return {"gan_disc": gan_disc, "r1": r1, "total": total}

    def teacher_x0_at_student_input(
        self, encoder_hidden_states: torch.Tensor | None = None, **model_kwargs: Any
    ) -> torch.Tensor:
        """The teacher's conditional x0 (no CFG, no grad) at the input of the last recorded
        student step (``record_student_step``): what the teacher predicts from the same noise.
        Pass the conditioning that step used."""
        if self.last_student_step is None:
            raise RuntimeError(
                "teacher_x0_at_student_input needs a recorded student step: set "
                "record_student_step = True before compute_student_loss"
            )
        x, t = self.last_student_step["student_input"], self.last_student_step["student_t"]
        with torch.no_grad():
            return self._predict_x0(self.teacher, x, t, encoder_hidden_states, model_kwargs)

    def update_ema(self, *, iteration: int | None = None) -> None:
        """Update the student EMA (no-op without ``config.ema``); call after the student step.

        Without ``iteration`` an internal counter is incremented (the first call is
        iteration 1).
        """
        if self._ema is None:
            return
        self._iteration = iteration if iteration is not None else self._iteration + 1
        self._ema.update(self._ema_target, iteration=self._iteration)
