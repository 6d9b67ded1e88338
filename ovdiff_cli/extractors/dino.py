"""DINO ViT keys of the last block (timm)."""

from __future__ import annotations

import torch

from .base import Extractor, l2n, normalise_pixels, register_extractor

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
    role = "dino"
    stride = 8

    def params(self) -> dict:
        return {"layer": "last", "what": "keys"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.models.get("dino")
        self.stride = vit.patch_embed.patch_size[0]
        x = normalise_pixels(images, IMAGENET_MEAN, IMAGENET_STD).to(self.models.dtype)
        return l2n(vit_keys(vit, x))
