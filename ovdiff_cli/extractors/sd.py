"""Stable Diffusion UNet features: cross-attention queries of selected layers at timestep 200 (authors' code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attribution
from ..defaults import SD_FEATURE_NOISE_SEED, SD_FEATURE_TIMESTEP
from .base import Extractor, register_extractor


@register_extractor("sd")
class SDExtractor(Extractor):
    """The VAE latent of the input resized to the support image size (512 for SD 1.5), noised to t = 200, one
    UNet pass with the empty prompt; the queries of the chosen cross-attention layers, each resized bilinear to
    the latent grid and concatenated raw (REFERENCE 4). Features are therefore always on the latent grid."""

    role = "sd"

    def __init__(self, models) -> None:
        super().__init__(models)
        self._fixed: dict[tuple, tuple] = {}

    def params(self) -> dict:
        return {
            "layers": list(self.models.spec.sd_feature_layers),
            "timestep": SD_FEATURE_TIMESTEP,
            "noise_seed": SD_FEATURE_NOISE_SEED,
            "prompt": "",
            "input": self.models.spec.image_size,
        }

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        return self.models.spec.image_size, self.models.spec.image_size

    def window_input(self) -> tuple[int, int]:
        return self.models.spec.image_size, self.models.spec.image_size

    def _fixed_inputs(self, gen, latents: torch.Tensor) -> tuple:
        """The inputs that are the same for every image, made once per device, dtype and latent shape: the noise
        scheduler, the noise (1, C, h, w), drawn on the CPU from its own generator so it is independent of batch and
        device, and the empty prompt's embedding (1, 77, D). Remaking them per call cost a text-encoder pass and two
        host-to-device copies, each of which waits for the device to finish its queue."""
        from diffusers import DDPMScheduler

        key = (latents.device, latents.dtype, tuple(latents.shape[1:]))
        if key not in self._fixed:
            noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(SD_FEATURE_NOISE_SEED))
            scheduler = DDPMScheduler.from_config(gen.scheduler_config)
            self._fixed[key] = (scheduler, noise[None].to(latents), gen.encode_text([""]))
        return self._fixed[key]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gen = self.models.get("sd", decoder=False)  # features need the encoder half of the VAE only
        b = images.shape[0]
        x = (images * 2 - 1).to(gen.dtype)
        # The posterior mean, not a sample: features must be a function of the image alone.
        latents = gen.vae.encode(x).latent_dist.mean * gen.vae.config.scaling_factor
        gh, gw = latents.shape[-2:]
        scheduler, noise, context = self._fixed_inputs(gen, latents)
        t = torch.full((b,), SD_FEATURE_TIMESTEP, device=latents.device)  # made there: no copy from the host
        noisy = scheduler.add_noise(latents, noise.expand(b, -1, -1, -1), t)
        context = context.expand(b, -1, -1)
        layers = self.models.spec.sd_feature_layers
        tap = attribution.install(gen.unet)
        with attribution.recording_queries(tap, layers, (gh, gw)):
            gen.unet(noisy, t, encoder_hidden_states=context)
            queries = dict(tap.queries)
        parts = []
        for index in layers:
            q = queries[index]
            h, w = tap.layer_hw(q.shape[1])
            q = q.float().view(b, h, w, -1).permute(0, 3, 1, 2)
            parts.append(F.interpolate(q, size=(gh, gw), mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1)
