"""Support set generation (paper 3.2) with attribution capture (3.3).

Image ``i`` of class ``c`` starts from noise drawn with its own generator seeded by :func:`image_seed`, so any
image can be regenerated alone and N can grow. Images run through the UNet in fixed-shape batches aligned to
their index (image i always sits in slot i mod B of batch i div B, next to the same neighbours): an image's
bytes then depend on nothing but its own key, whatever subset of a batch was asked for (the batch size B is in
the key: see ``pipeline.support_key``).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import attribution
from .defaults import GUIDANCE, NEGATIVE_PROMPT, PROMPT_TEMPLATE, SCHEDULER, SCHEDULERS
from .models.loading import Generator

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


def prompt_for(class_name: str) -> str:
    return PROMPT_TEMPLATE.format(class_name)


def image_seed(seed: int, class_name: str, index: int) -> int:
    """The seed of support image ``index`` of ``class_name`` under run seed ``seed`` (63-bit, stable)."""
    digest = hashlib.sha256(f"{seed}\0{class_name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def prompt_notes(class_names: list[str]) -> list[str]:
    """A note for every class whose prompt is longer than the text encoder's 77-token context (so it is cut).

    Cheap for ordinary names: a BPE token covers at least one byte, so only names long enough to overflow are
    tokenised.
    """
    from .models.loading import CONTEXT_LENGTH

    budget = CONTEXT_LENGTH - 2  # start and end tokens
    long = [c for c in class_names if len(prompt_for(c).encode("utf-8")) > budget]
    if not long:
        return []
    from .models.loading import PromptTokenizer

    tok = PromptTokenizer()
    notes = []
    for name in long:
        ids = tok.encode(prompt_for(name))
        if len(ids) > budget:
            kept = len(attribution.class_token_positions(tok, prompt_for(name), name))
            total = len(tok.encode(name))
            shown = name if len(name) <= 40 else name[:37] + "..."
            notes.append(
                f"class {shown!r} is {total} tokens long and its prompt exceeds the {budget}-token limit:"
                f" only its first {kept} tokens are used"
            )
    return notes


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """The sampler ``name`` built from SD's own scheduler config (as the authors' code builds it).

    ``dpmsolver++``: DPM-Solver++ multistep, second order, as diffusers 0.14 (the reference's pin, REFERENCE 1)
    computes it: timesteps spaced ``linspace`` over the training range, the schedule ending at the smallest
    training sigma (``final_sigmas_type="sigma_min"``; the newer default ``"zero"`` makes the last step a
    first-order jump to sigma 0), and only runs of fewer than 15 steps taking their last step at first order
    (``lower_order_final``; ``euler_at_final`` off), so at 30 steps every step after the first is second order.
    ``ddim``: DDIM with eta 0. Both are deterministic given the initial noise, so per-image seeds still fix every
    image. Raises ValueError naming the accepted names.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="linspace",
            final_sigmas_type="sigma_min",
            lower_order_final=True,
            euler_at_final=False,
        )
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"--scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")


@dataclass
class SupportImage:
    """One generated support image.

    Attributes:
        image: (H, W, 3) uint8 RGB in host memory, the decoded image floored to bytes (x255, then truncated, as
            the reference's ``to_pil_image``): what the cache stores as PNG and what the feature extractors see.
        residual: (H, W, 3) uint8 in host memory, what flooring dropped in 1/256 of a grey level (see
            :func:`quantise`): with ``image`` it restores the float image CutLER sees (:func:`restore_float`).
        attribution: (G, G) float32 in [0, 1], min-max normalised class-token attribution on the latent grid
            (:func:`attribution.at_image_size` gives the image-resolution map the masks are chosen on).
        pixels: ``image`` as (3, H, W) uint8 on the device that generated it, so a run's later stages start from
            it there instead of from the decoded PNG (the same values: PNG is lossless).
        residual_pixels: ``residual`` as (3, H, W) uint8 on that device.
    """

    image: np.ndarray
    residual: np.ndarray
    attribution: np.ndarray
    pixels: torch.Tensor
    residual_pixels: torch.Tensor


