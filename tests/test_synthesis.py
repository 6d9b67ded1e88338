"""The support-image sampler against diffusers 0.14's DPM-Solver++ (the reference's pin), re-stated here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovdiff_cli import synthesis
from ovdiff_cli.models.sd15_random import SD15_SCHEDULER


class Diffusers014DPMSolverPP:
    """diffusers 0.14's ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint, epsilon prediction, SD's
    scaled-linear betas), written out in float64 from its source: discrete timesteps, alpha/sigma/lambda read
    from the training schedule at those timesteps, the step after the last timestep going to timestep 0 (so to
    the smallest training sigma, never to sigma 0), first order only for the very first step and, in runs of
    fewer than 15 steps, for the last one."""

    def __init__(self, steps: int) -> None:
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.alpha = np.sqrt(alphas_cumprod)
        self.sigma = np.sqrt(1.0 - alphas_cumprod)
        self.lam = np.log(self.alpha) - np.log(self.sigma)
        self.timesteps = np.linspace(0, 999, steps + 1).round()[::-1][:-1].astype(np.int64)
        self.x0_preds: list[torch.Tensor] = []
        self.orders: list[int] = []

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        ts = self.timesteps
        s0 = ts[index]
        t = 0 if index == len(ts) - 1 else ts[index + 1]
        x0 = (x - self.sigma[s0] * eps) / self.alpha[s0]  # dpmsolver++ works on the predicted clean sample
        self.x0_preds.append(x0)
        h = self.lam[t] - self.lam[s0]
        first = index == 0 or (index == len(ts) - 1 and len(ts) < 15)
        self.orders.append(1 if first else 2)
        out = (self.sigma[t] / self.sigma[s0]) * x - self.alpha[t] * np.expm1(-h) * x0
        if not first:
            s1 = ts[index - 1]
            r0 = (self.lam[s0] - self.lam[s1]) / h
            d1 = (x0 - self.x0_preds[-2]) / r0
            out = out - 0.5 * self.alpha[t] * np.expm1(-h) * d1  # midpoint second-order correction
        return out


def _run_both(steps: int, sampler) -> tuple[Diffusers014DPMSolverPP, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Planted model outputs through both samplers; each step of ours gets the reference's own input sample."""
    ref = Diffusers014DPMSolverPP(steps)
    sampler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    pairs = []
    for i, t in enumerate(sampler.timesteps):
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        ours = sampler.step(eps.float(), t, x.float()).prev_sample
        x = ref.step(eps, i, x)
        pairs.append((ours, x))
    return ref, pairs


@pytest.mark.parametrize("steps", [30, 10])
def test_dpmsolver_matches_diffusers_014_at_every_step(steps):
    sampler = synthesis.make_scheduler("dpmsolver++", SD15_SCHEDULER)
    ref, pairs = _run_both(steps, sampler)
    assert sampler.timesteps.tolist() == ref.timesteps.tolist()
    assert float(sampler.init_noise_sigma) == 1.0
    # At 30 steps every step after the first is second order, the last included (0.14 lowers the last step's order
    # only below 15 steps, which the 10-step run checks).
    last_order = 2 if steps >= 15 else 1
    assert ref.orders == [1] + [2] * (steps - 2) + [last_order]
    for i, (ours, expected) in enumerate(pairs):
        # Ours runs in float32 from float32 sigmas, the re-statement in float64 from the betas: they agree to ~3e-6
        # relative on samples of magnitude up to ~50 (a wrong order or end point misses by ~1, below).
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5, msg=f"step {i}")


def test_newer_zero_final_sigma_would_miss_the_reference_last_step():
    """The check above tells the two end points apart: diffusers' newer default (a first-order last step to sigma 0)
    lands far outside its tolerance."""
    from diffusers import DPMSolverMultistepScheduler

    newer = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, algorithm_type="dpmsolver++", solver_order=2)
    assert newer.config.final_sigmas_type == "zero"
    _, pairs = _run_both(30, newer)
    torch.testing.assert_close(pairs[-2][0].double(), pairs[-2][1], rtol=1e-4, atol=1e-5)
    ours, expected = pairs[-1]
    assert float((ours.double() - expected).abs().max()) > 0.1


def test_ddim_is_still_offered_and_unknown_names_are_refused():
    from diffusers import DDIMScheduler

    assert isinstance(synthesis.make_scheduler("ddim", SD15_SCHEDULER), DDIMScheduler)
    with pytest.raises(ValueError, match="dpmsolver\\+\\+, ddim"):
        synthesis.make_scheduler("euler", SD15_SCHEDULER)
