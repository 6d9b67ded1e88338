"""The state-dict names and shapes of CutLER's Cascade Mask R-CNN R50-FPN as detectron2 saves them.

Written from detectron2's and CutLER's sources, not from our module, so that the name mapping is checked against
an independent table. Order is detectron2's registration order (a module's parameters, then its buffers, then its
children), i.e. the order of the keys in ``cutler_cascade_final.pth``'s ``model`` entry:

* ``GeneralizedRCNN`` (CutLER ``modeling/meta_arch/rcnn.py``): ``backbone``, ``proposal_generator``, ``roi_heads``;
  ``pixel_mean``/``pixel_std`` are registered with ``persistent=False`` and are not saved.
* ``FPN`` (``modeling/backbone/fpn.py``): ``fpn_lateral{2..5}`` and ``fpn_output{2..5}`` interleaved per level, then
  ``top_block`` (``LastLevelMaxPool``, no weights) and ``bottom_up``. ``FPN.NORM: SyncBN`` makes every conv
  bias-free (``use_bias = norm == ""``) with a ``.norm`` child.
* ``ResNet`` (``modeling/backbone/resnet.py``): ``stem.conv1`` (7x7, bias-free, ``.norm``), then ``res2``..``res5``
  as ``nn.Sequential`` of ``BottleneckBlock``: ``shortcut`` (only where channels change: each stage's first block),
  ``conv1``, ``conv2``, ``conv3``, all bias-free with ``.norm``. ``RESNETS.NORM: SyncBN`` is ``nn.SyncBatchNorm``,
  whose state is ``weight, bias, running_mean, running_var, num_batches_tracked``.
* ``RPN`` (``proposal_generator/rpn.py``): ``rpn_head.conv`` (3x3, with bias), ``rpn_head.objectness_logits``
  (1x1, A=3), ``rpn_head.anchor_deltas`` (1x1, 4A); the anchor generator's ``BufferList`` is not persistent.
* ``CustomCascadeROIHeads`` (CutLER ``roi_heads/custom_cascade_rcnn.py``, over ``CustomStandardROIHeads``):
  ``box_head`` and ``box_predictor`` are ``nn.ModuleList`` of 3; ``FastRCNNConvFCHead`` with ``NUM_FC 2`` gives
  ``fc1`` (256*7*7 -> 1024), ``fc2``; ``FastRCNNOutputLayers`` gives ``cls_score`` (NUM_CLASSES 1 + background) and
  ``bbox_pred`` (class-agnostic: 4); ``MaskRCNNConvUpsampleHead`` (NUM_CONV 4, NORM "") gives ``mask_fcn1..4``
  (3x3, with bias), ``deconv`` (ConvTranspose2d 2x2, weight ``(in, out, 2, 2)``), ``predictor`` (1x1, 1 class).
"""

from __future__ import annotations

# detectron2 parameters of the FULL model, counted by hand:
# ResNet-50 without its classifier 23,508,032 (torchvision's 25,557,032 minus fc's 2048*1000 + 1000);
# FPN 256*(256+512+1024+2048) + 4*256*256*9 + 8*2*256 = 3,346,432;
# RPN 256*256*9+256 + 256*3+3 + 256*12+12 = 593,935;
# box stages 3*((12544*1024+1024) + (1024*1024+1024) + (1024*2+2) + (1024*4+4)) = 41,705,490;
# mask head 4*(256*256*9+256) + (256*256*4+256) + (256+1) = 2,622,977.
FULL_PARAMETERS = 23_508_032 + 3_346_432 + 593_935 + 41_705_490 + 2_622_977  # 71,776,866
# 61 SyncBatchNorms (53 in the ResNet: stem 1 + 16 blocks * 3 + 4 shortcuts; 8 in the FPN) with 5 entries each;
# 61 bias-free convs; the RPN's 6 tensors; 3 * (4 + 4) box tensors; the mask head's 12.
FULL_KEYS = 61 * 5 + 61 + 6 + 3 * 8 + 12  # 408
FULL_NUM_BATCHES_TRACKED = 61


def _conv_norm(prefix: str, out_ch: int, in_ch: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
    """A detectron2 ``Conv2d(bias=False, norm=SyncBN)``."""
    return [
        (f"{prefix}.weight", (out_ch, in_ch, k, k)),
        (f"{prefix}.norm.weight", (out_ch,)),
        (f"{prefix}.norm.bias", (out_ch,)),
        (f"{prefix}.norm.running_mean", (out_ch,)),
        (f"{prefix}.norm.running_var", (out_ch,)),
        (f"{prefix}.norm.num_batches_tracked", ()),
    ]


def _with_bias(prefix: str, weight: tuple[int, ...], bias: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", weight), (f"{prefix}.bias", (bias,))]


def detectron2_cutler_keys(
    stem: int = 64,
    blocks: tuple[int, ...] = (3, 4, 6, 3),
    stage_out: tuple[int, ...] = (256, 512, 1024, 2048),
    bottleneck: tuple[int, ...] = (64, 128, 256, 512),
    fpn: int = 256,
    fc: int = 1024,
    mask: int = 256,
) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor in the detectron2 state dict; defaults are CutLER's R50-FPN sizes."""
    keys: list[tuple[str, tuple[int, ...]]] = []
    for level, in_ch in zip(range(2, 6), stage_out, strict=True):
        keys += _conv_norm(f"backbone.fpn_lateral{level}", fpn, in_ch, 1)
        keys += _conv_norm(f"backbone.fpn_output{level}", fpn, fpn, 3)
    keys += _conv_norm("backbone.bottom_up.stem.conv1", stem, 3, 7)
    in_ch = stem
    for stage, (count, out_ch, mid) in enumerate(zip(blocks, stage_out, bottleneck, strict=True), start=2):
        for block in range(count):
            prefix = f"backbone.bottom_up.res{stage}.{block}"
            if in_ch != out_ch:
                keys += _conv_norm(f"{prefix}.shortcut", out_ch, in_ch, 1)
            keys += _conv_norm(f"{prefix}.conv1", mid, in_ch, 1)
            keys += _conv_norm(f"{prefix}.conv2", mid, mid, 3)
            keys += _conv_norm(f"{prefix}.conv3", out_ch, mid, 1)
            in_ch = out_ch
    keys += _with_bias("proposal_generator.rpn_head.conv", (fpn, fpn, 3, 3), fpn)
    keys += _with_bias("proposal_generator.rpn_head.objectness_logits", (3, fpn, 1, 1), 3)
    keys += _with_bias("proposal_generator.rpn_head.anchor_deltas", (12, fpn, 1, 1), 12)
    for stage in range(3):
        keys += _with_bias(f"roi_heads.box_head.{stage}.fc1", (fc, fpn * 7 * 7), fc)
        keys += _with_bias(f"roi_heads.box_head.{stage}.fc2", (fc, fc), fc)
    for stage in range(3):
        keys += _with_bias(f"roi_heads.box_predictor.{stage}.cls_score", (2, fc), 2)
        keys += _with_bias(f"roi_heads.box_predictor.{stage}.bbox_pred", (4, fc), 4)
    for index in range(1, 5):
        keys += _with_bias(f"roi_heads.mask_head.mask_fcn{index}", (mask, fpn if index == 1 else mask, 3, 3), mask)
    keys += _with_bias("roi_heads.mask_head.deconv", (mask, mask, 2, 2), mask)
    keys += _with_bias("roi_heads.mask_head.predictor", (1, mask, 1, 1), 1)
    return keys
