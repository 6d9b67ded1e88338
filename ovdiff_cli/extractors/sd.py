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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from diffusers import DDPMScheduler

        gen = self.models.get("sd", decoder=False)  # features need the encoder half of the VAE only
        b = images.shape[0]
        x = (images * 2 - 1).to(gen.dtype)
        # The posterior mean, not a sample: features must be a function of the image alone.
        latents = gen.vae.encode(x).latent_dist.mean * gen.vae.config.scaling_factor
        gh, gw = latents.shape[-2:]
        # Same fixed noise for every image, drawn per image on the CPU: independent of batch and device.
        gens = [torch.Generator().manual_seed(SD_FEATURE_NOISE_SEED) for _ in range(b)]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
        t = torch.tensor([SD_FEATURE_TIMESTEP] * b, device=latents.device)
        noisy = DDPMScheduler.from_config(gen.scheduler_config).add_noise(latents, noise, t)
        context = gen.encode_text([""]).expand(b, -1, -1)
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