def quantise(decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's output -> (bytes, residual), both (..., 3, H, W) uint8 on its device (REFERENCE 1).

    ``decoded`` is in [-1, 1] (any float dtype). The reference maps it to ``x = (decoded / 2 + 0.5).clamp(0, 1)``
    and saves ``floor(255 x)``; its CutLER sees the float ``x``. The residual keeps ``255 x - floor(255 x)`` in
    [0, 1) to 1/256 (floored), so the float image is kept to 1/512 of a grey level in one more byte per channel.
    """
    scaled = (decoded.float() / 2 + 0.5).clamp(0, 1) * 255
    whole = scaled.floor()
    return whole.to(torch.uint8), ((scaled - whole) * 256).floor().to(torch.uint8)


def restore_float(image: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(bytes, residual) from :func:`quantise` -> the float image in [0, 1], float32, same shape: each value the
    centre of its residual's 1/256 step, ``(image + (residual + 0.5) / 256) / 255``."""
    return (image.float() + (residual.float() + 0.5) / 256) / 255


def _initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    # One CPU generator per image: the draw does not depend on the device or on the batch it is part of.
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(
    gen: Generator,
    class_name: str,
    seeds: list[int],
    *,
    steps: int,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE_PROMPT,
    scheduler: str = SCHEDULER,
    image_size: int,
    capture: bool = True,
) -> list[SupportImage]:
    """Generate one batch of support images of ``class_name`` with their attribution maps.

    Args:
        seeds: one seed per batch slot (the batch shape is ``len(seeds)``).
        steps: denoising steps of ``scheduler`` (a deterministic sampler: the initial noise fixes the image).
        scheduler: "dpmsolver++" (the reference) or "ddim".
        image_size: output side in pixels (a multiple of the VAE's scale factor).
        capture: record the attribution maps; False gives the same images with all-zero maps (to measure
            what capturing costs).
    Returns:
        ``len(seeds)`` :class:`SupportImage`, in seed order.
    """
    prompt = prompt_for(class_name)
    tokens = attribution.class_token_positions(gen.tokenizer, prompt, class_name)
    b = len(seeds)
    g = image_size // gen.vae_scale
    sampler = make_scheduler(scheduler, gen.scheduler_config)
    sampler.set_timesteps(steps)
    emb = gen.encode_text([negative_prompt, prompt])  # (2, 77, D): unconditional first, as in diffusers
    context = torch.cat([emb[:1].expand(b, -1, -1), emb[1:].expand(b, -1, -1)])
    latents = _initial_noise(seeds, (gen.unet.config.in_channels, g, g)).to(gen.device, gen.dtype)
    latents = latents * sampler.init_noise_sigma
    tap = attribution.install(gen.unet)
    # The UNet gets its timesteps on the device, copied there once: given the sampler's host tensor, it would copy
    # each step's timestep itself, and a copy from the host waits for the device to finish its queue, so the host
    # could never queue a step ahead. The sampler keeps its own host timesteps.
    device_timesteps = sampler.timesteps.to(gen.device)
    with attribution.capturing(tap, tokens, slice(b, 2 * b), (g, g)) if capture else nullcontext():
        for t, t_device in zip(sampler.timesteps, device_timesteps, strict=True):
            inp = sampler.scale_model_input(torch.cat([latents, latents]), t)
            eps_u, eps_c = gen.unet(inp, t_device, encoder_hidden_states=context).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = sampler.step(eps, t, latents).prev_sample
        maps = attribution.minmax(attribution.aggregate(tap)) if capture else torch.zeros(b, g, g)
    decoded = gen.vae.decode(latents / gen.vae.config.scaling_factor).sample
    pixels, residual = quantise(decoded)  # (B, 3, H, W) uint8 each, on the device
    host, rest = pixels.permute(0, 2, 3, 1).cpu().numpy(), residual.permute(0, 2, 3, 1).cpu().numpy()
    maps = maps.cpu().numpy()
    return [SupportImage(host[i], rest[i], maps[i], pixels[i], residual[i]) for i in range(b)]
