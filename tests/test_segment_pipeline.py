"""segment's file pipeline on planted prototypes: plan, segment, write, skip, interrupt (no generative model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from planted import PixelExtractor, protoset

from ovdiff_cli import outputs, pipeline
from ovdiff_cli import segmentation as S
from ovdiff_cli.inputs import find_images

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def colour_segmenter(batch_size: int = 4, cls: type[S.Segmenter] = S.Segmenter) -> S.Segmenter:
    """Features = colour; 'a' (1) is red, 'b' (2) is green, background (0) is a's blue bg prototype."""
    ps = protoset({"x": [[0, 0, 1], [1, 0, 0], [0, 1, 0]]}, channel=[0, 1, 2], source=[1, 1, 2])
    opts = S.SegmentOptions(scales=(32, 16), stride=16, short_side=32, prefilter=False, batch_size=batch_size)
    return cls(ps, {"x": PixelExtractor(torch.eye(3))}, opts)


@pytest.fixture
def planted(tmp_path):
    """Three images whose pixels are pure red, green or blue in known places."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    expected = {}
    for name, (h, w), split in [("wide", (32, 48), 20), ("sub/tall", (64, 32), 40), ("square", (32, 32), 8)]:
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :split] = RED
        img[: h // 2, split:] = GREEN
        img[h // 2 :, split:] = BLUE
        Image.fromarray(img).save(root / f"{name}.png")
        lab = np.zeros((h, w), np.int64)
        lab[:, :split], lab[: h // 2, split:] = 1, 2
        expected[name] = lab
    return root, expected


def test_files_get_the_hand_computed_labels(planted, tmp_path, writes):
    root, expected = planted
    out = tmp_path / "out"
    legend = outputs.build_legend(["a", "b"], [False, False])
    plan = pipeline.plan_outputs(find_images([str(root)]), out, scores=True)
    run = pipeline.segment_files(plan, colour_segmenter(), legend)
    assert (run.done, run.skipped, run.failed, run.interrupted) == (3, 0, [], False)
    for name, lab in expected.items():
        # short sides are 32 already (no resize) and features are per pixel: every label is exact
        assert np.array_equal(np.array(Image.open(out / f"{name}.png")), lab), name
        with np.load(out / f"{name}_scores.npz") as d:
            assert d["scores"][1, 0, 0] == pytest.approx(1.0, abs=1e-3)  # red pixel vs the red prototype
    assert set(run.timings.seconds) >= {"decode", "forward", "similarity", "accumulate", "upsample", "write"}


def test_plan_skips_complete_images_only(planted, tmp_path):
    root, _ = planted
    out = tmp_path / "out"
    items = find_images([str(root)])
    legend = outputs.build_legend(["a", "b"], [False, False])
    pipeline.segment_files(pipeline.plan_outputs(items, out), colour_segmenter(), legend)
    again = pipeline.plan_outputs(items, out)
    assert again.skipped == 3 and again.todo == []
    # nothing to do: no segmenter (and so no model) is needed
    assert pipeline.segment_files(again, None, legend).skipped == 3
    (out / "wide_overlay.jpg").unlink()
    assert [str(i.rel) for i, _ in pipeline.plan_outputs(items, out).todo] == ["wide"]
    assert pipeline.plan_outputs(items, out, scores=True).skipped == 0  # scores were never written
    assert len(pipeline.plan_outputs(items, out, overwrite=True).todo) == 3


@pytest.fixture(params=["in line", "worker thread"])
def writes(request, monkeypatch):
    """Both ways segment_files writes: in line (CPU) and on a worker thread (accelerators)."""
    monkeypatch.setattr(pipeline.segment, "writes_in_background", lambda segmenter: request.param == "worker thread")
    return request.param


def test_interrupt_stops_cleanly_with_complete_outputs(planted, tmp_path, writes):
    root, _ = planted

    class CtrlCOnSecondBatch(S.Segmenter):
        calls = 0

        def __call__(self, images):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(images)

    seg = colour_segmenter(batch_size=1, cls=CtrlCOnSecondBatch)  # one image per group
    out = tmp_path / "out"
    run = pipeline.segment_files(
        pipeline.plan_outputs(find_images([str(root)]), out), seg, outputs.build_legend(["a", "b"], [False] * 2)
    )
    assert run.interrupted and run.done == 1
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["square.png", "square_overlay.jpg"]


def test_unreadable_file_is_reported_and_the_rest_done(planted, tmp_path):
    root, _ = planted
    (root / "zero.png").write_bytes(b"")
    seen = []
    run = pipeline.segment_files(
        pipeline.plan_outputs(find_images([str(root)]), tmp_path / "out"),
        colour_segmenter(),
        outputs.build_legend(["a", "b"], [False] * 2),
        on_failure=lambda path, reason: seen.append((path.name, reason)),
    )
    assert run.done == 3 and seen == [("zero.png", "empty file (0 bytes)")] and run.total == 4


def test_an_unwritable_output_is_reported_and_the_rest_written(planted, tmp_path, writes):
    """Outputs are written on a worker thread: a write that fails there still reaches on_failure, in order, and the
    other images' outputs are complete."""
    root, expected = planted
    out = tmp_path / "out"
    (out / "wide_overlay.jpg").mkdir(parents=True)  # a folder where the overlay should go
    seen = []
    run = pipeline.segment_files(
        pipeline.plan_outputs(find_images([str(root)]), out),
        colour_segmenter(batch_size=1),
        outputs.build_legend(["a", "b"], [False] * 2),
        on_failure=lambda path, reason: seen.append((path.name, reason)),
    )
    assert run.done == 2 and [name for name, _ in seen] == ["wide.png"]
    assert seen[0][1].startswith("cannot write outputs")
    assert not (out / "wide.png").exists()  # no label map: the image stays to do
    for name in ("square", "sub/tall"):
        assert np.array_equal(np.array(Image.open(out / f"{name}.png")), expected[name])


