"""Box and mask operations of detectron2's R-CNN inference, written on torch/torchvision tensors.

Every box is ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in pixels; the box math stays in float32 whatever the model's
dtype, as detectron2 does (``Box2BoxTransform.apply_deltas`` casts to float).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of torchvision's ``Resize(short_edge, max_size=max_size)``, which the reference
    resizes CutLER's inputs with (REFERENCE 3).

    The short side becomes ``short_edge`` and the long side ``int(short_edge * long / short)``, truncated; when
    that exceeds ``max_size``, the long side becomes ``max_size`` and the short side ``int(max_size * short /
    long)`` of the first result, truncated again (torchvision's ``_compute_resized_output_size``, the same float
    expressions). A square image keeps both sides equal.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_edge, int(short_edge * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``(3, H, W)`` uint8 [0, 255] or float [0, 1] image to ``(3, h, w)`` float32 in [0, 255], as the reference
    resizes CutLER's inputs: torchvision's tensor ``Resize``, bilinear (``align_corners=False``) without
    antialiasing, on the float image, scaled to detectron2's 0-255 units.

    The reference feeds the float support image (REFERENCE 1); a uint8 input is resized as torchvision resizes a
    uint8 tensor, in float and rounded back to integers (a convex combination of bytes stays within [0, 255]).
    """
    pixels = image.float() if image.dtype == torch.uint8 else image.float() * 255.0
    if tuple(image.shape[1:]) == tuple(size):
        return pixels
    pixels = F.interpolate(pixels[None], size, mode="bilinear", align_corners=False, antialias=False)[0]
    return pixels.round() if image.dtype == torch.uint8 else pixels


class BoxCoder:
    """detectron2's ``Box2BoxTransform``: deltas ``(dx, dy, dw, dh)`` relative to a reference box.

    ``weights`` divide the deltas on decoding (``(10, 10, 5, 5)`` for the first cascade stage, ones for the RPN);
    ``scale_clamp`` caps ``dw``/``dh`` before ``exp`` (detectron2: ``log(1000 / 16)``).
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, reference: Tensor, target: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` float32 that turn ``reference`` boxes into ``target`` boxes (both ``(N, 4)``)."""
        ref_w, ref_h, ref_x, ref_y = _size_and_centre(reference.float())
        tgt_w, tgt_h, tgt_x, tgt_y = _size_and_centre(target.float())
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (tgt_x - ref_x) / ref_w,
                wy * (tgt_y - ref_y) / ref_h,
                ww * torch.log(tgt_w / ref_w),
                wh * torch.log(tgt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes ``(N, 4)`` float32 from deltas ``(N, 4)`` (any float dtype) applied to ``reference`` ``(N, 4)``."""
        deltas = deltas.float()
        width, height, ctr_x, ctr_y = _size_and_centre(reference.float())
        wx, wy, ww, wh = self.weights
        dw = torch.clamp(deltas[:, 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.scale_clamp)
        new_x = deltas[:, 0] / wx * width + ctr_x
        new_y = deltas[:, 1] / wy * height + ctr_y
        half_w = 0.5 * torch.exp(dw) * width
        half_h = 0.5 * torch.exp(dh) * height
        return torch.stack((new_x - half_w, new_y - half_h, new_x + half_w, new_y + half_h), dim=1)


def _size_and_centre(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    return width, height, boxes[:, 0] + 0.5 * width, boxes[:, 1] + 0.5 * height


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """``(N,)`` bool: both sides of each box longer than ``threshold`` (detectron2 ``Boxes.nonempty``)."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def clip_boxes(boxes: Tensor, limits: Tensor) -> Tensor:
    """Clamp ``(K, 4)`` boxes into ``[0, w] x [0, h]``; ``limits`` ``(w, h, w, h)``, shaped ``(4,)`` or ``(K, 4)``.

    detectron2's ``Boxes.clip``, for boxes of several images at once (each row against its own image's size).
    """
    return torch.minimum(boxes.clamp(min=0), limits)


def cell_anchors(size: float, ratios: tuple[float, ...]) -> Tensor:
    """``(len(ratios), 4)`` float32 anchors centred on 0 with area ``size**2`` and height/width ``ratio``."""
    rows = []
    for ratio in ratios:
        width = math.sqrt(size**2 / ratio)
        height = ratio * width
        rows.append((-width / 2, -height / 2, width / 2, height / 2))
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cells: Tensor, grid: tuple[int, int], stride: int, offset: float) -> Tensor:
    """``(H*W*A, 4)`` anchors of one level: ``cells`` ``(A, 4)`` shifted to every location of an ``(H, W)`` grid.

    Row-major over locations, then over the cell anchors: the order of the RPN head's flattened outputs.
    """
    height, width = grid
    ys = torch.arange(height, dtype=torch.float32, device=cells.device) * stride + offset * stride
    xs = torch.arange(width, dtype=torch.float32, device=cells.device) * stride + offset * stride
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.reshape(1, -1, 4)).reshape(-1, 4)


