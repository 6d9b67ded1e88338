"""Eq. 4, the ensemble, sliding windows and prototype assembly on planted inputs with hand-computed answers."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import MeanColourExtractor, PixelExtractor, protoset

from ovdiff_cli import segmentation as S
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.extractors.base import l2n
from ovdiff_cli.prototypes import BG, FG, KIND_CLASS, KIND_INSTANCE, ExtractorPrototypes, PrototypeBank


def image(pixels: list[list[tuple[float, float, float]]]) -> torch.Tensor:
    return torch.tensor(pixels).permute(2, 0, 1).float()


def no_windows_opts(size: int) -> S.SegmentOptions:
    return S.SegmentOptions(scales=(size,), stride=size, short_side=size, prefilter=False)


# --- eq. 4 --------------------------------------------------------------------------------------------------------


def test_eq4_on_planted_colours_with_background():
    # features = colour; class a (1) is red, class b (2) is green, the background class (0) is a's blue bg proto.
    ext = PixelExtractor(torch.eye(3))
    ps = protoset({"x": [[0, 0, 1], [1, 0, 0], [0, 1, 0]]}, channel=[0, 1, 2], source=[1, 1, 2])
    red, green, blue = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    # (0.6, 0.5, 0): cos to red 0.768 > green 0.640 -> a.  (0.2, 0.3, 0.9): blue wins -> background.
    # (0.5, 0.5, 0.1): red = green = 0.700 -> the first channel among equals, a.
    pixels = [[red, green, blue, (0.6, 0.5, 0.0)], [(0.2, 0.3, 0.9), (0.5, 0.5, 0.1), green, red]]
    pixels = [row * 4 for row in pixels] * 8  # 16 x 16, each column pattern repeated
    seg = S.Segmenter(ps, {"x": ext}, no_windows_opts(16))([image(pixels)])[0]
    expected_row = [[1, 2, 0, 1] * 4, [0, 1, 2, 1] * 4]
    assert seg.labels().tolist() == expected_row * 8
    # the scores are the cosine similarities themselves: pixel (0, 3) scores 0.6/0.781 for a
    assert seg.scores[1, 0, 3].item() == pytest.approx(0.6 / math.hypot(0.6, 0.5), abs=1e-6)


def toward(f: list[float], c: float) -> list[float]:
    """The 2-d unit vector whose cosine with the unit vector ``f`` is ``c``."""
    perp = [-f[1], f[0]]
    s = math.sqrt(1 - c * c)
    return [c * f[0] + s * perp[0], c * f[1] + s * perp[1]]


def test_each_extractor_takes_its_max_then_the_extractors_are_averaged():
    # REFERENCE 6: max over a class's prototypes per extractor, then the mean. Class a has two prototypes: a1 is
    # close in p (0.9) and far in q (0.1), a2 the other way round; class b has one at 0.7 in both.
    # Reference: a = (0.9 + 0.9) / 2 = 0.9 > b = 0.7. (The mean per prototype first would give a 0.5 < b 0.7.)
    fp, fq = [0.6, 0.8], [0.8, -0.6]
    ps = protoset(
        {
            "p": [toward(fp, 0.9), toward(fp, 0.1), toward(fp, 0.7)],
            "q": [toward(fq, 0.1), toward(fq, 0.9), toward(fq, 0.7)],
        },
        channel=[1, 1, 2],
        source=[1, 1, 2],
    )
    p = PixelExtractor(torch.zeros(3, 2), torch.tensor(fp))
    q = PixelExtractor(torch.zeros(3, 2), torch.tensor(fq))
    px = image([[(0.5, 0.5, 0.5)] * 16] * 16)
    both = S.Segmenter(ps, {"p": p, "q": q}, no_windows_opts(16))([px])[0]
    assert set(both.labels().flatten().tolist()) == {1}
    assert both.scores[1:, 0, 0].tolist() == pytest.approx([0.9, 0.7], abs=1e-5)
    assert both.scores[0, 0, 0].item() == S.EXCLUDED_SCORE  # no background prototypes at all


def test_scores_average_every_extractor_window_pair_covering_a_pixel():
    # A 16 x 32 image, red left half, green right half; windows of 16 with stride 16 (x = 0 and 16) plus the
    # whole image. Extractor m sees each window's mean colour, extractor n each pixel's colour.
    # Class a = red (and a blue decoy that m's max ignores), class b = green.
    red, green = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    img = image([[red] * 16 + [green] * 16] * 16)
    rows = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    ps = protoset({"m": rows, "n": rows}, channel=[1, 1, 2], source=[1, 1, 2])
    opts = S.SegmentOptions(scales=(16,), stride=16, short_side=16, prefilter=False, background=False)
    seg = S.Segmenter(ps, {"m": MeanColourExtractor(None), "n": PixelExtractor(torch.eye(3))}, opts)
    assert seg.windows(16, 32) == [(0, 0, 16, 16), (0, 16, 16, 16), (0, 0, 16, 32)]
    scores = seg([img])[0].scores
    # Left pixel: pairs (m, left window) a 1 b 0; (m, whole) a = b = cos(red, (.5, .5, 0)) = 0.7071;
    # (n, left) and (n, whole) a 1 b 0. One count per pair: a = 3.7071 / 4, b = 0.7071 / 4.
    c = 1 / math.sqrt(2)
    assert scores[1:, 5, 3].tolist() == pytest.approx([(3 + c) / 4, c / 4], abs=1e-6)
    assert scores[1:, 5, 20].tolist() == pytest.approx([c / 4, (3 + c) / 4], abs=1e-6)
    # Without the whole-image window: only the sliding windows count.
    no_whole = S.Segmenter(ps, seg.extractors, S.SegmentOptions(**{**vars(opts), "whole_image": False}))
    assert no_whole([img])[0].scores[1:, 5, 3].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_labels_zero_scores_at_most_zero_and_ties_go_to_background():
    scores = torch.tensor([[[-0.2, 0.1]], [[-0.1, 0.3]], [[-0.05, 0.3]]])  # (K=3, 1, 2)
    # Pixel 0: every score <= 0 becomes 0: a tie, so background. Pixel 1: class 1 and 2 tie: class 1.
    assert S.Segmentation(scores, (1, 2), (1, 2)).labels().tolist() == [[0, 1]]
    # Without background channel 0 takes no part: pixel 0 ties between the classes, so the first class.
    assert S.Segmentation(scores, (1, 2), (1, 2), background=False).labels().tolist() == [[1, 1]]


def test_class_scores_max_per_channel_and_excluded():
    sims = torch.tensor([[0.1, 0.7, 0.3, -0.5, 0.2]])
    bounds = [0, 0, 3, 5]  # channel 0 empty, channel 1 = rows 0-2, channel 2 = rows 3-4
    assert S.EXCLUDED_SCORE == -1.0
    assert S.class_scores(sims, bounds).tolist() == [[-1.0, pytest.approx(0.7), pytest.approx(0.2)]]
    # Prototypes of removed classes score -1, as the reference scores them.
    allowed = torch.tensor([[True, False, True, False, False]])
    assert S.class_scores(sims, bounds, allowed).tolist() == [[-1.0, pytest.approx(0.3), -1.0]]


def test_removed_class_and_its_background_prototypes_do_not_vote():
    # a's bg prototype is blue; with a removed, background can only use b's bg prototype (cyan).
    ext = PixelExtractor(torch.eye(3))
    ps = protoset({"x": [[0, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]]}, channel=[0, 0, 1, 2], source=[1, 2, 1, 2])
    seg = S.Segmenter(ps, {"x": ext}, no_windows_opts(16))
    px = image([[(0, 0, 1)] * 16] * 16)  # pure blue: bg via a's prototype (1.0) or via b's cyan (0.707)
    allowed = ps.allowed([2])["x"][None]
    scores = seg.eq4("x", ext(px[None]), allowed)[0]
    assert scores[0, 0, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert scores[1, 0, 0].item() == S.EXCLUDED_SCORE
    assert ps.allowed([1])["x"].tolist() == [True, False, True, False]


class RecordingPrefilter:
    """Pre-filter stand-in: records the images the segmenter hands it and keeps class 1 only."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def image_embeddings(self, images, batch=None):
        self.images += list(images)
        return torch.zeros(len(images), 4)

    def __call__(self, emb):
        return (0,)


