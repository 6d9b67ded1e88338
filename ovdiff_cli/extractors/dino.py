"""DINO ViT keys of the last block (timm), fed as the authors' code feeds it (REFERENCE 4)."""

from __future__ import annotations

import torch

from .base import Extractor, normalise_pixels, patch_multiple, register_extractor, resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vit_keys(vit: torch.nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Keys of block ``block`` of a timm ViT: images (B, 3, H, W) normalised -> (B, H/p, W/p, D)."""
    b, _, h, w = images.shape
    p = vit.patch_embed.patch_size[0]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    blocks = list(vit.blocks)
    for blk in blocks[:block] if block != -1 else blocks[:-1]:
        x = blk(x)
    blk = blocks[block]
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).view(b, x.shape[1], 3, attn.num_heads, -1)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2)).transpose(1, 2).flatten(2)  # (B, N, D)
    return k[:, vit.num_prefix_tokens :].reshape(b, h // p, w // p, -1)


@register_extractor("dino")
class DinoExtractor(Extractor):
    """Last-block keys, ImageNet mean/std. An input whose sides are both at most ``dino_short`` goes at its own
    size; a larger one is resized to short side ``dino_short`` with the long side at most ``dino_max_long``.
    Sides are rounded to whole patches."""

    role = "dino"

    def params(self) -> dict:
        spec = self.models.spec
        return {"layer": "last", "what": "keys", "short": spec.dino_short, "max_long": spec.dino_max_long}

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        spec = self.models.spec
        scale = 1.0
        if max(height, width) > spec.dino_short:
            scale = min(spec.dino_short / min(height, width), spec.dino_max_long / max(height, width))
        patch = self.models.spec.components["dino"].config.get("patch_size", 8)
        return patch_multiple(height * scale, patch), patch_multiple(width * scale, patch)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalise_pixels(images, IMAGENET_MEAN, IMAGENET_STD).to(self.models.dtype("dino"))
        return vit_keys(self.models.get("dino"), x).float()

    @torch.no_grad()
    def maskcut_keys(self, images: torch.Tensor) -> torch.Tensor:
        """MaskCut's input: (B, 3, S, S) in [0, 1] -> (B, m/p, m/p, D) keys of the image resized to the spec's
        square ``maskcut_input`` m (480 for ViT-B/8: 60x60 patches)."""
        m = self.models.spec.maskcut_input
        return self.forward(resize(images, (m, m)))
