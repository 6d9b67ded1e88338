"""Tests of ovdiff_cli.masks against hand-computed answers on planted arrays (CPU, fast): eq. 1 selection, MaskCut
and the threshold variant as the reference applies them (REFERENCE 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from skimage.filters import threshold_multiotsu

from ovdiff_cli import masks
from ovdiff_cli.defaults import MASKCUT_N_MASKS, MASKCUT_TAU, THRESHOLD_FALLBACK_BG, THRESHOLD_FALLBACK_FG
from ovdiff_cli.masks import (
    Masker,
    available_maskers,
    build_masker,
    maskcut_image,
    registered_maskers,
    resolve_masker_name,
    select_masks,
)


def _b(rows: list[str]) -> torch.Tensor:
    """Bool mask from strings of '0'/'1' (row by row)."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


def _box(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def _planted_features(labels: torch.Tensor, dim: int = 8, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """(h, w, dim) L2-normalised features: the one-hot vector of each pixel's label plus small noise."""
    g = torch.Generator().manual_seed(seed)
    f = torch.eye(dim)[labels] + noise * torch.randn(*labels.shape, dim, generator=g)
    return F.normalize(f, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# eq. 1 selection
# ----------------------------------------------------------------------------------------------------------


def _three_proposals() -> tuple[torch.Tensor, torch.Tensor]:
    """8x8: P0 = rows 0-1 x cols 0-1, P1 = rows 0-1 x cols 4-7, P2 = rows 5-7 x cols 0-2; background 0.1."""
    a = torch.full((8, 8), 0.1)
    a[0:2, 0:2] = torch.tensor([[0.8, 1.0], [0.6, 0.6]])  # mean 3.0 / 4 = 0.75
    a[0:2, 4:8] = torch.tensor([[0.9] * 4, [0.3] * 4])  # mean 4.8 / 8 = 0.6
    a[5:8, 0:3] = 0.0  # mean 0.0
    props = torch.stack([_box(8, 8, 0, 2, 0, 2), _box(8, 8, 0, 2, 4, 8), _box(8, 8, 5, 8, 0, 3)])
    return props, a


def test_select_fg_max_bg_min() -> None:
    props, a = _three_proposals()
    # Means: P0 0.75, P1 0.6, P2 0.0, background proposal (43 px of 0.1) 0.1 -> fg = P0, bg = P2.
    fg, bg = select_masks(props, a)
    assert fg.dtype == torch.bool and fg.shape == (8, 8)
    assert torch.equal(fg, props[0])
    # P2 eroded once with a 3x3 cross (the image border does not erode): row 5 and column 2 touch non-bg pixels.
    assert torch.equal(bg, _box(8, 8, 6, 8, 0, 2))
    fg0, bg0 = select_masks(props, a, erode=0)
    assert torch.equal(fg0, props[0]) and torch.equal(bg0, props[2])


def test_bg_erosion_is_a_cross_not_a_square() -> None:
    # The bg proposal is the 5x5 box rows 1-5 x cols 1-5 of a 7x7 image without its pixel (2, 2), which belongs
    # to the one instance proposal (everything else). A cross keeps (3, 3), whose missing neighbour (2, 2) is
    # only diagonal; a square would remove it.
    region = _box(7, 7, 1, 6, 1, 6)
    region[2, 2] = False
    a = torch.where(region, 0.05, 0.9)
    fg, bg = select_masks((~region)[None], a)
    assert torch.equal(fg, ~region)
    kept = {(2, 4), (3, 3), (3, 4), (4, 2), (4, 3), (4, 4)}
    assert {tuple(p) for p in torch.nonzero(bg).tolist()} == kept


def test_select_background_proposal_wins_bg_and_is_refined() -> None:
    a = torch.full((8, 8), 0.05)
    a[:, 0:4] = 0.8  # the single proposal: mean 0.8
    a[3, 6] = 0.5  # background proposal: (31 * 0.05 + 0.5) / 32 = 0.0640625
    props = _box(8, 8, 0, 8, 0, 4)[None]
    fg, bg = select_masks(props, a)
    assert torch.equal(fg, props[0])
    # bg = complement (cols 4-7) minus (3, 6) (attribution >= 0.2), then eroded once with a cross: column 4
    # touches the proposal; (2, 6), (4, 6), (3, 5) and (3, 7) touch the removed pixel.
    expected = _b(
        [
            "00000111",
            "00000111",
            "00000101",
            "00000000",
            "00000101",
            "00000111",
            "00000111",
            "00000111",
        ]
    )
    assert torch.equal(bg, expected)
    # Without erosion only the >= 0.2 pixel goes.
    _, bg0 = select_masks(props, a, erode=0)
    expected0 = ~props[0]
    expected0[3, 6] = False
    assert torch.equal(bg0, expected0)


def test_select_bg_max_removes_high_attribution_pixels() -> None:
    props, a = _three_proposals()
    a[6, 1] = 0.2  # not < 0.2: removed from bg (P2 mean 0.2/9 = 0.022, still the minimum)
    _, bg = select_masks(props, a, erode=0)
    expected = props[2].clone()
    expected[6, 1] = False
    assert torch.equal(bg, expected)
    _, bg_loose = select_masks(props, a, bg_max=0.25, erode=0)
    assert torch.equal(bg_loose, props[2])


def test_select_ties_go_to_the_background_proposal_first() -> None:
    a = torch.zeros(4, 4)
    a[0, :] = 0.7
    a[3, :] = 0.7
    # P0 (row 0) and P1 (row 3) tie at 0.7 for fg: P0 (the lower index) wins. The background proposal (row 2,
    # proposal 0 of the candidates) and P2 (row 1) tie at 0 for bg: the background proposal wins.
    props = torch.stack([_box(4, 4, 0, 1, 0, 4), _box(4, 4, 3, 4, 0, 4), _box(4, 4, 1, 2, 0, 4)])
    fg, bg = select_masks(props, a, erode=0)
    assert torch.equal(fg, props[0])
    assert torch.equal(bg, _box(4, 4, 2, 3, 0, 4))
    # Constant attribution: every candidate ties, so fg and bg are both the background proposal; fg keeps it.
    fg, bg = select_masks(props[:1], torch.full((4, 4), 0.1))
    assert torch.equal(fg, ~props[0]) and not bool(bg.any())


def test_fewer_than_two_proposals_use_the_fixed_thresholds_without_erosion() -> None:
    a = torch.zeros(6, 6)
    a[1:3, 1:3] = 0.9
    a[4, 4] = 0.5  # not > 0.5: not fg
    a[0, 5] = 0.3  # neither fg nor bg
    # No proposals: the background proposal is the whole image, one candidate.
    fg, bg = select_masks(torch.zeros(0, 6, 6, dtype=torch.bool), a)
    assert torch.equal(fg, _box(6, 6, 1, 3, 1, 3))
    assert torch.equal(bg, a < 0.2)  # not eroded
    # Empty proposals are left out, and a proposal covering the whole image leaves an empty background
    # proposal: one candidate again.
    for props in (torch.zeros(2, 6, 6, dtype=torch.bool), torch.ones(1, 6, 6, dtype=torch.bool)):
        fg2, bg2 = select_masks(props, a)
        assert torch.equal(fg2, fg) and torch.equal(bg2, bg)


def test_an_image_without_fg_is_skipped() -> None:
    # Fallback with nothing above 0.5: fg is empty, so bg is dropped too (the image gives no prototypes).
    fg, bg = select_masks(torch.zeros(0, 4, 4, dtype=torch.bool), torch.full((4, 4), 0.1))
    assert not bool(fg.any()) and not bool(bg.any())


def test_select_fg_and_bg_never_overlap() -> None:
    a = torch.zeros(8, 8)
    a[0:3] = 0.9
    a[3] = 0.1
    # Overlapping proposals: P0 rows 0-3 (mean 0.7), P1 rows 3-7 (mean 0.02) share row 3 (attribution 0.1).
    props = torch.stack([_box(8, 8, 0, 4, 0, 8), _box(8, 8, 3, 8, 0, 8)])
    fg, bg = select_masks(props, a, erode=0)
    assert torch.equal(fg, props[0])
    assert torch.equal(bg, _box(8, 8, 4, 8, 0, 8))


def _cross_erosion(mask: np.ndarray) -> np.ndarray:
    """One erosion with a 3x3 cross, the border counting as set (scipy's kernel, not ovdiff's)."""
    return ndi.binary_erosion(mask, ndi.generate_binary_structure(2, 1), border_value=1)


def test_select_passes_over_a_low_proposal_inside_a_higher_one() -> None:
    # 8x8: P0 rows 0-2 x cols 0-2 at 0.9 (mean 0.9); P1 rows 4-7 x cols 3-7 at 0.1 around P2 = rows 5-6 x cols 4-5
    # at 0.0, which lies wholly inside P1 (P1 mean 1.6 / 20 = 0.08, P2 mean 0.0); the background proposal (35 px)
    # at 0.15. Ranking: P0 > background 0.15 > P1 0.08 > P2 0.0. Every pixel of P2 goes to P1, so P2 wins none and
    # is passed over: bg = P1's pixels (all of P1), not P2.
    a = torch.full((8, 8), 0.15)
    a[0:3, 0:3] = 0.9
    a[4:8, 3:8] = 0.1
    a[5:7, 4:6] = 0.0
    props = torch.stack([_box(8, 8, 0, 3, 0, 3), _box(8, 8, 4, 8, 3, 8), _box(8, 8, 5, 7, 4, 6)])
    fg, bg = select_masks(props, a, erode=0)
    assert torch.equal(fg, props[0])
    assert torch.equal(bg, props[1])  # the whole-candidate rule gave P2 here
    # Eroded once with the cross: row 4 and column 3 touch non-bg pixels; row 7 and column 7 touch the border.
    _, bg1 = select_masks(props, a)
    assert torch.equal(bg1, _box(8, 8, 5, 8, 4, 8))  # the whole-candidate rule eroded P2 (2x2) away entirely


def test_select_bg_leaves_out_pixels_a_higher_proposal_shares() -> None:
    # 8x8: P0 rows 0-1 at 0.9; P1 rows 3-5 x cols 0-4 at 0.12; P2 rows 4-7 x cols 3-7 at 0.02, overlapping P1 in
    # rows 4-5 x cols 3-4 (set to 0.02 as well); the background proposal at 0.15. Means: P1 (11 * 0.12 + 4 * 0.02)
    # / 15 = 0.0933, P2 0.02: P0 > background > P1 > P2. The shared pixels go to P1, the higher one: bg = P2 minus
    # them.
    a = torch.full((8, 8), 0.15)
    a[0:2] = 0.9
    a[3:6, 0:5] = 0.12
    a[4:8, 3:8] = 0.02
    p1, p2 = _box(8, 8, 3, 6, 0, 5), _box(8, 8, 4, 8, 3, 8)
    props = torch.stack([_box(8, 8, 0, 2, 0, 8), p1, p2])
    fg, bg = select_masks(props, a, erode=0)
    assert torch.equal(fg, props[0])
    expected = p2 & ~p1  # the whole-candidate rule kept the 4 shared pixels
    assert int(expected.sum()) == 16 and torch.equal(bg, expected)
    _, bg1 = select_masks(props, a)
    assert torch.equal(bg1, torch.from_numpy(_cross_erosion(expected.numpy())))


def _reference_eq1(props: np.ndarray, a: np.ndarray, bg_max: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE 3's eq. 1 restated pixel-wise: each pixel's label is the first candidate covering it in rank order
    (candidates: background proposal first, empty ones left out; rank: mean attribution, best first)."""
    cands = [m for m in [~props.any(axis=0), *props] if m.any()]
    scores = [float(a[m].mean()) for m in cands]
    order = sorted(range(len(cands)), key=lambda j: (-scores[j], j))  # best first, ties: lower index first
    covers = np.stack([cands[j] for j in order])
    assert covers.any(axis=0).all()
    label = np.array(order)[np.argmax(covers, axis=0)]  # argmax of a bool stack: the first True
    low = min(set(label.ravel().tolist()), key=lambda j: (scores[j], j))
    fg = label == order[0]
    bg = _cross_erosion((label == low) & (a < bg_max)) & ~fg
    return fg, bg if fg.any() else np.zeros_like(bg)


@pytest.mark.parametrize(("side", "count", "seed"), [(24, 6, 6), (24, 12, 7), (40, 20, 10), (512, 100, 3)])
def test_select_equals_the_painted_partition_on_random_overlapping_proposals(side: int, count: int, seed: int) -> None:
    # Random boxes (nested, overlapping, covering the image or not) each with its own attribution level over noise:
    # every case of the partition. 512x512 with 100 proposals is the CutLER worst case.
    rng = np.random.default_rng(seed)
    a = 0.1 + 0.05 * rng.random((side, side))
    props = np.zeros((count, side, side), dtype=bool)
    for r in range(count):
        y0, x0 = rng.integers(0, side - 2, size=2)
        y1, x1 = y0 + rng.integers(2, side - y0 + 1), x0 + rng.integers(2, side - x0 + 1)
        props[r, y0:y1, x0:x1] = True
        a[y0:y1, x0:x1] = 0.3 * rng.random() + 0.05 * rng.random((y1 - y0, x1 - x0))
    a = a.astype(np.float32)
    fg, bg = select_masks(torch.from_numpy(props), torch.from_numpy(a))
    exp_fg, exp_bg = _reference_eq1(props, a.astype(np.float64))
    # Bit equality: the same float64 means of the same float32 values decide the same ranking.
    assert np.array_equal(fg.numpy(), exp_fg) and np.array_equal(bg.numpy(), exp_bg)
    assert bool(exp_bg.any()) and not bool((fg & bg).any())


def test_select_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        select_masks(torch.zeros(1, 4, 5, dtype=torch.bool), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        select_masks(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4))


# ----------------------------------------------------------------------------------------------------------
# maskcut
# ----------------------------------------------------------------------------------------------------------


def _planted_rounds(monkeypatch, vectors: list[list[float]]) -> list[torch.Tensor]:
    """Make the eigen solver return these (36,) vectors in turn; return the affinities it was given."""
    seen: list[torch.Tensor] = []

    def planted(affinity: torch.Tensor) -> torch.Tensor:
        assert affinity.shape[0] == 1  # maskcut_image: a batch of one
        seen.append(affinity[0].clone())
        return torch.tensor([vectors[len(seen) - 1]], dtype=torch.float64)

    monkeypatch.setattr(masks, "_second_eigvecs", planted)
    return seen


def _grid(points: set[tuple[int, int]], value: float, rest: float, side: int = 6) -> list[float]:
    return [value if (y, x) in points else rest for y in range(side) for x in range(side)]


def _cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(p) for p in torch.nonzero(mask).tolist()}


def test_maskcut_rounds_follow_the_reference_rules(monkeypatch) -> None:
    a = {(1, 1), (1, 2), (2, 1), (2, 2)}
    b = {(4, 4), (4, 5)}
    d = {(2, 3), (2, 4), (3, 3), (3, 4)}
    r2 = d | {(1, 3)}
    vectors = [
        # Round 0: A and B at +1, the rest -0.2: mean 0, so the bipartition is A and B; the seed (argmax |x|,
        # the first maximum) is (1, 1) in A, so the mask is A's 4-connected component only.
        _grid(a | b, 1.0, -0.2),
        # Round 1: D at -3, the rest +1: the side above the mean (0.556) holds all 4 corners, so it is reversed;
        # the seed is argmin x, in D. IoU with A is 0 and D covers 4/36 > 1%: accepted.
        _grid(d, -3.0, 1.0),
        # Round 2: D and (1, 3) at +1, the rest -5/31 (mean 0): IoU with D is 4/5 > 0.5: rejected (empty).
        _grid(r2, 1.0, -5 / 31),
        # Round 3: the same cut again, now compared with round 2's empty mask: accepted, minus what was proposed.
        _grid(r2, 1.0, -5 / 31),
    ]
    seen = _planted_rounds(monkeypatch, vectors)
    feats = torch.randn(6, 6, 4, generator=torch.Generator().manual_seed(0))
    props = maskcut_image(feats, n_masks=4)
    assert props.shape == (4, 6, 6) and props.dtype == torch.bool
    assert [_cells(p) for p in props] == [a, d, set(), {(1, 3)}]
    # Before every later round the features of the masks so far are zeroed: their affinities are all eps.
    for rnd, covered in ((1, a), (2, a | d), (3, a | d)):
        for y, x in covered:
            row = seen[rnd][y * 6 + x]
            assert torch.allclose(row, torch.full_like(row, 1e-5))
    assert not bool(torch.isclose(seen[0], torch.tensor(1e-5, dtype=torch.float64)).all(1).any())


def test_maskcut_seed_outside_the_upper_side_reverses_it(monkeypatch) -> None:
    corners = {(0, 0), (0, 5), (5, 0), (5, 5)}
    x = _grid(corners, -1.0, 0.0)
    x[3 * 6 + 3] = -5.0  # the seed: largest |x|, below the mean (-0.139)
    x[1 * 6 + 1] = x[1 * 6 + 2] = 2.0
    _planted_rounds(monkeypatch, [x])
    props = maskcut_image(torch.randn(6, 6, 4, generator=torch.Generator().manual_seed(1)), n_masks=1)
    # Above the mean: everything but the corners and (3, 3), no corner -> the corner rule does not apply; the
    # seed lies below, so the bipartition is reversed and the mask is the seed's component: (3, 3) alone.
    assert _cells(props[0]) == {(3, 3)}


def test_maskcut_rejects_tiny_later_masks(monkeypatch) -> None:
    big = {(y, x) for y in range(2, 8) for x in range(2, 8)}
    first = [1.0 if (y, x) in big else -36 / 108 for y in range(12) for x in range(12)]
    second = [1.0 if (y, x) == (10, 10) else -1 / 143 for y in range(12) for x in range(12)]
    _planted_rounds(monkeypatch, [first, second])
    props = maskcut_image(torch.randn(12, 12, 4, generator=torch.Generator().manual_seed(2)), n_masks=2)
    # Round 1's mask is one cell: 1/144 <= 1% of the grid, rejected. Round 0 is never rejected.
    assert _cells(props[0]) == big and not bool(props[1].any())


def test_maskcut_planted_square_first_round() -> None:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:9, 5:11] = 1
    props = maskcut_image(_planted_features(labels), n_masks=3)
    assert props.shape == (3, 16, 16) and props.dtype == torch.bool
    assert torch.equal(props[0], labels == 1)
    assert not bool((props[1:] & props[0]).any())  # later rounds never propose it again


def test_maskcut_corner_flip_with_the_real_solver() -> None:
    # An "object" covering most of the image including every corner: the small interior region is the mask.
    labels = torch.ones(16, 16, dtype=torch.long)
    labels[6:10, 6:11] = 0
    props = maskcut_image(_planted_features(labels), n_masks=1)
    assert props.shape == (1, 16, 16)
    assert torch.equal(props[0], labels == 0)


def test_maskcut_masker_resizes_and_is_deterministic() -> None:
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[2:5, 3:6] = 1
    feats = torch.stack([_planted_features(labels, seed=1), _planted_features(labels.flip(0), seed=2)])
    masker = build_masker("maskcut")
    assert masker.needs_features and masker.params() == {
        "tau": MASKCUT_TAU,
        "n_masks": MASKCUT_N_MASKS,
        "eps": 1e-5,
        "max_iou": 0.5,
        "min_area": 0.01,
        "corners": 3,
    }
    json.dumps(masker.params())
    attr = torch.zeros(2, 16, 16)
    out = masker.propose(attr, feats)
    assert len(out) == 2
    up = (labels == 1).repeat_interleave(2, 0).repeat_interleave(2, 1)  # nearest 8x8 -> 16x16
    assert out[0].shape == (MASKCUT_N_MASKS, 16, 16) and torch.equal(out[0][0], up)
    assert torch.equal(out[1][0], up.flip(0))
    again = masker.propose(attr, feats)
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))
    with pytest.raises(ValueError, match="features"):
        masker.propose(attr, None)


def test_maskcut_masks_end_to_end() -> None:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:9, 5:11] = 1
    square = labels == 1
    attr = torch.where(square, 0.9, 0.05)[None]
    attr[0, 15, 15] = 0.3  # never bg (>= 0.2)
    fg, bg = build_masker("maskcut").masks(attr, _planted_features(labels)[None])
    assert fg.shape == bg.shape == (1, 16, 16)
    assert torch.equal(fg[0], square)
    assert bool(bg.any()) and not bool((bg & fg).any()) and not bool(bg[0, 15, 15])
    assert bool((attr[bg] < 0.2).all())


# ----------------------------------------------------------------------------------------------------------
# threshold ("-CutLER")
# ----------------------------------------------------------------------------------------------------------


def _levels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 8x8 maps with a high (1.0), middle (0.5) and low (0.0) region each."""
    hi = torch.zeros(2, 8, 8, dtype=torch.bool)
    lo = torch.zeros(2, 8, 8, dtype=torch.bool)
    hi[0, 1:3, 1:4] = True
    lo[0, 5:8, :] = True
    hi[1, 4:7, 4:8] = True
    lo[1, 0:2, :] = True
    a = torch.full((2, 8, 8), 0.5)
    a[hi] = 1.0
    a[lo] = 0.0
    return a, hi, lo


def test_threshold_three_levels_no_cut_no_erosion() -> None:
    a, hi, lo = _levels()
    masker = build_masker("threshold")
    assert not masker.needs_features and not masker.proposal_based
    t_low, t_high = masker.thresholds(a)
    assert 0.0 < t_low < 0.5 < t_high < 1.0
    fg, bg = masker.masks(a)
    # bg is exactly the low region: not eroded, and not cut at 0.2 (t_low is above the 0.2 cut's pixels too).
    assert torch.equal(fg, hi) and torch.equal(bg, lo)


def test_threshold_bg_is_not_cut_at_0_2() -> None:
    a, _hi, lo = _levels()
    a = torch.where(lo, 0.3, a)  # the low level at 0.3: above eq. 1's 0.2 cut, still below t_low (0.3014)
    masker = build_masker("threshold")
    t_low, _ = masker.thresholds(a)
    assert t_low > 0.3
    _, bg = masker.masks(a)
    assert torch.equal(bg, lo)


def test_threshold_noisy_levels() -> None:
    a, hi, lo = _levels()
    g = torch.Generator().manual_seed(0)
    # Levels 0.02 / 0.5 / 1.0 minus 0.003 to 0.02 of noise, range pinned to [0, 1]. skimage returns the centre
    # of the last bin (of 256) of the lower class as threshold, so values of that bin above its centre would
    # change class: the maxima 0.017 and 0.497 stay below the centres 0.0176 and 0.498 of their bins.
    a = torch.where(lo, 0.02, a) - 0.003 - 0.017 * torch.rand(a.shape, generator=g)
    a[0, 7, 7] = 0.0
    a[1, 5, 5] = 1.0
    fg, bg = build_masker("threshold").masks(a)
    assert torch.equal(fg, hi) and torch.equal(bg, lo)


def test_threshold_is_joint_over_the_class_and_skips_images_without_fg() -> None:
    a, hi, lo = _levels()
    a[0][hi[0]] = 0.5  # image 0 has no high region left; the split is shared, so it gets no fg: skipped
    fg, bg = build_masker("threshold").masks(a)
    assert not bool(fg[0].any()) and not bool(bg[0].any())
    assert torch.equal(fg[1], hi[1]) and torch.equal(bg[1], lo[1])


def test_threshold_fallback() -> None:
    masker = build_masker("threshold")
    # Only two distinct values: multi-Otsu cannot make 3 classes -> bg < 0.2, fg > 0.5.
    a = torch.full((1, 8, 8), 0.1)
    a[0, 2:5, 2:5] = 0.9
    assert masker.thresholds(a) == (THRESHOLD_FALLBACK_BG, THRESHOLD_FALLBACK_FG)
    fg, bg = masker.masks(a)
    assert torch.equal(fg[0], a[0] > 0.5) and torch.equal(bg[0], a[0] < 0.2)
    fg, bg = masker.masks(torch.zeros(2, 8, 8))  # nothing above 0.5: no fg, so no bg either
    assert not bool(fg.any()) and not bool(bg.any())


def test_threshold_otsu_runs_on_the_grid_maps_and_cuts_the_upsampled_ones() -> None:
    """REFERENCE 3: the multi-Otsu thresholds come from the latent-grid maps (64x64 for SD 1.5), before upsampling;
    fg and bg are then cut on the image-size maps."""
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(2, 8, 8, generator=g) ** 2  # skewed: upsampling changes the value histogram
    grid[:, 2:5, 2:6] = 0.8 + 0.2 * torch.rand(2, 3, 4, generator=g)
    grid[0, 0, 0], grid[1, 7, 7] = 0.0, 1.0
    image = F.interpolate(grid[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    # Expected: skimage's multi-Otsu (the reference's own call) on the grid values alone.
    t_low, t_high = (float(t) for t in threshold_multiotsu(grid.double().numpy().ravel(), classes=3))
    masker = build_masker("threshold")
    assert masker.thresholds(grid) == (t_low, t_high)
    fg, bg = masker.masks(image, grid_attribution=grid)
    assert fg.shape == bg.shape == (2, 64, 64)
    assert torch.equal(fg, image > t_high) and torch.equal(bg, image < t_low)
    # The test tells the rules apart: thresholds taken on the upsampled maps cut other pixels.
    up_fg, up_bg = masker.masks(image)
    assert not torch.equal(up_fg, fg) or not torch.equal(up_bg, bg)
    with pytest.raises(ValueError, match="grid_attribution"):
        masker.masks(image, grid_attribution=grid[:1])


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert registered_maskers() == ["cutler", "maskcut", "threshold"]
    assert available_maskers() == ["cutler", "maskcut", "threshold"]
    assert resolve_masker_name("auto") == "cutler"  # the paper's segmenter when its weights are here
    assert resolve_masker_name("auto", cutler_weights=False) == "maskcut"
    assert resolve_masker_name("Threshold") == "threshold"
    assert isinstance(build_masker("auto"), Masker) and build_masker("auto").name == "cutler"
    assert build_masker("maskcut", tau=0.3, n_masks=2).params()["n_masks"] == 2


def test_unknown_masker_lists_accepted_names() -> None:
    with pytest.raises(ValueError) as err:
        build_masker("bogus")
    msg = str(err.value)
    assert "bogus" in msg and "\n" not in msg
    for name in ("auto", "maskcut", "threshold", "cutler"):
        assert name in msg
    with pytest.raises(ValueError, match="bogus"):
        resolve_masker_name("bogus")


def test_bad_parameters_are_value_errors() -> None:
    with pytest.raises(ValueError, match="sigma"):
        build_masker("maskcut", sigma=1.0)
    with pytest.raises(ValueError):
        build_masker("maskcut", n_masks=0)
    with pytest.raises(ValueError):
        build_masker("threshold", fallback_bg=0.6, fallback_fg=0.5)


class _PlantedDetector(torch.nn.Module):
    """Stands in for the CutLER detector: returns planted instance masks, records what it was given."""

    def __init__(self, masks_per_image: list[torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.masks, self.calls = masks_per_image, []

    def detect(self, images, score_threshold=None):
        from ovdiff_cli.cutler.model import Detections

        self.calls.append((len(images), score_threshold))
        out = []
        for _ in images:
            m = self.masks[len(out) + sum(n for n, _ in self.calls[:-1])]
            out.append(Detections(torch.zeros(len(m), 4), torch.ones(len(m)), m))
        return out


class _Models:
    def __init__(self, detector) -> None:
        self.detector = detector

    def get(self, role: str):
        assert role == "cutler"
        return self.detector


def test_cutler_proposals_go_through_eq_1() -> None:
    # Two instances per image; eq. 1 picks fg = the instance with the highest mean attribution and bg = the lowest
    # candidate, the background proposal (complement of both instances) first in ties.
    props, a = _three_proposals()
    detector = _PlantedDetector([props[:2], props[1:]])
    masker = build_masker("cutler", models=_Models(detector), batch_size=1)
    assert masker.needs_images and masker.params()["score_threshold"] == 0.35
    images = torch.rand(2, 3, 8, 8)
    fg, bg = masker.masks(torch.stack([a, a]), images=images)
    assert detector.calls == [(1, 0.35), (1, 0.35)]  # batches of batch_size, the threshold passed on
    # Image 0: P0 (0.75) beats P1 (0.6) and the background proposal (everything else, mean < 0.1).
    assert torch.equal(fg[0], props[0])
    # Image 1: P1 (0.6) is fg; P2 (0.0) is bg, eroded with the cross.
    assert torch.equal(fg[1], props[1]) and torch.equal(bg[1], _box(8, 8, 6, 8, 0, 2))
    with pytest.raises(ValueError, match="support images"):
        masker.propose(torch.stack([a, a]))


def test_cutler_masker_on_the_tiny_detector(tiny_models) -> None:
    masker = build_masker("cutler", models=tiny_models)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    props = masker.propose(torch.rand(2, 64, 64), images=images)
    assert len(props) == 2
    for p in props:
        assert p.dtype == torch.bool and p.shape[1:] == (64, 64) and 1 <= p.shape[0] <= 100


def test_lobpcg_path_matches_dense_eigh(monkeypatch):
    """Above EIGH_MAX_NODES the second eigenvector comes from deflated LOBPCG: same vector, same proposals."""
    torch.manual_seed(0)
    h = w = 24
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (((yy - 12) ** 2 + (xx - 9) ** 2) < 40).long() + (((yy - 4) ** 2 + (xx - 19) ** 2) < 9).long() * 2
    base = F.normalize(torch.randn(3, 16), dim=1)
    feats = F.normalize(base[labels.flatten()] + 0.3 * torch.randn(h * w, 16) / 4, dim=1)
    affinity = torch.where(feats @ feats.T > 0.15, 1.0, 1e-5).double()
    dense = masks._second_eigvecs(affinity[None], eigh_max_nodes=h * w)[0]
    iterative = masks._second_eigvecs(affinity[None], eigh_max_nodes=0)[0]
    assert F.cosine_similarity(dense, iterative, dim=0) > 1 - 1e-9
    assert h * w > masks.EIGH_MAX_NODES
    iterative_props = masks.maskcut_image(feats.view(h, w, -1))
    monkeypatch.setattr(masks, "EIGH_MAX_NODES", h * w)
    dense_props = masks.maskcut_image(feats.view(h, w, -1))
    # Exact though the solvers differ: their vectors agree to 1e-8, and 1e-5 relative noise on them moves no proposal.
    assert torch.equal(iterative_props, dense_props) and bool(dense_props[0].any())


def _textured_features(seed: int, side: int = 20, dim: int = 32) -> torch.Tensor:
    """(side, side, dim) DINO-like features with no clean clusters, so the iterative solver has real work: smooth
    random fields, one or two blobs with a direction of their own, and per-patch noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, 4, 4, generator=g)
    fields = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0]  # (4, side, side)
    f = torch.einsum("khw,kd->hwd", fields, 3 * torch.randn(4, dim, generator=g))
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for _ in range(1 + seed % 2):
        cy, cx, r = (int(v) for v in torch.randint(3, side - 3, (3,), generator=g))
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2 + 2) ** 2] += 2 * torch.randn(dim, generator=g)
    return f + 0.8 * torch.randn(side, side, dim, generator=g)


def _reference_solver(affinity: torch.Tensor, eigh_max_nodes: int | None = None) -> torch.Tensor:
    """CutLER's own solve, per graph: scipy's generalised eigh(D - A, D), second-smallest eigenvector, float64."""
    import numpy as np
    import scipy.linalg

    out = []
    for a in affinity.numpy():
        d = np.diag(a.sum(axis=1))
        x = torch.from_numpy(scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])[1][:, 0].copy())
        out.append(-x if x[x.abs().argmax()] < 0 else x)
    return torch.stack(out)


def test_batched_maskcut_equals_per_image_and_the_reference_solver(monkeypatch) -> None:
    """Issue 15: MaskCut solves all images of a batch together (block LOBPCG, each image frozen once converged);
    the proposals equal those of each image alone and those of the reference's exact generalised solver."""
    feats = torch.stack([_textured_features(seed) for seed in range(4)])
    assert masks.EIGH_MAX_NODES < 20 * 20  # the iterative path
    batched = masks.maskcut_batch(feats)
    assert batched.shape == (4, MASKCUT_N_MASKS, 20, 20) and batched.dtype == torch.bool
    assert bool(batched[:, 0].flatten(1).any(1).all())  # every image has a first-round object
    assert batched.flatten(1).sum(1).unique().numel() == 4  # four different answers, not one repeated
    for i in range(4):
        assert torch.equal(maskcut_image(feats[i]), batched[i])
    monkeypatch.setattr(masks, "_second_eigvecs", _reference_solver)
    # Exact though the solvers differ: their vectors agree to 1e-8, and 1e-5 relative noise on them moves no proposal.
    assert torch.equal(masks.maskcut_batch(feats), batched)


def test_lobpcg_batch_agrees_with_dense_eigh_per_graph() -> None:
    """A batch mixing a quickly converging graph (clean clusters) with slow ones: each graph's vector is the dense
    solver's, and the same (to rounding) as when it is solved alone, though the batch iterates longer for it."""
    labels = torch.zeros(20, 20, dtype=torch.long)
    labels[5:12, 4:15] = 1
    feats = [_planted_features(labels).view(400, -1)] + [_textured_features(s).view(400, -1) for s in (3, 5)]
    affinity = []
    for f in feats:
        f = F.normalize(f.double(), dim=1)
        affinity.append(torch.where(f @ f.T > MASKCUT_TAU, 1.0, 1e-5).double())
    affinity = torch.stack(affinity)
    together = masks._second_eigvecs(affinity)
    dense = masks._second_eigvecs(affinity, eigh_max_nodes=400)
    assert bool((F.cosine_similarity(together, dense, dim=1) > 1 - 1e-12).all())
    for i in range(3):
        assert torch.allclose(masks._second_eigvecs(affinity[i : i + 1])[0], together[i], rtol=0, atol=1e-13)


def test_maskcut_on_a_complete_graph_is_deterministic() -> None:
    """Random-weight DINO keys can make every patch similar to every other: the second eigenvalue is then repeated
    and any vector of its eigenspace is an answer. The solver still gives one answer, batched or alone, every run."""
    feats = torch.ones(2, 20, 20, 8) + 1e-3 * torch.randn(2, 20, 20, 8, generator=torch.Generator().manual_seed(0))
    first = masks.maskcut_batch(feats)
    assert torch.equal(masks.maskcut_batch(feats), first)
    assert torch.equal(maskcut_image(feats[1]), first[1])


def test_cross_erosion_equals_scipys_with_a_set_border():
    """The shifted-AND erosion keeps exactly the pixels scipy's binary_erosion keeps (3x3 cross, border_value=1),
    for any number of erosions, on random masks of several shapes including single rows and columns."""
    import scipy.ndimage as ndi

    from ovdiff_cli.masks import _erode_cross

    rng = np.random.default_rng(0)
    cross = ndi.generate_binary_structure(2, 1)
    for shape in [(1, 9), (9, 1), (7, 11), (64, 64)]:
        for density in (0.5, 0.9):
            mask = rng.random(shape) < density
            for times in range(4):
                expected = mask if times == 0 else ndi.binary_erosion(mask, cross, iterations=times, border_value=1)
                got = _erode_cross(mask, times)
                assert got.dtype == bool and np.array_equal(got, expected), (shape, density, times)
    assert _erode_cross(np.ones((3, 3), bool), 5).all()  # the border never erodes