def test_prefilter_is_handed_the_pil_lanczos_working_image():
    # REFERENCE 6: the filter resizes the reference's working image, the input's bytes resized by PIL's Lanczos to
    # short side 448 (here 16; the long side truncated: 24 * 16 / 20 = 19.2 -> 19), not the float working image.
    from PIL import Image

    ext = PixelExtractor(torch.eye(3))
    ps = protoset({"x": [[0, 0, 1], [1, 0, 0], [0, 1, 0]]}, channel=[0, 1, 2], source=[1, 1, 2])
    pre = RecordingPrefilter()
    opts = S.SegmentOptions(scales=(16,), stride=16, short_side=16, prefilter=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (seg,) = S.Segmenter(ps, {"x": ext}, opts, prefilter=pre)([torch.from_numpy(pixels).permute(2, 0, 1)])
    expected = np.asarray(Image.fromarray(pixels).resize((19, 16), Image.LANCZOS))
    (seen,) = pre.images
    assert seen.dtype == torch.uint8 and np.array_equal(seen.permute(1, 2, 0).numpy(), expected)
    assert seg.kept == (1,)


# --- sliding windows ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(448, 448, 224), (600, 448, 224), (700, 336, 224), (50, 16, 7)]
)
def test_window_offsets_cover_everything_and_stay_inside(length, window, stride):
    offs = S.window_offsets(length, window, stride)
    assert offs[0] == 0 and offs[-1] == length - window
    assert all(0 <= b - a <= stride for a, b in itertools.pairwise(offs))
    covered = torch.zeros(length)
    for o in offs:
        covered[o : o + window] += 1
    assert bool((covered >= 1).all())
    # mmseg's slide grid: max(L - W + S - 1, 0) // S + 1 windows
    assert len(offs) == max(length - window + stride - 1, 0) // stride + 1


