"""CutLER's architecture and test-time settings as data.

``FULL`` is CutLER's ``model_zoo/configs/CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN.yaml`` resolved over its
``Base-RCNN-FPN.yaml`` and detectron2's ``config/defaults.py``; each value names the key it comes from. ``TINY`` keeps
the same graph with a few channels per layer, for fast offline tests; it reads no checkpoint.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CutlerConfig:
    """Sizes of a CutLER Cascade Mask R-CNN and its test-time post-processing.

    Channel widths shape the weights (a checkpoint only fits the config it was trained with); the rest are
    inference settings that can be changed freely with ``dataclasses.replace``.
    """

    name: str
    # --- ResNet (detectron2 ``build_resnet_backbone``; RESNETS.DEPTH 50, NUM_GROUPS 1, WIDTH_PER_GROUP 64) ---
    stem_channels: int  # RESNETS.STEM_OUT_CHANNELS
    blocks_per_stage: tuple[int, int, int, int]  # res2..res5; [3, 4, 6, 3] for depth 50
    stage_channels: tuple[int, int, int, int]  # block outputs; RES2_OUT_CHANNELS doubled per stage
    bottleneck_channels: tuple[int, int, int, int]  # NUM_GROUPS * WIDTH_PER_GROUP doubled per stage
    # --- FPN, RPN and ROI heads ---
    fpn_channels: int  # FPN.OUT_CHANNELS
    box_fc_dim: int  # ROI_BOX_HEAD.FC_DIM (NUM_FC 2, NUM_CONV 0 in Base-RCNN-FPN)
    mask_conv_dim: int  # ROI_MASK_HEAD.CONV_DIM (NUM_CONV 4)
    # --- test-time input (INPUT.*_TEST), resized as the reference does: torchvision Resize(min, max_size=max) ---
    min_size_test: int
    max_size_test: int
    # Defaults below are FULL's and hold for TINY too.
    mask_num_conv: int = 4  # ROI_MASK_HEAD.NUM_CONV (Base-RCNN-FPN)
    # CutLER's yaml: INPUT.FORMAT "RGB" and ImageNet statistics in 0-255 units (detectron2's default is BGR Caffe).
    pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530)
    pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375)
    # The FPN's coarsest stride (res5's 32): ImageList pads every batch to a multiple of it.
    size_divisibility: int = 32
    # BatchNorm's eps: training used nn.SyncBatchNorm (RESNETS.NORM and FPN.NORM "SyncBN"), frozen at inference.
    norm_eps: float = 1e-5
    # --- RPN (Base-RCNN-FPN ANCHOR_GENERATOR; CutLER's RPN.NMS_THRESH) ---
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level p2..p6
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    anchor_offset: float = 0.0  # ANCHOR_GENERATOR.OFFSET default: anchors centred on multiples of the stride
    rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # RPN.BBOX_REG_WEIGHTS
    rpn_nms_threshold: float = 0.65  # CutLER's RPN.NMS_THRESH (detectron2 default 0.7)
    rpn_pre_nms_topk: int = 1000  # RPN.PRE_NMS_TOPK_TEST, per level
    rpn_post_nms_topk: int = 1000  # RPN.POST_NMS_TOPK_TEST, per image
    rpn_min_box_size: float = 0.0  # PROPOSAL_GENERATOR.MIN_SIZE
    # --- ROI heads (CustomCascadeROIHeads; ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS, one per stage) ---
    cascade_box_weights: tuple[tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    box_pooler_resolution: int = 7  # ROI_BOX_HEAD.POOLER_RESOLUTION (Base-RCNN-FPN)
    mask_pooler_resolution: int = 14  # ROI_MASK_HEAD.POOLER_RESOLUTION
    pooler_sampling_ratio: int = 0  # POOLER_SAMPLING_RATIO: adaptive, ceil(roi size / output size)
    canonical_box_size: int = 224  # ROIPooler defaults (FPN paper eq. 1)
    canonical_level: int = 4
    # detectron2's Box2BoxTransform clamps dw, dh so that no box grows by more than 1000/16 per step.
    box_scale_clamp: float = math.log(1000.0 / 16)
    # --- detections ---
    # CutLER's yaml sets ROI_HEADS.SCORE_THRESH_TEST 0.0 for evaluation; OVDiff keeps masks scoring above 0.35.
    score_threshold: float = 0.35
    nms_threshold: float = 0.5  # ROI_HEADS.NMS_THRESH_TEST
    max_detections: int = 100  # TEST.DETECTIONS_PER_IMAGE
    mask_threshold: float = 0.5  # paste_masks_in_image's threshold (>=)

    def __post_init__(self) -> None:
        # detectron2 gives a block a projection shortcut only when its channels change; a strided block without one
        # could not add its input to its output, so every stage must change the width.
        widths = (self.stem_channels, *self.stage_channels)
        if any(a == b for a, b in itertools.pairwise(widths)):
            raise ValueError(f"{self.name}: every ResNet stage must change the channel count, got {widths}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"{self.name}: one anchor size per FPN level p2..p6, got {self.anchor_sizes}")

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location (one size per level times the aspect ratios)."""
        return len(self.anchor_ratios)


FULL = CutlerConfig(
    name="full",
    stem_channels=64,
    blocks_per_stage=(3, 4, 6, 3),
    stage_channels=(256, 512, 1024, 2048),
    bottleneck_channels=(64, 128, 256, 512),
    fpn_channels=256,
    box_fc_dim=1024,
    mask_conv_dim=256,
    min_size_test=800,
    max_size_test=1333,
)

TINY = CutlerConfig(
    name="tiny",
    stem_channels=8,
    blocks_per_stage=(1, 1, 1, 1),
    stage_channels=(16, 32, 64, 128),
    bottleneck_channels=(4, 8, 16, 32),
    fpn_channels=16,
    box_fc_dim=32,
    mask_conv_dim=16,
    min_size_test=128,
    max_size_test=213,
)
