"""DINO ViT keys of the last block (timm), fed as the authors' code feeds it (REFERENCE 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cutler.ops import resized_shape
from .base import Extractor, normalise_pixels, register_extractor, resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_pos_embed(vit: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The ViT's position embeddings for a ``grid`` = (gh, gw) of patches, interpolated as DINO's own code does
    (its ``interpolate_pos_encoding``, which the reference's extractor uses): the trained g0 x g0 grid resized
    bicubic without antialiasing, ``align_corners=False``, by the scale factors ((gh + 0.1) / g0, (gw + 0.1) / g0)
    (DINO adds 0.1 against float error; torch maps pixels with these factors, not with gh / g0). timm's own
    resampling antialiases, which changes the bicubic kernel: up to 0.3 apart on a 28 -> 64 upsampling.

    Returns (1, prefix + gh * gw, D) in the embeddings' dtype; the trained embeddings themselves when the grid is
    the trained one.
    """
    pos = vit.pos_embed
    g0 = tuple(vit.patch_embed.grid_size)
    if tuple(grid) == g0:
        return pos
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    d = pos.shape[-1]
    patch = pos[:, prefix:].reshape(1, *g0, d).permute(0, 3, 1, 2).float()
    scale = ((grid[0] + 0.1) / g0[0], (grid[1] + 0.1) / g0[1])
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False)
    return torch.cat([pos[:, :prefix], patch.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)], dim=1)


def _embed(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's patch and position embedding (``_pos_embed``), with :func:`dino_pos_embed`: (B, 3, H, W), H and W
    multiples of the patch -> (B, prefix + H/p * W/p, D) tokens."""
    x = vit.patch_embed(images)  # (B, gh, gw, D): the loaders build the ViT with dynamic_img_size=True
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    pos = dino_pos_embed(vit, (gh, gw))
    tokens = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    # As timm: embeddings without a class-token entry are added before the tokens are joined, others after.
    x = torch.cat([*tokens, x + pos], dim=1) if vit.no_embed_class else torch.cat([*tokens, x], dim=1) + pos
    return vit.pos_drop(x)


def vit_keys(vit: torch.nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Keys of block ``block`` of a timm ViT with patch side p: images (B, 3, H, W) normalised, H and W >= p ->
    (B, H // p, W // p, D) in the network's dtype.

    A side that is not a multiple of p keeps its pixels up to here: the reference's stride-p patch convolution
    drops the last H % p rows and W % p columns, so they are cut here (timm's dynamic-size patch embedding asserts
    whole patches instead of dropping them).
    """
    p = vit.patch_embed.patch_size[0]
    b, _, h, w = images.shape
    gh, gw = h // p, w // p
    x = vit.norm_pre(vit.patch_drop(_embed(vit, images[..., : gh * p, : gw * p])))
    blocks = list(vit.blocks)
    for blk in blocks[:block] if block != -1 else blocks[:-1]:
        x = blk(x)
    blk = blocks[block]
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(x)).view(b, x.shape[1], 3, attn.num_heads, -1)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2)).transpose(1, 2).flatten(2)  # (B, N, D)
    return k[:, vit.num_prefix_tokens :].reshape(b, gh, gw, -1)


@register_extractor("dino")
class DinoExtractor(Extractor):
    """Last-block keys, ImageNet mean/std (REFERENCE 4). Support images go in at their own size (512: a 64x64
    grid). A window whose sides are both at most ``dino_short`` goes at its own size; a larger one is resized as
    torchvision's ``Resize(dino_short, max_size=dino_max_long)`` does (short side ``dino_short``, the long side
    truncated and at most ``dino_max_long``). Sides need not be multiples of the patch: the grid is the whole
    patches (:func:`vit_keys`), which segmentation stretches back over the window's pixels."""

    role = "dino"

    def params(self) -> dict:
        spec = self.models.spec
        return {"layer": "last", "what": "keys", "short": spec.dino_short, "max_long": spec.dino_max_long}

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        spec = self.models.spec
        if support or max(height, width) <= spec.dino_short:
            return height, width
        return resized_shape(height, width, spec.dino_short, spec.dino_max_long)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalise_pixels(images, IMAGENET_MEAN, IMAGENET_STD).to(self.models.dtype("dino"))
        return vit_keys(self.models.get("dino"), x).float()

    @torch.no_grad()
    def maskcut_keys(self, images: torch.Tensor) -> torch.Tensor:
        """MaskCut's input: (B, 3, S, S) in [0, 1] -> (B, m/p, m/p, D) keys of the image resized to the spec's
        square ``maskcut_input`` m (480 for ViT-B/8: 60x60 patches). Antialiased: MaskCut is not the reference's
        path, and REFERENCE does not pin its resize."""
        m = self.models.spec.maskcut_input
        return self.forward(resize(images, (m, m), antialias=True))