def test_windows_are_the_slide_grid_plus_the_whole_image():
    seg = S.Segmenter(protoset({"x": [[1, 0, 0]]}, channel=[1], source=[1]), {"x": PixelExtractor(torch.eye(3))})
    wins = seg.windows(375, 500)  # resized to 448 x 597
    assert wins == [(0, 0, 448, 448), (0, 149, 448, 448)] + [
        (y, x, 336, 336) for y in (0, 112) for x in (0, 224, 261)
    ] + [(0, 0, 448, 597)]


def test_resized_size():
    assert S.resized_size(375, 500, 448) == (448, 597)
    # The reference truncates the long side (int(501 * 448 / 375) = int(598.528) = 598); rounding would give 599.
    assert S.resized_size(375, 501, 448) == (448, 598) and S.resized_size(501, 375, 448) == (598, 448)
    assert S.resized_size(3, 5, 448) == (448, 746)  # upscaled: 746.67 -> 746
    assert S.resized_size(1000, 800, 448) == (560, 448)
    assert S.resized_size(448, 448, 448) == (448, 448)


def test_sliding_windows_equal_a_whole_image_pass_for_an_equivariant_extractor():
    torch.manual_seed(0)
    ext = PixelExtractor(torch.randn(3, 6), torch.randn(6))
    ps = protoset({"x": torch.randn(5, 6).tolist()}, channel=[0, 1, 1, 2, 2], source=[1, 1, 1, 2, 2], names=("a", "b"))
    img = torch.rand(3, 32, 56)
    opts = S.SegmentOptions(scales=(32, 16), stride=8, short_side=32, prefilter=False, batch_size=3)
    windowed = S.Segmenter(ps, {"x": ext}, opts)([img])[0]
    whole = S.class_scores(ext(img[None])[0] @ ps.sets["x"].prototypes.T, ps.sets["x"].bounds).permute(2, 0, 1)
    torch.testing.assert_close(windowed.scores, whole, atol=1e-6, rtol=0)
    # and the batch size does not change anything
    opts1 = S.SegmentOptions(scales=(32, 16), stride=8, short_side=32, prefilter=False, batch_size=1)
    torch.testing.assert_close(S.Segmenter(ps, {"x": ext}, opts1)([img])[0].scores, windowed.scores)