def test_groups_end_when_every_window_size_fills_whole_batches(tmp_path, monkeypatch):
    """Images are grouped until their sliding windows fill whole batches at every scale (no padding slot), at most
    batch_size images; a window's result does not depend on its group, so the scores equal those of each image
    segmented alone. 32x48 inputs have 2 windows of 32 and 6 of 16: batches of 4 fill after two images (the old
    rule, a batch's worth of windows, sent every image alone); 32x32 ones have 1 and 4."""

    class Recording(S.Segmenter):
        def __call__(self, images):
            groups.append(len(images))
            return super().__call__(images)

    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    root.mkdir()
    colours = np.array([RED, GREEN, BLUE], np.uint8)
    shapes = [(32, 48)] * 3 + [(32, 32)] * 5
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(colours[rng.integers(0, 3, (h // 8, w // 8))].repeat(8, 0).repeat(8, 1)).save(root / f"{i}.png")
    items = find_images([str(root)])
    groups: list[int] = []
    seg = colour_segmenter(batch_size=4, cls=Recording)
    assert seg.batch_counts(32, 48) == (2, 6) and seg.batch_counts(32, 32) == (1, 4)
    results = list(pipeline.iter_segmentations([(item, None) for item in items], seg, on_failure=None))
    # 0, 1: aligned (4, 12) | 2-5: (5, 18) never aligned, so the cap of 4 images | 6, 7: the rest, (2, 8)
    assert groups == [2, 4, 2]
    alone = colour_segmenter(batch_size=4)
    for _item, _payload, img, grouped in results:
        (single,) = alone([torch.from_numpy(img).permute(2, 0, 1)])
        assert torch.equal(grouped.scores, single.scores)
    # A group also ends once its score maps reach the memory budget: 3 channels x 1 extractor x 32 x 48 float32.
    assert seg.score_bytes(32, 48) == 4 * 3 * 1 * 32 * 48
    monkeypatch.setattr(pipeline.segment.D, "GROUP_SCORE_BYTES", 4 * 3 * 32 * 48)
    groups.clear()
    list(pipeline.iter_segmentations([(item, None) for item in items], seg, on_failure=None))
    assert groups == [1, 1, 1, 2, 2, 1]  # a 32x48 image reaches the budget alone, two 32x32 ones do together
