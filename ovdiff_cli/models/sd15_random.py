"""``sd15-random``: the paper's architectures at full size with random weights, built from these configs.

For timing on machines without the weights (benchmarks, GPU smoke tests). Outputs are meaningless.
"""

from __future__ import annotations

from .registry import ModelSetSpec, random_weight_set, register_model_set

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# SD 1.5's scheduler_config.json (the hub snapshot's), shared by the random-weight sets.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
DINO_VITB8 = {"img_size": 224, "patch_size": 8, "embed_dim": 768, "depth": 12, "num_heads": 12}
CLIP_VITB16 = {
    "embed_dim": 512,
    "quick_gelu": True,  # as OpenAI's weights
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


@register_model_set
def sd15_random() -> ModelSetSpec:
    return random_weight_set(
        "sd15-random",
        "the sd15 architectures at full size with random weights; for timing without weights",
        512,
        unet=SD15_UNET,
        vae=SD15_VAE,
        text=SD15_TEXT,
        scheduler=SD15_SCHEDULER,
        dino=DINO_VITB8,
        clip=CLIP_VITB16,
        cutler="full",
    )