def test_windows_of_a_batch_of_images_equal_one_by_one():
    torch.manual_seed(1)
    exts = {"p": PixelExtractor(torch.randn(3, 4)), "q": PixelExtractor(torch.randn(3, 4), torch.randn(4))}
    ps = protoset({e: torch.randn(3, 4).tolist() for e in exts}, channel=[0, 1, 2], source=[1, 1, 2])
    opts = S.SegmentOptions(scales=(32, 16), stride=16, short_side=32, prefilter=False, batch_size=4)
    seg = S.Segmenter(ps, exts, opts)
    imgs = [torch.rand(3, 40, 64), (torch.rand(3, 70, 50) * 255).to(torch.uint8)]
    together = seg(imgs)
    for img, res in zip(imgs, together, strict=True):
        # bit for bit: how the windows of several images share batches never changes an image's sums
        assert torch.equal(seg([img])[0].scores, res.scores)
    assert together[0].size == (40, 64) and together[1].size == (70, 50)
    # 70 x 50 is resized to short side 32: 45 x 32 (scores live at that working resolution)
    assert together[1].scores.shape == (3, 44, 32)  # 70 * 32 / 50 = 44.8, truncated as the reference does


# --- upsampling to the input size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_len", "in_len"), [(10, 4), (448, 56), (375, 448), (7, 7), (3, 9)])
def test_interpolation_matrix_matches_f_interpolate(out_len, in_len):
    x = torch.rand(in_len, 5, generator=torch.Generator().manual_seed(out_len))
    ref = F.interpolate(x.T[None], size=out_len, mode="linear", align_corners=False)[0].T
    torch.testing.assert_close(S.interpolation_matrix(out_len, in_len) @ x, ref, atol=1e-5, rtol=0)


def test_upsampling_a_few_classes_at_a_time_equals_one_pass(monkeypatch):
    scores = torch.rand(5, 9, 13)
    scores[3, 2:5, 4:9] = scores[1, 2:5, 4:9]  # exact ties: the lower class id must win, as argmax does
    chunks = list(S._upsampled_chunks(scores, (50, 31), max_elements=2 * 50 * 31))
    assert [(a, b) for a, b, _ in chunks] == [(0, 2), (2, 4), (4, 5)]
    ref = F.interpolate(scores[None], size=(50, 31), mode="bilinear", align_corners=False)[0]
    assert torch.equal(torch.cat([c for _, _, c in chunks]), ref)
    seg = S.Segmentation(scores, (50, 31), (1, 2, 3))
    assert np.array_equal(seg.labels(), ref.argmax(0).numpy())
    # one class per chunk: the running arg-max must give the same labels
    monkeypatch.setattr(S, "_upsampled_chunks", functools.partial(S._upsampled_chunks, max_elements=1))
    assert np.array_equal(S.Segmentation(scores, (50, 31), (1,)).labels(), ref.argmax(0).numpy())
    assert seg.input_scores().shape == (5, 50, 31) and seg.input_scores().dtype == np.float16
    assert S.Segmentation(scores, (50, 31), (1,), background=False).input_scores().shape == (4, 50, 31)
    x, y = 17, 40
    torch.testing.assert_close(seg.pixel_scores(x, y), ref[:, y, x], atol=1e-5, rtol=0)


