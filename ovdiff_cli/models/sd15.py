"""``sd15``: the paper's models — Stable Diffusion 1.5, DINO ViT-B/8, CLIP ViT-B/16 (OpenAI)."""

from __future__ import annotations

from .registry import (
    DIFFUSERS_FILES,
    QUICK_GELU_WEIGHTS,
    ROLE_FILES,
    SD_FEATURE_LAYERS,
    Component,
    ModelSetSpec,
    register_model_set,
)

# Pinned hub revisions: a download always fetches these exact files, and a cache key names the commit and the weight
# files' sha256, so results never silently change under a user. To move a pin: change the commit here, run
# `ovdiff models fetch sd15`, and expect every cached entry of that network to be recomputed (its keys change).
SD15_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
CLIP_REVISION = "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d"
# The sha256 of open_clip_model.safetensors at that commit: OpenAI's weights, trained with QuickGELU. A folder holding
# this file (`models fetch --to`, a copy) runs QuickGELU too, whatever its config says.
CLIP_SHA256 = "4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f"
QUICK_GELU_WEIGHTS[CLIP_SHA256] = "OpenAI's CLIP ViT-B/16"
# DINO stays on `main`: no commit of timm/vit_base_patch8_224.dino holding model.safetensors could be verified offline.
# Its cache keys still name the exact weights (the weight file's sha256), so a moved `main` changes keys, never
# serves stale results. To pin it, put the commit here: `ovdiff models list` shows the one a fetch of `main` got.
DINO_REVISION = "main"

# Only the diffusers-format fp32 safetensors: the repo also holds 4-8 GB of single-file checkpoints we never use.
SD15_FILES = DIFFUSERS_FILES


@register_model_set
def sd15() -> ModelSetSpec:
    return ModelSetSpec(
        name="sd15",
        description="the paper's models: SD 1.5, DINO ViT-B/8, CLIP ViT-B/16, CutLER (about 5.9 GB)",
        image_size=512,
        grid=64,
        sd_feature_layers=SD_FEATURE_LAYERS,
        components={
            "sd": Component(
                "sd",
                "diffusers",
                "stable-diffusion-v1-5",
                hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
                revision=SD15_REVISION,
                allow_patterns=SD15_FILES,
                # The same repository under its former and mirror names, where users' caches may hold the commit.
                hub_aliases=("runwayml/stable-diffusion-v1-5", "sd-legacy/stable-diffusion-v1-5"),
                fetch_set="sd15",
            ),
            "dino": Component(
                "dino",
                "timm",
                "vit_base_patch8_224.dino",
                hub_id="timm/vit_base_patch8_224.dino",
                revision=DINO_REVISION,
                allow_patterns=ROLE_FILES["dino"],
                fetch_set="sd15",
            ),
            "clip": Component(
                "clip",
                "open_clip",
                "ViT-B-16",
                hub_id="timm/vit_base_patch16_clip_224.openai",
                revision=CLIP_REVISION,
                allow_patterns=ROLE_FILES["clip"],
                fetch_set="sd15",
                activation="quickgelu",  # OpenAI's weights, whatever the snapshot's config says
            ),
            # CutLER's released Cascade Mask R-CNN (its README's download link); not on the Hugging Face hub.
            "cutler": Component(
                "cutler",
                "detectron2",
                "cutler-cascade-r50-fpn",
                url="http://dl.fbaipublicfiles.com/cutler/checkpoints/cutler_cascade_final.pth",
                fetch_set="sd15",
            ),
        },
    )
