"""CutLER without detectron2: the checkpoint name table, checkpoint errors, the detector and its box/mask ops."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from cutler_names import FULL_KEYS, FULL_NUM_BATCHES_TRACKED, FULL_PARAMETERS, detectron2_cutler_keys

from ovdiff_cli.cutler.checkpoint import CheckpointError, convert, load_cutler, map_state_dict, mapping_report
from ovdiff_cli.cutler.configs import FULL, TINY
from ovdiff_cli.cutler.model import CutlerDetector, random_cutler
from ovdiff_cli.cutler.ops import (
    BoxCoder,
    assign_levels,
    cell_anchors,
    grid_anchors,
    paste_masks,
    resize_image,
    resized_shape,
)

TINY_SIZES = {
    "stem": 8,
    "blocks": (1, 1, 1, 1),
    "stage_out": (16, 32, 64, 128),
    "bottleneck": (4, 8, 16, 32),
    "fpn": 16,
    "fc": 32,
    "mask": 16,
}


def d2_state(seed: int = 0, **sizes: object) -> dict[str, torch.Tensor]:
    """A detectron2-named state dict with random values (BatchNorm variances positive, counters int64)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in detectron2_cutler_keys(**sizes):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1234, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    return d2_state()


@pytest.fixture(scope="module")
def full_model() -> CutlerDetector:
    return CutlerDetector(FULL)


def error_line(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


# --- the detectron2 name table ---


def test_full_table_matches_the_hand_counts(full_state):
    assert len(full_state) == FULL_KEYS == 408
    parameters = sum(
        v.numel() for k, v in full_state.items() if not k.endswith(("running_mean", "running_var", "batches_tracked"))
    )
    assert parameters == FULL_PARAMETERS == 71_776_866


def test_full_state_dict_maps_with_no_missing_or_unexpected_keys(full_model, full_state):
    report = mapping_report(full_model, full_state)
    print(report)
    assert report.keys_mapped == len(full_model.state_dict()) == FULL_KEYS - FULL_NUM_BATCHES_TRACKED
    assert report.keys_ignored == FULL_NUM_BATCHES_TRACKED
    assert report.parameters == FULL_PARAMETERS
    assert report.first_names[0] == "backbone.fpn_lateral2.weight"
    assert report.last_names[-1] == "roi_heads.mask_head.predictor.bias"
    full_model.load_state_dict(map_state_dict(full_model, full_state))  # strict
    loaded = full_model.state_dict()
    for name in ("backbone.bottom_up.res4.5.conv2.norm.running_var", "roi_heads.box_predictor.2.bbox_pred.weight"):
        assert torch.equal(loaded[name], full_state[name])


def test_full_model_runs_with_mapped_weights(full_state):
    # Small images and 100 proposals keep it cheap; the weights are random_cutler's (sane activations) laid out as
    # detectron2 saves them, i.e. with each BatchNorm's step counter.
    config = dataclasses.replace(FULL, min_size_test=128, max_size_test=213, rpn_post_nms_topk=100)
    counters = {name: value for name, value in full_state.items() if name.endswith("num_batches_tracked")}
    model = random_cutler(config, seed=0)
    model.load_state_dict(map_state_dict(model, {**model.state_dict(), **counters}))
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    (found,) = model.detect([image], score_threshold=0.0)
    assert 0 < len(found.boxes) <= FULL.max_detections and found.masks.shape[1:] == (120, 160)


def test_module_prefix_numpy_values_and_legacy_keys_are_accepted(tmp_path):
    state = {f"module.{k}": v.numpy() for k, v in d2_state(**TINY_SIZES).items()}
    state["module.proposal_generator.anchor_generator.cell_anchors.0"] = np.zeros((3, 4), dtype=np.float32)
    state["module.pixel_mean"] = np.array(TINY.pixel_mean, dtype=np.float32).reshape(3, 1, 1)
    path = tmp_path / "np.pth"
    torch.save({"model": state, "iteration": 10}, path)
    model = load_cutler(path, TINY)
    expected = d2_state(**TINY_SIZES)["roi_heads.mask_head.deconv.weight"]
    assert torch.equal(model.state_dict()["roi_heads.mask_head.deconv.weight"], expected)
    # Built on the meta device: every parameter came from the file, and the buffers no checkpoint holds (anchors,
    # pixel statistics) were made for real, so the detector runs.
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert torch.equal(model.pixel_mean.flatten(), torch.tensor(TINY.pixel_mean))
    (found,) = model.detect([torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)], score_threshold=0.0)
    assert found.masks.shape[1:] == (48, 64)