# --- assembling eq. 4's prototypes from banks (with the stuff filter) ---------------------------------------------


def planted_protos(fg: list[list[float]], bg: list[list[float]], n: int) -> ExtractorPrototypes:
    """One extractor's class prototype + instances per region, vectors as given (first row = class proto)."""
    rows = fg + bg
    kind, image = [], []
    for region in (fg, bg):
        if region:
            kind += [KIND_CLASS] + [KIND_INSTANCE] * (len(region) - 1)
            image += [-1, *range(len(region) - 1)]
    masks = torch.zeros(n, 2, 2, dtype=torch.bool)  # provenance is not what these tests are about
    return ExtractorPrototypes(
        prototypes=l2n(torch.tensor(rows, dtype=torch.float32)),
        kind=torch.tensor(kind, dtype=torch.int8),
        region=torch.tensor([FG] * len(fg) + [BG] * len(bg), dtype=torch.int8),
        image=torch.tensor(image, dtype=torch.int16),
        part=torch.full((len(rows),), -1, dtype=torch.int16),
        fg_masks=masks,
        bg_masks=masks,
        part_fg=torch.full((n, 2, 2), -1, dtype=torch.int16),
        part_bg=torch.full((n, 2, 2), -1, dtype=torch.int16),
    )


def planted_bank(name: str, fg: list[list[float]], bg: list[list[float]], **more: tuple[list, list]) -> PrototypeBank:
    """A bank with extractor "x" (and any ``more``: name -> (fg, bg)), vectors as given."""
    n = max(len(r) for pair in [(fg, bg), *more.values()] for r in pair) + 1
    per = {"x": planted_protos(fg, bg, n)} | {e: planted_protos(f, b, n) for e, (f, b) in more.items()}
    return PrototypeBank(name, per, [f"k{i}" for i in range(n)])


def test_stuff_filter_drops_exactly_the_planted_thing_bg_prototypes():
    boat = planted_bank("boat", fg=[[1, 0, 0], [1, 0.1, 0]], bg=[[0, 1, 0], [0, 0.3, 1], [0.1, 1, 0.05]])
    sky = planted_bank("sky", fg=[[0, 1, 0.01], [0, 1, 0.1]], bg=[[0, 0, 1], [0.2, 0, 1]])
    ps = S.build_prototype_set([boat, sky], [ClassSpec("boat"), ClassSpec("sky", stuff=True)])
    # boat's bg rows 2 ([0,1,0]) and 4 ([0.1,1,0.05]) look like sky (cos > 0.85) and go; row 3 stays.
    # sky is stuff: its bg prototypes never enter.
    assert ps.dropped == {"x": 2}
    x = ps.sets["x"]
    bg = x.channel == 0
    assert x.source[bg].tolist() == [1] and x.index[bg].tolist() == [3]
    assert x.index[x.channel == 1].tolist() == [0, 1] and x.index[x.channel == 2].tolist() == [0, 1]
    assert x.bounds == [0, 1, 3, 5]
    # with the threshold above every similarity nothing is dropped
    specs = [ClassSpec("boat"), ClassSpec("sky", True)]
    assert S.build_prototype_set([boat, sky], specs, stuff_threshold=1.0).dropped == {"x": 0}


def test_stuff_filter_decides_per_extractor():
    # boat's bg prototype looks like sky in extractor x (cos 1) but not in extractor y (cos 0): it is dropped
    # from x only.
    boat = planted_bank("boat", fg=[[1, 0]], bg=[[0, 1]], y=([[1, 0]], [[0, 1]]))
    sky = planted_bank("sky", fg=[[0, 1]], bg=[], y=([[1, 0]], []))
    ps = S.build_prototype_set([boat, sky], [ClassSpec("boat"), ClassSpec("sky", stuff=True)])
    assert ps.dropped == {"x": 1, "y": 0}
    assert (ps.sets["x"].channel == 0).sum() == 0 and (ps.sets["y"].channel == 0).sum() == 1


