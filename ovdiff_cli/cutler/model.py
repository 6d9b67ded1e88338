"""CutLER's Cascade Mask R-CNN (ResNet-50 + FPN) at inference, on torch + torchvision only.

The module tree reproduces detectron2's attribute names (``backbone.bottom_up.res2.0.conv1.norm``,
``proposal_generator.rpn_head.conv``, ``roi_heads.box_head.0.fc1``, ...), so a detectron2 state dict maps onto it by
the rules in :mod:`.checkpoint`. The inference path follows detectron2's ``GeneralizedRCNN.inference`` with
CutLER's ``CustomCascadeROIHeads``: resize, normalise and pad, ResNet + FPN, RPN proposals, three cascade stages
whose class probabilities are averaged, NMS, the mask head on the final boxes, and pasting into the input image.
The resize is the reference's, torchvision's tensor ``Resize(800, max_size=1333)`` (REFERENCE 3), not detectron2's
``ResizeShortestEdge`` of its predictor (rounded sides, PIL's antialiased bilinear filter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, batched_nms, nms

from .configs import CutlerConfig
from .ops import (
    BoxCoder,
    cell_anchors,
    clip_boxes,
    grid_anchors,
    multilevel_roi_align,
    nonempty,
    paste_masks,
    resize_image,
    resized_shape,
)

# FPN levels: the RPN reads p2..p6 (strides 4..64), the ROI heads p2..p5.
_FIRST_LEVEL = 2
_ROI_LEVELS = 4
# detectron2's standard mask head predicts 28x28 masks: the 14x14 pooled features doubled by its deconvolution.
_MASK_UPSAMPLE = 2


@dataclass
class Detections:
    """One image's detections, on the detector's device.

    ``boxes``: ``(R, 4)`` float32 ``(x0, y0, x1, y1)`` in input-image pixels. ``scores``: ``(R,)`` float32 in (0, 1],
    the foreground probability averaged over the three cascade stages, sorted descending. ``masks``: ``(R, H, W)``
    bool at the input image's size.
    """

    boxes: Tensor
    scores: Tensor
    masks: Tensor


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by a frozen BatchNorm held as ``.norm`` (detectron2's ``Conv2d(norm=...)``).

    CutLER trained these with SyncBatchNorm; in eval mode that is an affine map of the running statistics, which is
    what :class:`torchvision.ops.FrozenBatchNorm2d` computes (same eps 1e-5). No activation: callers apply ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class Stem(nn.Module):
    """7x7/2 convolution, ReLU and 3x3/2 max-pool: ``(N, 3, H, W)`` to ``(N, C, H/4, W/4)``."""

    def __init__(self, out_channels: int, eps: float) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, 2, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """detectron2's ``BottleneckBlock`` with the stride in the 3x3 convolution (CutLER: ``STRIDE_IN_1X1: False``).

    A 1x1 projection shortcut exists exactly when the channel count changes, as in detectron2.
    """

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int, eps: float) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride, eps) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, 1, eps)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride, eps)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, 1, eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem and stages ``res2``..``res5`` (strides 4, 8, 16, 32); returns the four stage outputs."""

    def __init__(self, config: CutlerConfig) -> None:
        super().__init__()
        self.stem = Stem(config.stem_channels, config.norm_eps)
        in_channels = config.stem_channels
        stages = zip(config.blocks_per_stage, config.stage_channels, config.bottleneck_channels, strict=True)
        for index, (num_blocks, out_channels, bottleneck) in enumerate(stages):
            blocks = []
            for block in range(num_blocks):
                # res2 follows the stem's max-pool, so only res3..res5 downsample (in their first block).
                stride = 2 if block == 0 and index > 0 else 1
                blocks.append(Bottleneck(in_channels, out_channels, bottleneck, stride, config.norm_eps))
                in_channels = out_channels
            self.add_module(f"res{index + _FIRST_LEVEL}", nn.Sequential(*blocks))
        self.stages = [getattr(self, f"res{level}") for level in range(_FIRST_LEVEL, _FIRST_LEVEL + 4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class FPN(nn.Module):
    """Feature pyramid ``p2``..``p6`` over the ResNet; p6 is p5 subsampled (detectron2's ``LastLevelMaxPool``).

    Lateral (1x1) and output (3x3) convolutions carry a frozen BatchNorm and no bias (CutLER: ``FPN.NORM: SyncBN``).
    """

    def __init__(self, config: CutlerConfig) -> None:
        super().__init__()
        self.lateral_convs = []
        self.output_convs = []
        for level, in_channels in enumerate(config.stage_channels, start=_FIRST_LEVEL):
            lateral = ConvNorm(in_channels, config.fpn_channels, 1, 1, config.norm_eps)
            output = ConvNorm(config.fpn_channels, config.fpn_channels, 3, 1, config.norm_eps)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        self.bottom_up = ResNet(config)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(N, 3, H, W)`` with H, W multiples of 32 to five ``(N, C, H / 2**l, W / 2**l)`` maps, l = 2..6."""
        stages = self.bottom_up(x)
        top_down = self.lateral_convs[-1](stages[-1])
        pyramid = [self.output_convs[-1](top_down)]
        for stage, lateral, output in zip(
            stages[-2::-1], self.lateral_convs[-2::-1], self.output_convs[-2::-1], strict=True
        ):
            top_down = lateral(stage) + F.interpolate(top_down, scale_factor=2.0, mode="nearest")
            pyramid.insert(0, output(top_down))
        pyramid.append(F.max_pool2d(pyramid[-1], kernel_size=1, stride=2))
        return pyramid


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then per-anchor objectness logits and box deltas (detectron2 ``StandardRPNHead``)."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W)`` to logits ``(N, H*W*A)`` and deltas ``(N, H*W*A, 4)``, ordered location-major."""
        hidden = F.relu(self.conv(x))
        logits = self.objectness_logits(hidden)
        deltas = self.anchor_deltas(hidden)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        return logits, deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)


class RPN(nn.Module):
    """Region proposals: per level the top-k anchors by objectness, then per-level NMS and the top-k overall."""

    def __init__(self, config: CutlerConfig) -> None:
        super().__init__()
        self.config = config
        self.rpn_head = RPNHead(config.fpn_channels, config.num_anchors)
        self.coder = BoxCoder(config.rpn_box_weights, config.box_scale_clamp)
        # Rebuilt from the config, never loaded: detectron2 keeps them out of its state dict too (persistent=False).
        cells = torch.stack([cell_anchors(size, config.anchor_ratios) for size in config.anchor_sizes])
        self.register_buffer("cell_anchors", cells, persistent=False)

    def forward(self, features: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Proposals ``(R_i, 4)`` float32 per image (at most ``rpn_post_nms_topk``), best objectness first.

        ``features``: p2..p6; ``image_sizes``: each image's resized ``(h, w)`` inside the padded batch.
        """
        cfg = self.config
        boxes, scores, level_ids = [], [], []
        for level, feature in enumerate(features):
            logits, deltas = self.rpn_head(feature)
            stride = 2 ** (level + _FIRST_LEVEL)
            anchors = grid_anchors(self.cell_anchors[level].float(), feature.shape[-2:], stride, cfg.anchor_offset)
            k = min(logits.shape[1], cfg.rpn_pre_nms_topk)
            top_logits, top_index = logits.float().topk(k, dim=1)
            top_deltas = torch.gather(deltas, 1, top_index[..., None].expand(-1, -1, 4))
            decoded = self.coder.decode(top_deltas.reshape(-1, 4), anchors[top_index.reshape(-1)])
            boxes.append(decoded.view(top_index.shape[0], k, 4))
            scores.append(top_logits)
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=feature.device))
        boxes_all, scores_all, levels = torch.cat(boxes, dim=1), torch.cat(scores, dim=1), torch.cat(level_ids)
        proposals = []
        for image_boxes, image_scores, (height, width) in zip(boxes_all, scores_all, image_sizes, strict=True):
            keep = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_scores)
            image_boxes, image_scores, image_levels = image_boxes[keep], image_scores[keep], levels[keep]
            image_boxes = clip_boxes(image_boxes, image_boxes.new_tensor([width, height, width, height]))
            keep = nonempty(image_boxes, cfg.rpn_min_box_size)
            image_boxes, image_scores, image_levels = image_boxes[keep], image_scores[keep], image_levels[keep]
            keep = batched_nms(image_boxes, image_scores, image_levels, cfg.rpn_nms_threshold)
            proposals.append(image_boxes[keep[: cfg.rpn_post_nms_topk]])
        return proposals


class BoxHead(nn.Module):
    """Two fully connected layers with ReLU on flattened pooled features (detectron2 ``FastRCNNConvFCHead``)."""

    def __init__(self, in_features: int, fc_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits ``(K, 2)`` (object, background) and class-agnostic box deltas ``(K, 4)``."""

    def __init__(self, fc_dim: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(fc_dim, 2)
        self.bbox_pred = nn.Linear(fc_dim, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """detectron2's ``MaskRCNNConvUpsampleHead``: 3x3 convs + ReLU, 2x2/2 deconvolution + ReLU, 1x1 predictor.

    ``(K, C, 14, 14)`` pooled features to ``(K, 1, 28, 28)`` class-agnostic mask logits (CutLER has one class).
    """

    def __init__(self, in_channels: int, conv_dim: int, num_conv: int) -> None:
        super().__init__()
        self.convs = []
        for index in range(num_conv):
            conv = nn.Conv2d(in_channels if index == 0 else conv_dim, conv_dim, 3, padding=1)
            self.add_module(f"mask_fcn{index + 1}", conv)
            self.convs.append(conv)
        self.deconv = nn.ConvTranspose2d(conv_dim, conv_dim, _MASK_UPSAMPLE, stride=_MASK_UPSAMPLE)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.predictor(F.relu(self.deconv(x)))


class CascadeROIHeads(nn.Module):
    """Three box stages, each refining the previous stage's boxes, and the mask head (CutLER's cascade heads)."""

    def __init__(self, config: CutlerConfig) -> None:
        super().__init__()
        self.config = config
        pooled = config.fpn_channels * config.box_pooler_resolution**2
        stages = range(len(config.cascade_box_weights))
        self.box_head = nn.ModuleList(BoxHead(pooled, config.box_fc_dim) for _ in stages)
        self.box_predictor = nn.ModuleList(BoxPredictor(config.box_fc_dim) for _ in stages)
        self.coders = [BoxCoder(weights, config.box_scale_clamp) for weights in config.cascade_box_weights]
        self.mask_head = MaskHead(config.fpn_channels, config.mask_conv_dim, config.mask_num_conv)

    def _pool(self, features: list[Tensor], boxes: list[Tensor], resolution: int) -> Tensor:
        index = torch.cat(
            [torch.full((len(b), 1), i, dtype=torch.float32, device=b.device) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([index, torch.cat(boxes)], dim=1)
        cfg = self.config
        return multilevel_roi_align(
            features,
            rois,
            resolution,
            _FIRST_LEVEL,
            cfg.pooler_sampling_ratio,
            cfg.canonical_box_size,
            cfg.canonical_level,
        )

    def detect_boxes(
        self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]], threshold: float
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(boxes (R, 4) float32, scores (R,) float32)`` in resized-image pixels, best first.

        Scores are the foreground probability averaged over the stages; boxes are the last stage's. Kept: scores
        strictly above ``threshold``, after NMS, at most ``max_detections``.
        """
        cfg = self.config
        counts = [len(p) for p in proposals]
        limits = torch.cat(
            [p.new_tensor([w, h, w, h]).expand(len(p), 4) for p, (h, w) in zip(proposals, image_sizes, strict=True)]
        )
        boxes = torch.cat(proposals)
        probs = boxes.new_zeros((len(boxes), 2))
        for head, predictor, coder in zip(self.box_head, self.box_predictor, self.coders, strict=True):
            logits, deltas = predictor(head(self._pool(features, list(boxes.split(counts)), cfg.box_pooler_resolution)))
            probs = probs + F.softmax(logits.float(), dim=-1)
            # Clipped boxes feed the next stage; empty ones are kept at test time so every stage scores the same boxes.
            boxes = clip_boxes(coder.decode(deltas, boxes), limits)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        scores = probs[:, 0] / len(self.coders)
        results = []
        split = zip(boxes.split(counts), scores.split(counts), valid.split(counts), strict=True)
        for image_boxes, image_scores, image_valid in split:
            keep = image_valid & (image_scores > threshold)
            image_boxes, image_scores = image_boxes[keep], image_scores[keep]
            keep = nms(image_boxes, image_scores, cfg.nms_threshold)[: cfg.max_detections]
            results.append((image_boxes[keep], image_scores[keep]))
        return results

    def predict_masks(self, features: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Per image ``(R, 28, 28)`` float32 mask probabilities for ``boxes`` (resized-image pixels)."""
        logits = self.mask_head(self._pool(features, boxes, self.config.mask_pooler_resolution))
        return list(logits[:, 0].float().sigmoid().split([len(b) for b in boxes]))


class CutlerDetector(nn.Module):
    """CutLER's class-agnostic instance segmenter; build with :func:`random_cutler` or ``checkpoint.load_cutler``."""

    def __init__(self, config: CutlerConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = FPN(config)
        self.proposal_generator = RPN(config)
        self.roi_heads = CascadeROIHeads(config)
        # CutLER's config values; detectron2 keeps them out of the state dict (persistent=False), so do we.
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(3, 1, 1), persistent=False)
        self.eval()

    def _preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resize (:func:`.ops.resize_image` to :func:`.ops.resized_shape`), normalise and zero-pad: a ``(N, 3, H, W)``
        batch in the model's dtype and each resized ``(h, w)``."""
        cfg = self.config
        dtype = self.backbone.bottom_up.stem.conv1.weight.dtype
        normalised, sizes = [], []
        for image in images:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"CutLER takes (3, H, W) RGB images, got shape {tuple(image.shape)}")
            size = resized_shape(image.shape[1], image.shape[2], cfg.min_size_test, cfg.max_size_test)
            pixels = resize_image(image.to(self.pixel_mean.device), size)
            normalised.append((pixels - self.pixel_mean.float()) / self.pixel_std.float())
            sizes.append(size)
        step = cfg.size_divisibility
        height = math.ceil(max(h for h, _ in sizes) / step) * step
        width = math.ceil(max(w for _, w in sizes) / step) * step
        batch = normalised[0].new_zeros((len(images), 3, height, width))
        for slot, pixels in zip(batch, normalised, strict=True):
            slot[:, : pixels.shape[1], : pixels.shape[2]] = pixels
        return batch.to(dtype), sizes

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], score_threshold: float | None = None) -> list[Detections]:
        """Instances in each image of a batch.

        ``images``: ``(3, H, W)`` RGB tensors, uint8 in [0, 255] or float in [0, 1]; sizes may differ (they are
        padded to a common size, as detectron2's ``ImageList`` does, so an image's detections can change slightly
        with the batch it is in when the padded size changes). ``score_threshold``: keep scores strictly above it
        (default ``config.score_threshold``).
        """
        if not images:
            return []
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        batch, sizes = self._preprocess(images)
        pyramid = self.backbone(batch)
        proposals = self.proposal_generator(pyramid, sizes)
        roi_features = pyramid[:_ROI_LEVELS]
        found = self.roi_heads.detect_boxes(roi_features, proposals, sizes, threshold)
        masks = self.roi_heads.predict_masks(roi_features, [boxes for boxes, _ in found])
        return [
            self._to_input_size(boxes, scores, image_masks, size, (image.shape[1], image.shape[2]))
            for (boxes, scores), image_masks, size, image in zip(found, masks, sizes, images, strict=True)
        ]

    def _to_input_size(
        self, boxes: Tensor, scores: Tensor, masks: Tensor, size: tuple[int, int], input_size: tuple[int, int]
    ) -> Detections:
        """detectron2's ``detector_postprocess``: rescale and clip boxes, drop empty ones, paste the masks."""
        height, width = input_size
        scale = boxes.new_tensor([width / size[1], height / size[0]] * 2)
        boxes = clip_boxes(boxes * scale, boxes.new_tensor([width, height, width, height]))
        keep = nonempty(boxes)
        boxes, scores = boxes[keep], scores[keep]
        return Detections(boxes, scores, paste_masks(masks[keep], boxes, input_size, self.config.mask_threshold))


# Output layers start near zero, as detectron2 initialises them, so that random logits and deltas stay small.
_SMALL_INIT = ("objectness_logits", "anchor_deltas", "cls_score", "bbox_pred", "mask_head.predictor")
# Side of the seeded noise batch whose statistics become the random model's BatchNorm statistics.
_CALIBRATION_SIZE = 128


def random_cutler(config: CutlerConfig, seed: int = 0) -> CutlerDetector:
    """A detector with deterministic random weights: the same seed and config give the same weights.

    (The BatchNorm statistics come from a CPU forward pass, so across machines they may differ by float rounding.)

    Weights are drawn on the CPU from a seeded generator in parameter order: He-normal for convolutions and linear
    layers (std ``sqrt(2 / fan)`` with fan the size of one output unit's slice), std 0.01 for the output layers and
    zero biases. Each frozen BatchNorm then takes the statistics of its input on a seeded noise batch (as a trained
    network's running statistics would be), which keeps the features of order one through all 16 residual blocks
    instead of growing without bound. The mask predictor's bias is 1, so each detection pastes its whole box.
    Detections are meaningless, but there are as many as a trained model finds, which is what timing runs need.
    """
    model = CutlerDetector(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
                continue
            std = 0.01 if any(part in name for part in _SMALL_INIT) else math.sqrt(2.0 / param[0].numel())
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        noise = torch.randn((2, 3, _CALIBRATION_SIZE, _CALIBRATION_SIZE), generator=generator)
        norms = [module for module in model.modules() if isinstance(module, FrozenBatchNorm2d)]
        hooks = [norm.register_forward_pre_hook(_take_input_statistics) for norm in norms]
        model.backbone(noise)  # every BatchNorm is in the backbone; each sees already-calibrated inputs
        for hook in hooks:
            hook.remove()
        # Near-zero mask logits would paste salt-and-pepper halves of each box; a positive bias pastes whole boxes,
        # so support masks from random weights still have extent (and prototypes come from them downstream).
        model.roi_heads.mask_head.predictor.bias.fill_(1.0)
    return model


def _take_input_statistics(norm: FrozenBatchNorm2d, args: tuple[Tensor, ...]) -> None:
    norm.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
    norm.running_var.copy_(args[0].var(dim=(0, 2, 3), unbiased=False))