# --- checkpoint errors: one line each, naming the problem ---


@pytest.fixture
def tiny_model() -> CutlerDetector:
    return CutlerDetector(TINY)


def test_missing_key(tiny_model):
    state = d2_state(**TINY_SIZES)
    del state["roi_heads.box_head.1.fc2.bias"]
    with pytest.raises(CheckpointError) as excinfo:
        map_state_dict(tiny_model, state)
    assert error_line(excinfo) == "missing key roi_heads.box_head.1.fc2.bias"


def test_unexpected_key(tiny_model):
    state = d2_state(**TINY_SIZES)
    state["roi_heads.box_head.3.fc1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as excinfo:
        map_state_dict(tiny_model, state)
    assert error_line(excinfo) == "unexpected key roi_heads.box_head.3.fc1.weight"


def test_shape_mismatch(tiny_model):
    state = d2_state(**TINY_SIZES)
    state["proposal_generator.rpn_head.anchor_deltas.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(CheckpointError) as excinfo:
        map_state_dict(tiny_model, state)
    assert error_line(excinfo) == (
        "shape mismatch for proposal_generator.rpn_head.anchor_deltas.weight: checkpoint (8, 16, 1, 1), "
        "model (12, 16, 1, 1)"
    )


def test_full_checkpoint_does_not_fit_the_tiny_config(tiny_model, full_state):
    # The first TINY key in model order exists with another shape, but FULL has keys TINY lacks, found first.
    with pytest.raises(CheckpointError, match=r"^unexpected key backbone\.bottom_up\.res2\.1\.conv1\.weight$"):
        map_state_dict(tiny_model, full_state)


def test_pixel_statistics_are_checked(tiny_model):
    state = d2_state(**TINY_SIZES)
    state["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)  # detectron2's BGR default
    with pytest.raises(CheckpointError, match=r"^pixel_mean in the checkpoint is"):
        map_state_dict(tiny_model, state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save({"model": d2_state(**TINY_SIZES)}, whole)
    else:
        torch.save({"model": d2_state(**TINY_SIZES)}, tmp_path / "src.pth")
        convert(tmp_path / "src.pth", whole, TINY)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError) as excinfo:
        load_cutler(cut, TINY)
    assert "truncated" in error_line(excinfo)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", bytes(range(256)) * 4])
def test_non_checkpoint_file(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        load_cutler(path, TINY)
    assert error_line(excinfo).startswith(f"{path}: not a")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_cutler(tmp_path / "absent.pth", TINY)


def test_foreign_checkpoint(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_cutler(path, TINY)
    assert error_line(excinfo).startswith("not a detectron2 R-CNN checkpoint: none of its 320 keys")


def test_a_checkpoint_holding_objects_is_refused_without_running_it(tmp_path):
    path = tmp_path / "trainer.pth"
    torch.save({"model": d2_state(**TINY_SIZES), "scheduler": Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_cutler(path, TINY)
    assert "weights_only=True) refuses it (it pickles fractions.Fraction)" in error_line(excinfo)
    assert "keep only its weights" in str(excinfo.value)
    # The advice works: the weights alone load.
    torch.save({"model": torch.load(path, weights_only=False)["model"]}, tmp_path / "weights.pth")
    assert load_cutler(tmp_path / "weights.pth", TINY).state_dict().keys() == CutlerDetector(TINY).state_dict().keys()


# --- conversion to safetensors ---


def test_convert_round_trip_uses_no_pickle(tmp_path, monkeypatch):
    from safetensors import safe_open

    source = tmp_path / "cutler_tiny.pth"
    torch.save({"model": d2_state(**TINY_SIZES), "iteration": 1}, source)
    from_pth = load_cutler(source, TINY).state_dict()
    out = tmp_path / "cutler_tiny.safetensors"
    convert(source, out, TINY)
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["source"] == "cutler_tiny.pth" and metadata["config"] == "tiny"

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used to read a safetensors file")

    monkeypatch.setattr(torch, "load", no_pickle)
    from_safetensors = load_cutler(out, TINY).state_dict()
    assert from_pth.keys() == from_safetensors.keys()
    for name, tensor in from_pth.items():
        assert torch.equal(tensor, from_safetensors[name]), name


# --- the detector (tiny, random weights with planted object scores) ---


def planted_image(height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A uint8 RGB image: noise with a bright rectangle and a dark disc."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(60, 100, (3, height, width), generator=generator, dtype=torch.uint8)
    image[:, 20:60, 30:80] = 230
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image[:, (ys - 70) ** 2 + (xs - 100) ** 2 < 15**2] = 10
    return image


@pytest.fixture(scope="module")
def detector() -> CutlerDetector:
    """TINY with its object logits pushed up: random features still vary the scores, all well above 0.35."""
    model = random_cutler(TINY, seed=0)
    with torch.no_grad():
        for predictor in model.roi_heads.box_predictor:
            predictor.cls_score.bias.copy_(torch.tensor([3.0, 0.0]))
    return model


def test_random_weights_are_seeded():
    a, b, c = (random_cutler(TINY, seed).state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["roi_heads.box_head.0.fc1.weight"], c["roi_heads.box_head.0.fc1.weight"])


def test_detections_on_a_planted_image(detector):
    image = planted_image()
    (found,) = detector.detect([image])
    count = len(found.scores)
    assert 0 < count <= TINY.max_detections
    assert found.boxes.shape == (count, 4) and found.boxes.dtype == torch.float32
    assert found.scores.dtype == torch.float32 and (found.scores > TINY.score_threshold).all()
    assert (found.scores[:-1] >= found.scores[1:]).all()
    assert found.masks.shape == (count, 96, 128) and found.masks.dtype == torch.bool
    assert (found.boxes[:, 0] >= 0).all() and (found.boxes[:, 2] <= 128).all() and (found.boxes[:, 3] <= 96).all()
    assert (found.boxes[:, 2] > found.boxes[:, 0]).all() and (found.boxes[:, 3] > found.boxes[:, 1]).all()
    # Every mask pixel lies within a pixel of its box.
    ys, xs = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    for box, mask in zip(found.boxes, found.masks, strict=True):
        inside = (xs > box[0] - 1) & (xs < box[2] + 1) & (ys > box[1] - 1) & (ys < box[3] + 1)
        assert not (mask & ~inside).any()


def test_threshold_above_one_finds_nothing(detector):
    (found,) = detector.detect([planted_image()], score_threshold=1.01)
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,) and found.masks.shape == (0, 96, 128)


def test_a_batch_gives_each_image_its_own_detections(detector):
    first, second = planted_image(seed=1), planted_image(seed=2).flip(-1)
    batched = detector.detect([first, second])
    for image, together in zip((first, second), batched, strict=True):
        (alone,) = detector.detect([image])
        assert len(alone.scores) == len(together.scores) > 0
        torch.testing.assert_close(together.scores, alone.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(together.boxes, alone.boxes, atol=1e-3, rtol=0)
        assert (together.masks != alone.masks).float().mean() < 1e-3


def test_float_input_matches_uint8(detector):
    image = planted_image(128, 160)  # TINY's short side already: no resize, so no rounding difference
    (from_uint8,) = detector.detect([image])
    (from_float,) = detector.detect([image.float() / 255])
    torch.testing.assert_close(from_float.scores, from_uint8.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_float.boxes, from_uint8.boxes, atol=1e-3, rtol=0)


def test_low_precision_weights_keep_float32_boxes(detector):
    # bfloat16 also exercises the float32 fallback of roi_align, which has no bfloat16 kernel.
    (found,) = copy.deepcopy(detector).to(torch.bfloat16).detect([planted_image()])
    assert len(found.scores) > 0 and found.boxes.dtype == found.scores.dtype == torch.float32
    assert found.masks.dtype == torch.bool and found.masks.shape[1:] == (96, 128)


def test_rejects_non_rgb(detector):
    with pytest.raises(ValueError, match=r"CutLER takes \(3, H, W\) RGB images"):
        detector.detect([torch.zeros(1, 32, 32)])


# --- ops against hand-computed values ---


def test_resized_shape_is_torchvisions_resize_with_max_size():
    # REFERENCE 3, torchvision's Resize(800, max_size=1333): short side 800, long = int(800 * long / short), and
    # when that exceeds 1333: long 1333, short = int(1333 * 800 / truncated long).
    assert resized_shape(480, 640, 800, 1333) == (800, 1066)  # 640 * 800 / 480 = 1066.67, truncated (not 1067)
    assert resized_shape(640, 480, 800, 1333) == (1066, 800)
    assert resized_shape(512, 512, 800, 1333) == (800, 800)
    assert resized_shape(500, 2000, 800, 1333) == (333, 1333)  # long 3200 capped: 1333 * 800 / 3200 = 333.25
    assert resized_shape(2000, 500, 800, 1333) == (1333, 333)
    assert resized_shape(375, 1000, 800, 1333) == (499, 1333)  # long int(2133.3) = 2133: 1333 * 800 / 2133 = 499.95
    assert resized_shape(640, 480, 128, 213) == (170, 128)  # 640 * 128 / 480 = 170.67


def test_resized_shape_and_resize_are_torchvisions_tensor_resize():
    """Against torchvision's own functional ``resize`` (the reference's transform, not ours): the same output size
    for any input shape, and the same pixels (the same bilinear kernel without antialiasing on the same float
    input, so bit-equal)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    generator = torch.Generator().manual_seed(0)
    for h, w in [(37, 53), (53, 37), (64, 64), (20, 90), (128, 160), (300, 200), (11, 400)]:
        image = torch.rand(3, h, w, generator=generator)
        expected = TF.resize(image * 255, 128, InterpolationMode.BILINEAR, max_size=213, antialias=False)
        assert resized_shape(h, w, 128, 213) == tuple(expected.shape[1:]), (h, w)
        assert torch.equal(resize_image(image, tuple(expected.shape[1:])), expected), (h, w)
        # A uint8 tensor: torchvision resizes it in float and rounds back to bytes.
        as_bytes = (image * 255).round().to(torch.uint8)
        expected = TF.resize(as_bytes, 128, InterpolationMode.BILINEAR, max_size=213, antialias=False)
        assert torch.equal(resize_image(as_bytes, tuple(expected.shape[1:])), expected.float()), (h, w)


def test_detector_input_is_the_torchvision_resized_float_image(detector):
    # What the network sees: the float support image resized as the reference's Resize(min, max_size) does (no
    # antialiasing, long side truncated), in 0-255 units, normalised with CutLER's RGB statistics, zero-padded.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = torch.rand(3, 70, 45, generator=torch.Generator().manual_seed(1))
    batch, sizes = detector._preprocess([image])
    resized = TF.resize(image * 255, 128, InterpolationMode.BILINEAR, max_size=213, antialias=False)
    assert sizes == [(199, 128)] == [tuple(resized.shape[1:])]  # 70 * 128 / 45 = 199.1
    mean = torch.tensor([123.675, 116.280, 103.530]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.120, 57.375]).view(3, 1, 1)
    assert batch.shape == (1, 3, 224, 128)  # padded to multiples of 32
    assert torch.equal(batch[0, :, :199], (resized - mean) / std)
    assert not batch[0, :, 199:].any()


def test_box_coder_round_trip():
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(50, 2, generator=generator) * 100
    reference = torch.cat([corner, corner + 1 + torch.rand(50, 2, generator=generator) * 50], dim=1)
    corner = torch.rand(50, 2, generator=generator) * 100
    target = torch.cat([corner, corner + 1 + torch.rand(50, 2, generator=generator) * 50], dim=1)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), math.log(1000 / 16))
    torch.testing.assert_close(coder.decode(coder.encode(reference, target), reference), target, atol=1e-4, rtol=0)


def test_box_coder_decodes_by_hand():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), math.log(1000 / 16))
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # width 10, height 20, centre (5, 10)
    # dx = 10/10 = 1 width right, dy = -20/10 = 2 heights up, dw = 5 log 2 / 5: width doubles, dh = 0.
    deltas = torch.tensor([[10.0, -20.0, 5 * math.log(2), 0.0]])
    torch.testing.assert_close(coder.decode(deltas, reference), torch.tensor([[5.0, -40.0, 25.0, -20.0]]))
    # dw = 100 / 5 = 20 is clamped to log(1000 / 16): the width grows 62.5 times, around the centre x = 5.
    wide = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), reference)
    torch.testing.assert_close(wide, torch.tensor([[5 - 312.5, 0.0, 5 + 312.5, 20.0]]))


def test_level_assignment_by_hand():
    sides = torch.tensor([224.0, 223.0, 112.0, 111.0, 448.0, 56.0, 10.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    # floor(4 + log2(side / 224 + 1e-8)), clamped to [2, 5]
    assert assign_levels(boxes, 2, 5, 224, 4).tolist() == [4, 3, 3, 2, 5, 2, 2, 5]
    # sqrt(area), not the long side: 448 x 112 has the area of a 224 square.
    assert assign_levels(torch.tensor([[0.0, 0.0, 448.0, 112.0]]), 2, 5, 224, 4).tolist() == [4]


def test_anchors_by_hand():
    cells = cell_anchors(32, (0.5, 1.0, 2.0))
    half_w = math.sqrt(32**2 / 0.5) / 2  # ratio is height / width: 0.5 is a wide anchor
    torch.testing.assert_close(cells[0], torch.tensor([-half_w, -half_w / 2, half_w, half_w / 2]))
    torch.testing.assert_close(cells[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    anchors = grid_anchors(cells, (2, 3), stride=4, offset=0.0)
    assert anchors.shape == (2 * 3 * 3, 4)
    # location (y=1, x=2), anchor 1 (square): index (1 * 3 + 2) * 3 + 1, centred on (8, 4).
    torch.testing.assert_close(anchors[16], torch.tensor([8.0 - 16, 4.0 - 16, 8.0 + 16, 4.0 + 16]))


def test_paste_full_mask_fills_exactly_its_box():
    expected = torch.zeros(60, 70, dtype=torch.bool)
    expected[20:48, 10:38] = True
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 38.0, 48.0]]), (60, 70), 0.5)
    assert torch.equal(pasted[0], expected)


def test_paste_interpolates_a_planted_mask():
    mask = torch.zeros(1, 28, 28)
    mask[0, 5:9, 10] = 1.0  # one column of four mask pixels
    # A 56 x 56 box at (4, 6): each mask pixel covers 2 x 2 image pixels, and image pixel (x, y) samples the mask
    # bilinearly at ((x - 4) / 2 - 0.25, (y - 6) / 2 - 0.25). Columns: mask column 10 reads 0.25, 0.75, 0.75, 0.25
    # at x - 4 = 19, 20, 21, 22, so x = 24, 25 reach 0.5. Rows: mask rows 5..8 read 0.25 at y - 6 = 9, 0.75 at 10,
    # 1 from 11 to 16, 0.75 at 17 and 0.25 at 18, so y = 16..23.
    pasted = paste_masks(mask, torch.tensor([[4.0, 6.0, 60.0, 62.0]]), (70, 70), 0.5)
    expected = torch.zeros(70, 70, dtype=torch.bool)
    expected[16:24, 24:26] = True
    assert torch.equal(pasted[0], expected)


# --- the command line ---


def test_models_convert_cli(tmp_path):
    from typer.testing import CliRunner

    from ovdiff_cli.cli import app

    runner = CliRunner()
    # A full-size detectron2 state dict (zeros: the values do not matter here), as the release file holds it.
    state = {name: torch.zeros(shape) for name, shape in detectron2_cutler_keys()}
    source = tmp_path / "cutler_cascade_final.pth"
    torch.save({"model": state}, source)
    result = runner.invoke(app, ["models", "convert", "cutler", str(source), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (
        doc["keys_mapped"] == FULL_KEYS - FULL_NUM_BATCHES_TRACKED and doc["keys_ignored"] == FULL_NUM_BATCHES_TRACKED
    )
    assert doc["parameters"] == FULL_PARAMETERS
    assert doc["first_names"][0] == "backbone.fpn_lateral2.weight"
    assert doc["last_names"][-1] == "roi_heads.mask_head.predictor.bias"
    converted = tmp_path / "cutler_cascade_final.safetensors"
    assert doc["out"] == str(converted) and converted.is_file()
    # Errors are one line, exit 2: a foreign checkpoint, a truncated one, another model name.
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[:1000])
    for args in (["cutler", str(foreign)], ["cutler", str(truncated)], ["sd", str(source)]):
        bad = runner.invoke(app, ["models", "convert", *args])
        assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