def test_no_background_protocol_has_no_background_prototypes():
    boat = planted_bank("boat", fg=[[1, 0, 0]], bg=[[0, 1, 0]])
    ps = S.build_prototype_set([boat], [ClassSpec("boat")], background=False)
    assert ps.sets["x"].channel.tolist() == [1] and not ps.background


def test_build_prototype_set_rejects_mismatched_banks():
    boat = planted_bank("boat", fg=[[1, 0, 0]], bg=[])
    with pytest.raises(ValueError, match="one prototype bank per class"):
        S.build_prototype_set([boat], [ClassSpec("boat"), ClassSpec("cat")])
    other = planted_bank("cat", fg=[[1, 0, 0]], bg=[], y=([[1, 0]], []))
    with pytest.raises(ValueError, match=r"different extractors: x and x, y$"):  # names, not a tuple's repr
        S.build_prototype_set([boat, other], [ClassSpec("boat"), ClassSpec("cat")])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scales": "448,abc"}, "--scales '448,abc'"),
        ({"scales": (450,)}, "multiples of 16"),
        ({"scales": (448,), "short_side": 336}, "larger than --short-side 336"),
        ({"scales": (448, 448)}, "listed twice"),
        ({"stride": 0}, "--stride 0"),
        ({"eta": 0}, "--eta 0"),
        ({"stuff_threshold": 2.0}, "--stuff-threshold"),
        ({"batch_size": 0}, "--window-batch 0: must be at least 1"),  # the CLI's name for the field
    ],
)
def test_segment_options_validation(kwargs, needle):
    with pytest.raises(ValueError) as info:
        S.SegmentOptions(**kwargs)
    assert needle in str(info.value)


def test_segment_options_parse_strings():
    assert S.SegmentOptions(scales="448, 336").scales == (448, 336)


def test_pixel_similarities_equal_the_per_pixel_features():
    torch.manual_seed(2)
    ext = PixelExtractor(torch.randn(3, 5), torch.randn(5))
    ps = protoset({"x": torch.randn(4, 5).tolist()}, channel=[0, 1, 1, 2], source=[1, 1, 1, 2])
    seg = S.Segmenter(ps, {"x": ext}, S.SegmentOptions(scales=(32, 16), stride=8, short_side=32, prefilter=False))
    img = torch.rand(3, 32, 40)
    sims = seg.pixel_similarities(img, 13, 29)["x"]
    expected = ext(img[None])[0, 13, 29] @ ps.sets["x"].prototypes.T  # every covering window sees the same feature
    torch.testing.assert_close(sims, expected, atol=1e-6, rtol=0)


