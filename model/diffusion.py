"""Diffusion in the joint space: the noise schedule, the training loss, guided sampling.

DDPM forward process z_n = sqrt(abar_n) z_0 + sqrt(1 - abar_n) eps, epsilon prediction,
MSE loss, condition dropped with probability p_cfg (section 3.2); sampling with
diffusers' DPM-Solver++ (2nd order, N steps; section 8) or DDPM ancestral steps (eq. 7),
under classifier-free guidance eps = (1 + gamma) eps_cond - gamma eps_uncond (eq. 4),
both halves in one batched forward.

What the network predicts is the prior's `prediction_type`: the paper's noise, or z_0
(DALL-E 2's prior). The z_0 loss is the noise loss divided by the step's signal-to-noise
ratio, so it weighs the noisy steps, where only the condition says where to go, far
more: on the demo's world the prior learns its condition several times faster
(docs/benchmarks.md). Guidance combines either prediction the same way: at a fixed z_n
one is an affine function of the other.

Scale: f_M's vectors are unit vectors, so each coordinate is about 1/sqrt(d_VL) while
the noise is N(0, I): at d_VL = 1536 the signal would vanish under the first few
percent of the schedule. Vectors are therefore multiplied by `embedding_scale` (default
sqrt(d_VL): unit variance per coordinate, as DALL-E 2's prior does) before noising, and
samples are divided by it and L2-normalised before ranking. z_{r,Delta} is scaled the
same way before it reaches the adapter, which tokenises it with the prior's own
projector: that projector was trained on scaled vectors. The paper leaves this,
p_cfg and the number of training timesteps unstated; all three are in conf `diffusion`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from model.prior import ControlAdapter, FusionDiffPrior, compile_mode


@dataclass(frozen=True)
class DiffusionConfig:
    """conf `diffusion` (documented in conf/base.yaml)."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    p_cfg: float
    embedding_scale: float  # 0: sqrt(d_VL)

    def scale(self, d_vl: int) -> float:
        return self.embedding_scale or math.sqrt(d_vl)


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon",
                         clip_sample=False)


def diffusion_loss(prior: FusionDiffPrior, cfg: DiffusionConfig, z0: torch.Tensor, cond: torch.Tensor | None,
                   cond_mask: torch.Tensor | None, adapter: ControlAdapter | None = None,
                   z_query: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   scheduler: DDPMScheduler | None = None) -> torch.Tensor:
    """The MSE of one batch (eqs. 3 and 5): to the noise, or to z_0 when the prior
    predicts the sample (its config's prediction_type).

    With probability p_cfg a row's condition is dropped: its text in Stage 1, its text
    and z_{r,Delta} together in Stage 2, so that the unconditional branch is
    eps(z, n, none, none) as in Algorithm 4.
    """
    scheduler = scheduler or ddpm_scheduler(cfg)
    b, device = z0.shape[0], z0.device
    x0 = z0.float() * cfg.scale(z0.shape[-1])
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=generator, device=device)
    x_t = scheduler.add_noise(x0, noise, t)
    drop = torch.rand(b, generator=generator, device=device) < cfg.p_cfg
    if z_query is not None:
        z_query = z_query.float() * cfg.scale(z_query.shape[-1])
    # `prior` may be wrapped (DDP): its parameters, not its attributes, give the dtype.
    dtype = next(prior.parameters()).dtype
    pred = prior(x_t.to(dtype), t, cond, cond_mask, drop_cond=drop, adapter=adapter,
                 z_query=None if z_query is None else z_query.to(dtype),
                 control_rows=~drop if adapter is not None else None)
    # `prior` may be wrapped (DDP): the module inside holds the config.
    kind = getattr(prior, "module", prior).config.prediction_type
    return F.mse_loss(pred.float(), x0 if kind == "sample" else noise)


@dataclass(frozen=True)
class SamplerConfig:
    """conf `sampling` (documented in conf/base.yaml)."""

    sampler: str  # dpmsolver++ or ddpm
    num_steps: int
    guidance_scale: float  # gamma
    control_scale: float  # delta
    samples_per_query: int
    aggregation: str  # mean or none
    compile: str  # none, or a torch.compile mode (COMPILE_MODES)
    cache_text: bool  # cross-attention keys/values of the text once per run, not per step


