"""CLIP ViT keys of the second-to-last block (open_clip), the paper's best CLIP variant (4.1), fed as the
authors' code feeds it (REFERENCE 4): ImageNet mean/std, windows resized to ``clip_input`` square."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Extractor, normalise_pixels, patch_multiple, register_extractor
from .dino import IMAGENET_MEAN, IMAGENET_STD


def clip_keys(visual: torch.nn.Module, images: torch.Tensor, block: int = -2) -> torch.Tensor:
    """Keys of ``block`` of open_clip's VisionTransformer at any input size.

    images (B, 3, H, W) normalised -> (B, H/p, W/p, D). Positional embeddings are bicubically interpolated
    from the training grid so inputs of any size work.
    """
    x = visual.conv1(images)  # (B, D, gh, gw)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding.to(x.dtype)
    g0 = round((pos.shape[0] - 1) ** 0.5)
    grid = pos[1:]
    if (gh, gw) != (g0, g0):
        grid = grid.reshape(1, g0, g0, d).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, d).to(x.dtype)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1) + torch.cat([pos[:1], grid])[None]
    x = visual.ln_pre(visual.patch_dropout(x))
    blocks = list(visual.transformer.resblocks)
    target = blocks[block]
    for blk in blocks[: blocks.index(target)]:
        x = blk(x)
    attn = target.attn
    w_k, b_k = attn.in_proj_weight[d : 2 * d], attn.in_proj_bias[d : 2 * d]
    k = F.linear(target.ln_1(x), w_k, b_k)
    return k[:, 1:].reshape(b, gh, gw, d)


@register_extractor("clip")
class ClipExtractor(Extractor):
    role = "clip"

    def params(self) -> dict:
        return {"layer": -2, "what": "keys", "input": self.models.spec.clip_input, "mean_std": "imagenet"}

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        if not support:
            return self.window_input()
        patch = self.models.spec.components["clip"].config.get("vision_cfg", {}).get("patch_size", 16)
        return patch_multiple(height, patch), patch_multiple(width, patch)

    def window_input(self) -> tuple[int, int]:
        return self.models.spec.clip_input, self.models.spec.clip_input

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.models.get("clip").visual
        x = normalise_pixels(images, IMAGENET_MEAN, IMAGENET_STD).to(self.models.dtype("clip"))
        return clip_keys(visual, x).float()