def test_compile_wraps_each_extractor_once(monkeypatch):
    compiled = []

    def fake_compile(fn, dynamic=None):
        compiled.append(dynamic)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    ps = protoset({"x": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, channel=[0, 1, 2], source=[1, 1, 2])
    S.Segmenter(ps, {"x": PixelExtractor(torch.eye(3))}, no_windows_opts(16), compile=True)
    assert compiled == [False]  # static shapes: one compile per window size, never per image


@pytest.mark.slow
def test_compiled_extractors_give_the_eager_scores(tiny_models):
    from ovdiff_cli.extractors import build_extractor

    torch.manual_seed(0)
    ps = protoset({"dino": torch.randn(3, 32).tolist()}, channel=[0, 1, 2], source=[1, 1, 2])
    opts = S.SegmentOptions(scales=(64, 48), stride=32, short_side=64, prefilter=False, batch_size=2)
    img = torch.rand(3, 64, 96)
    ext = {"dino": build_extractor("dino", tiny_models)}
    eager = S.Segmenter(ps, ext, opts)([img])[0].scores
    compiled = S.Segmenter(ps, ext, opts, compile=True)([img])[0].scores
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_window_batches_default_to_one_window_on_the_cpu():
    from ovdiff_cli import defaults as D

    ps = protoset({"x": [[0, 0, 1], [1, 0, 0], [0, 1, 0]]}, channel=[0, 1, 2], source=[1, 1, 2])
    seg = S.Segmenter(ps, {"x": object()}, S.SegmentOptions(), device="cpu")
    assert seg.options.batch_size == D.CPU_BATCH_SIZE == 1
    # 448x448: one 448 window and four 336 windows, each its own batch; no padded slots.
    assert [size for _, size in seg._batches([torch.zeros(3, 448, 448)])] == [1] * 6
    assert S.Segmenter(ps, {"x": object()}, S.SegmentOptions(batch_size=4), device="cpu").options.batch_size == 4


class OneInputPixelExtractor(PixelExtractor):
    """PixelExtractor behind a resize of every window to 16x16, as SD and CLIP resize theirs to one input size."""

    def window_input(self) -> tuple[int, int]:
        return 16, 16

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        return self.window_input()


def test_one_input_extractors_batch_windows_of_every_size_together():
    """An extractor that resizes every window to one size gets all windows (both scales, then the whole image) in
    batches of batch_size, each window's crop resized on its own; one that sees windows at their own size keeps a
    stream per scale and each whole image alone. Either way a window's result does not depend on its group, so
    scores of images segmented together equal those of each alone, and explain's per-pixel similarities follow the
    same batches."""
    torch.manual_seed(0)
    ps = protoset({"x": torch.randn(3, 5).tolist(), "r": torch.randn(3, 5).tolist()}, [0, 1, 2], [1, 1, 2])
    exts = {"x": PixelExtractor(torch.randn(3, 5)), "r": OneInputPixelExtractor(torch.randn(3, 5))}
    opts = S.SegmentOptions(scales=(32, 16), stride=16, short_side=32, prefilter=False, batch_size=4)
    seg = S.Segmenter(ps, exts, opts)
    images = [torch.rand(3, 32, 48), torch.rand(3, 32, 32)]
    work = [seg.working_image(im) for im in images]
    # 32x48: 2 windows of 32, 6 of 16, 1 whole; 32x32: 1, 4, 1.
    assert seg.batch_counts(32, 48) == (2, 6, 9) and seg.batch_counts(32, 32) == (1, 4, 6)
    own = seg._extractor_batches(work, "x")
    assert [(len(c), size) for c, size in own] == [(3, 4), (4, 4), (4, 4), (2, 4), (1, 1), (1, 1)]
    one = seg._extractor_batches(work, "r")
    assert [(len(c), size) for c, size in one] == [(4, 4)] * 3 + [(3, 4)]
    assert [job for c, _ in one for job in c][-2:] == [(0, (0, 0, 32, 48)), (1, (0, 0, 32, 32))]
    x = seg._inputs(work, one[0][0], 4, "r")
    assert x.shape == (4, 3, 16, 16)
    i, (y, x0, h, w) = one[0][0][0]
    assert torch.equal(x[0], S.resize(work[i][None, :, y : y + h, x0 : x0 + w], (16, 16))[0])
    together = seg(images)
    for im, grouped in zip(images, together, strict=True):
        (alone,) = seg([im])
        assert torch.equal(grouped.scores, alone.scores)
    # explain's similarities at a pixel: the mean over its covering windows of the resized features there.
    sims = seg.pixel_similarities(work[1], 5, 20)["r"]
    covering = [(y, x, h, w) for y, x, h, w in seg.windows(32, 32) if y <= 5 < y + h and x <= 20 < x + w]
    expected = torch.zeros(3)
    for y, x, h, w in covering:
        feats = l2n(exts["r"](S.resize(work[1][None, :, y : y + h, x : x + w], (16, 16))))[0]
        rows = S.interpolation_matrix(h, 16)[5 - y]
        cols = S.interpolation_matrix(w, 16)[20 - x]
        expected += torch.einsum("h,w,hwd->d", rows, cols, feats) @ ps.sets["r"].prototypes.T / len(covering)
    torch.testing.assert_close(sims, expected, atol=1e-6, rtol=0)