class GuidedSampler:
    """Draws target features from the prior (+ adapter) under classifier-free guidance.

    One scheduler per sampler (diffusers schedulers hold state): use one sampler per
    thread.
    """

    def __init__(self, diffusion: DiffusionConfig, sampling: SamplerConfig):
        self.diffusion, self.cfg = diffusion, sampling
        common = dict(
            num_train_timesteps=diffusion.num_train_timesteps,
            beta_schedule=diffusion.beta_schedule,
            beta_start=diffusion.beta_start,
            beta_end=diffusion.beta_end,
            prediction_type="epsilon",
        )
        if sampling.sampler == "dpmsolver++":
            self.scheduler = DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=2
            )
        elif sampling.sampler == "ddpm":
            self.scheduler = DDPMScheduler(**common, clip_sample=False)
        else:
            raise ValueError(f"sampling.sampler={sampling.sampler!r}: expected 'dpmsolver++' or 'ddpm'")
        if sampling.aggregation not in ("mean", "none"):
            raise ValueError(f"sampling.aggregation={sampling.aggregation!r}: expected 'mean' or 'none'")
        # The denoiser the loop calls: plain, or compiled once per sampler. Compiled
        # graphs are specialised to a batch size, so `sample` pads the rows to a power
        # of two: at most log2(batch) graphs, and the last, short batch of a run reuses one.
        self.denoise = self.guided_eps
        if sampling.compile != "none":
            self.denoise = torch.compile(
                self.guided_eps, mode=compile_mode(sampling.compile, "sampling.compile"), dynamic=False
            )

    def guided_eps(self, prior, x, t, text, adapter, z_query) -> torch.Tensor:
        """(1 + gamma) eps(x, t, c, z_q) - gamma eps(x, t, none, none), one forward of 2B rows
        (of the prior's predictions: noise, or z_0).

        `text` is `guided_text`'s: both halves' text side, computed once per run.
        """
        gamma = self.cfg.guidance_scale
        if gamma == 0:
            return prior(
                x, t, adapter=adapter, z_query=z_query, control_scale=self.cfg.control_scale, text=text
            )
        b = x.shape[0]
        t2 = t if t.dim() == 0 else torch.cat([t, t])
        # The conditional half is the first b rows: the adapter runs on those alone.
        eps = prior(
            torch.cat([x, x]),
            t2,
            adapter=adapter,
            z_query=z_query,
            control_rows=b if adapter is not None else None,
            control_scale=self.cfg.control_scale,
            text=text,
        )
        cond_eps, uncond_eps = eps[:b], eps[b:]
        return (1 + gamma) * cond_eps - gamma * uncond_eps

    def predict(self, prediction_type: str) -> None:
        """Reads the denoiser's output as `prediction_type` (the prior's, from its checkpoint)."""
        if self.scheduler.config.prediction_type != prediction_type:
            self.scheduler = type(self.scheduler).from_config(
                self.scheduler.config, prediction_type=prediction_type
            )

    def guided_text(self, prior, cond, cond_mask, b: int, adapter):
        """The text side of guidance's 2B rows: the conditions, then B rows dropped to none."""
        if self.cfg.guidance_scale == 0:
            return prior.text_condition(cond, cond_mask, b, adapter=adapter, cache_kv=self.cfg.cache_text)
        cond2 = None if cond is None else torch.cat([cond, cond])
        mask2 = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
        drop = torch.arange(2 * b, device=prior.device) >= b
        return prior.text_condition(cond2, mask2, 2 * b, drop, adapter=adapter, cache_kv=self.cfg.cache_text)

    @torch.no_grad()
    def sample(
        self,
        prior: FusionDiffPrior,
        cond: torch.Tensor | None,
        cond_mask: torch.Tensor | None,
        adapter: ControlAdapter | None = None,
        z_query: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Unit vectors: (B, d_VL) with aggregation 'mean', (B, S, d_VL) with 'none'.

        `generator`: one for the batch, or a list of one per query, so that a query's
        noise (its start and, for DDPM, each step's) is drawn from its own generator
        and its vector is the same whichever queries share its batch.
        """
        s = self.cfg.samples_per_query
        b = batch_size or (cond.shape[0] if cond is not None else z_query.shape[0])
        rep = lambda t: None if t is None else t.repeat_interleave(s, dim=0)
        cond, cond_mask, z_query = rep(cond), rep(cond_mask), rep(z_query)
        d = prior.config.d_vl
        if z_query is not None:
            z_query = (z_query.float() * self.diffusion.scale(d)).to(prior.dtype)
        device = prior.device
        self.predict(prior.config.prediction_type)
        if isinstance(generator, list):
            # A query's S samples draw from its generator one after the other.
            generator = [g for g in generator for _ in range(s)]
        x = randn_tensor((b * s, d), generator=generator, device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(self.cfg.num_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        n = b * s
        if self.cfg.compile != "none":
            # Rows are independent (no batch statistics): zero rows pad, then are cut off.
            pad = (1 << (n - 1).bit_length()) - n
            grow = lambda t: None if t is None else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
            cond, cond_mask, z_query, x = grow(cond), grow(cond_mask), grow(z_query), grow(x)
            if isinstance(generator, list):  # pad rows draw from generators of their own
                generator = generator + [
                    torch.Generator(generator[0].device).manual_seed(0) for _ in range(pad)
                ]
        text = self.guided_text(prior, cond, cond_mask, x.shape[0], adapter)
        for t in self.scheduler.timesteps:
            eps = self.denoise(prior, x.to(prior.dtype), t.to(device), text, adapter, z_query).float()
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        z = F.normalize(x[:n] / self.diffusion.scale(d), dim=-1).view(b, s, d)
        if self.cfg.aggregation == "mean":
            return F.normalize(z.mean(dim=1), dim=-1)
        return z