def assign_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: int, canonical_level: int) -> Tensor:
    """``(N,)`` int64 FPN level per box: ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))``.

    Clamped to ``[min_level, max_level]`` (detectron2 ``assign_boxes_to_levels``; torchvision's ``LevelMapper``
    puts its epsilon outside the log, which moves boxes that sit exactly on a level boundary).
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min_level, max_level).to(torch.int64)


def multilevel_roi_align(
    features: list[Tensor],
    rois: Tensor,
    output_size: int,
    first_level: int,
    sampling_ratio: int,
    canonical_size: int,
    canonical_level: int,
) -> Tensor:
    """ROIAlignV2 features ``(K, C, S, S)`` of each ROI, each read from the FPN level its size maps to.

    ``features``: levels ``first_level, first_level + 1, ...``, each ``(N, C, H_l, W_l)`` with stride ``2**level``.
    ``rois``: ``(K, 5)`` float32 ``(batch index, x0, y0, x1, y1)`` in padded-image pixels. ``aligned=True`` (the
    half-pixel shift of ROIAlignV2); boxes are cast to the features' dtype, as detectron2's ``ROIAlign`` does. The
    result has the features' dtype.
    """
    levels = assign_levels(rois[:, 1:], first_level, first_level + len(features) - 1, canonical_size, canonical_level)
    first = features[0]
    pooled = first.new_zeros((rois.shape[0], first.shape[1], output_size, output_size))
    for offset, feature in enumerate(features):
        index = torch.nonzero(levels == first_level + offset).squeeze(1)
        if index.numel():
            # torchvision's roi_align has no bfloat16 kernel; such features are pooled in float32.
            source = feature.float() if feature.dtype == torch.bfloat16 else feature
            pooled[index] = roi_align(
                source,
                rois[index].to(source.dtype),
                output_size,
                spatial_scale=2.0 ** -(first_level + offset),
                sampling_ratio=sampling_ratio,
                aligned=True,
            ).to(pooled.dtype)
    return pooled


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float) -> Tensor:
    """Binary image masks ``(R, H, W)`` bool from ``(R, M, M)`` soft masks in [0, 1] and their ``(R, 4)`` boxes.

    detectron2's ``paste_masks_in_image``: each pixel centre is mapped into its box's mask and sampled bilinearly
    (``grid_sample``, zero outside the mask), then kept where the value is ``>= threshold``. Each box is pasted into
    the pixels ``[floor(x0) - 1, ceil(x1) + 1)`` (and likewise in y) around it, which is detectron2's CPU path; its
    GPU path samples the whole image, which only differs where the mask's zero border is interpolated to >= 0.5.
    """
    height, width = image_size
    out = torch.zeros((masks.shape[0], height, width), dtype=torch.bool, device=masks.device)
    boxes = boxes.float()
    for index, (mask, box) in enumerate(zip(masks.float(), boxes, strict=True)):
        x0_px = int(torch.clamp(torch.floor(box[0]) - 1, min=0))
        y0_px = int(torch.clamp(torch.floor(box[1]) - 1, min=0))
        x1_px = int(torch.clamp(torch.ceil(box[2]) + 1, max=width))
        y1_px = int(torch.clamp(torch.ceil(box[3]) + 1, max=height))
        if x1_px <= x0_px or y1_px <= y0_px:
            continue
        xs = torch.arange(x0_px, x1_px, dtype=torch.float32, device=masks.device) + 0.5
        ys = torch.arange(y0_px, y1_px, dtype=torch.float32, device=masks.device) + 0.5
        xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)
        sampled = F.grid_sample(mask[None, None], grid[None], mode="bilinear", align_corners=False)
        out[index, y0_px:y1_px, x0_px:x1_px] = sampled[0, 0] >= threshold
    return out
