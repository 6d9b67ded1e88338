"""``tiny``: the same architecture families at toy sizes, random weights from a fixed seed, built in seconds.

For tests and offline smoke runs. Outputs are mechanically real (every stage runs for real) and semantically
meaningless. The configs are data: a change here changes the model hash and so every cache key.
"""

from __future__ import annotations

from ..defaults import BATCH_SIZE
from .registry import ModelSetSpec, random_weight_set, register_model_set
from .sd15_random import SD15_SCHEDULER

# SD 1.5's layout (3 cross-attention down blocks of 2 layers, a mid layer, 3 cross-attention up blocks of 3
# layers: 16 cross-attention layers) at 1/10 of the width, so the SD feature layer indices mean the same thing.
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
TINY_DINO = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@register_model_set
def tiny() -> ModelSetSpec:
    return random_weight_set(
        "tiny",
        "toy-size random-weight models built in-process; for tests and offline runs (meaningless)",
        64,
        unet=TINY_UNET,
        vae=TINY_VAE,
        text=TINY_TEXT,
        scheduler=SD15_SCHEDULER,
        dino=TINY_DINO,
        clip=TINY_CLIP,
        cutler="tiny",
        # The full-size inputs scaled by 64 / 512 and rounded to the 8-pixel patch.
        clip_input=56,
        dino_short=56,
        dino_max_long=96,
        maskcut_input=56,
        # Toy networks: per-call overhead dominates on the CPU, so batches as large as on a GPU are fastest.
        cpu_batch_size=BATCH_SIZE,
    )
