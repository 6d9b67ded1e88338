"""Tests of ovdiff_cli.masks against hand-computed answers on planted arrays (CPU, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdiff_cli import masks
from ovdiff_cli.defaults import MASKCUT_N_MASKS, MASKCUT_TAU, THRESHOLD_FALLBACK_BG, THRESHOLD_FALLBACK_FG
from ovdiff_cli.masks import (
    Masker,
    MaskerUnavailable,
    available_maskers,
    build_masker,
    maskcut_image,
    registered_maskers,
    resolve_masker_name,
    select_masks,
    support_masks,
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


def test_select_fg_max_bg_min_and_erosion() -> None:
    props, a = _three_proposals()
    # Means: P0 0.75, P1 0.6, P2 0.0, background proposal (43 px of 0.1) 0.1 -> fg = P0, bg = P2.
    fg, bg = select_masks(props, a)
    assert fg.dtype == torch.bool and fg.shape == (8, 8)
    assert torch.equal(fg, props[0])
    # P2 (rows 5-7 x cols 0-2), all below 0.2; one erosion with the outside counted as mask removes row 5 and
    # column 2 (their neighbours in row 4 / column 3 are not bg) but keeps the pixels on the image border.
    assert torch.equal(bg, _box(8, 8, 6, 8, 0, 2))
    fg0, bg0 = select_masks(props, a, erode_px=0)
    assert torch.equal(fg0, props[0]) and torch.equal(bg0, props[2])


def test_select_background_proposal_wins_bg_and_is_refined() -> None:
    a = torch.full((8, 8), 0.05)
    a[:, 0:4] = 0.8  # the single proposal: mean 0.8
    a[3, 6] = 0.5  # background proposal: (31 * 0.05 + 0.5) / 32 = 0.0640625
    props = _box(8, 8, 0, 8, 0, 4)[None]
    fg, bg = select_masks(props, a)
    assert torch.equal(fg, props[0])
    # bg = complement (cols 4-7) minus (3, 6) (attribution >= 0.2), then eroded once: column 4 touches the
    # proposal, rows 2-4 of cols 5-7 touch the removed pixel.
    expected = _b(
        [
            "00000111",
            "00000111",
            "00000000",
            "00000000",
            "00000000",
            "00000111",
            "00000111",
            "00000111",
        ]
    )
    assert torch.equal(bg, expected)
    # Without erosion only the >= 0.2 pixel goes.
    _, bg0 = select_masks(props, a, erode_px=0)
    expected0 = ~props[0]
    expected0[3, 6] = False
    assert torch.equal(bg0, expected0)


def test_select_bg_max_removes_high_attribution_pixels() -> None:
    props, a = _three_proposals()
    a[6, 1] = 0.2  # not < 0.2: removed from bg (P2 mean 0.2/9 = 0.022, still the minimum)
    _, bg = select_masks(props, a, erode_px=0)
    expected = props[2].clone()
    expected[6, 1] = False
    assert torch.equal(bg, expected)
    _, bg_loose = select_masks(props, a, bg_max=0.25, erode_px=0)
    assert torch.equal(bg_loose, props[2])


def test_select_ties_take_lowest_index() -> None:
    a = torch.zeros(4, 4)
    a[0, :] = 0.7
    a[3, :] = 0.7
    # P0 (row 0) and P1 (row 3) tie at 0.7 for fg; P2 (row 1) and the background proposal (row 2) tie at 0.
    props = torch.stack([_box(4, 4, 0, 1, 0, 4), _box(4, 4, 3, 4, 0, 4), _box(4, 4, 1, 2, 0, 4)])
    fg, bg = select_masks(props, a, erode_px=0)
    assert torch.equal(fg, props[0])
    assert torch.equal(bg, props[2])


def test_select_no_proposals_uses_fallback_fg() -> None:
    a = torch.zeros(6, 6)
    a[1:3, 1:3] = 0.9
    a[4, 4] = THRESHOLD_FALLBACK_FG  # >= fallback: fg
    a[0, 5] = 0.3  # neither fg nor bg
    fg, bg = select_masks(torch.zeros(0, 6, 6, dtype=torch.bool), a, erode_px=0)
    expected_fg = _box(6, 6, 1, 3, 1, 3)
    expected_fg[4, 4] = True
    assert torch.equal(fg, expected_fg)
    assert torch.equal(bg, a < 0.2)
    # Empty proposals are ignored: same result.
    fg2, bg2 = select_masks(torch.zeros(2, 6, 6, dtype=torch.bool), a, erode_px=0)
    assert torch.equal(fg2, fg) and torch.equal(bg2, bg)


def test_select_fg_and_bg_never_overlap() -> None:
    a = torch.zeros(8, 8)
    a[0:3] = 0.9
    a[3] = 0.1
    # Overlapping proposals: P0 rows 0-3 (mean 0.7), P1 rows 3-7 (mean 0.02) share row 3 (attribution 0.1).
    props = torch.stack([_box(8, 8, 0, 4, 0, 8), _box(8, 8, 3, 8, 0, 8)])
    fg, bg = select_masks(props, a, erode_px=0)
    assert torch.equal(fg, props[0])
    assert torch.equal(bg, _box(8, 8, 4, 8, 0, 8))
    # Constant attribution: every candidate ties, fg and bg both pick candidate 0; fg keeps it.
    fg, bg = select_masks(props, torch.full((8, 8), 0.1))
    assert torch.equal(fg, props[0]) and not bool((fg & bg).any())


def test_select_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        select_masks(torch.zeros(1, 4, 5, dtype=torch.bool), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        select_masks(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4))


# ----------------------------------------------------------------------------------------------------------
# maskcut
# ----------------------------------------------------------------------------------------------------------


def test_maskcut_planted_square() -> None:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:9, 5:11] = 1
    props = maskcut_image(_planted_features(labels), n_masks=3)
    assert props.dtype == torch.bool
    # Once the square is taken the rest is one complete graph: nothing left to cut.
    assert props.shape == (1, 16, 16)
    assert torch.equal(props[0], labels == 1)


def test_maskcut_two_objects() -> None:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[2:5, 2:6] = 1
    labels[9:14, 8:14] = 2
    props = maskcut_image(_planted_features(labels), n_masks=3)
    assert props.shape[0] == 2
    found = {tuple(torch.nonzero(p)[0].tolist()) for p in props}
    assert found == {(2, 2), (9, 8)}
    assert {p.sum().item() for p in props} == {12, 30}
    for p in props:
        lab = int(labels[p][0])
        assert lab in (1, 2) and torch.equal(p, labels == lab)


def test_maskcut_same_object_twice_splits_by_connectivity() -> None:
    # Two separate patches with the SAME feature: one cut separates both from the background, and the
    # connected component of the seed keeps one per round.
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[2:5, 2:6] = 1
    labels[9:14, 8:14] = 1
    props = maskcut_image(_planted_features(labels), n_masks=3)
    assert props.shape[0] == 2
    assert torch.equal(props[0] | props[1], labels == 1)
    assert not bool((props[0] & props[1]).any())


def test_maskcut_corner_flip() -> None:
    # A band along the top edge (like sky) has the smaller graph volume, so the seed (max |eigvec|) lies in
    # it; it holds 2 corners, so the object-centric prior flips the bipartition: the proposal is the large
    # region below, and the band is left to the background proposal.
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:3] = 1
    props = maskcut_image(_planted_features(labels), n_masks=3)
    assert props.shape == (1, 16, 16)
    assert torch.equal(props[0], labels == 0)


def test_maskcut_large_corner_object_keeps_small_region() -> None:
    # An "object" covering most of the image including every corner: the small interior region is the
    # foreground (seed side, 0 corners), not the large one.
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
    }
    json.dumps(masker.params())
    attr = torch.zeros(2, 16, 16)
    out = masker.propose(attr, feats)
    assert len(out) == 2
    up = (labels == 1).repeat_interleave(2, 0).repeat_interleave(2, 1)  # nearest 8x8 -> 16x16
    assert out[0].shape == (1, 16, 16) and torch.equal(out[0][0], up)
    assert torch.equal(out[1][0], up.flip(0))
    again = masker.propose(attr, feats)
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))
    with pytest.raises(ValueError, match="features"):
        masker.propose(attr, None)


def test_maskcut_uniform_features_give_no_proposal() -> None:
    props = maskcut_image(F.normalize(torch.ones(6, 6, 4), dim=-1))
    assert props.shape == (0, 6, 6)


def test_support_masks_maskcut_end_to_end() -> None:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:9, 5:11] = 1
    square = labels == 1
    attr = torch.where(square, 0.9, 0.05)[None]
    attr[0, 15, 15] = 0.3  # in the background proposal, but not bg (>= 0.2)
    fg, bg = support_masks(build_masker("maskcut"), attr, _planted_features(labels)[None])
    assert fg.shape == bg.shape == (1, 16, 16)
    assert torch.equal(fg[0], square)
    # bg = complement of the square minus (15, 15), eroded once (image border does not erode).
    expected = torch.from_numpy(np.ones((16, 16), bool))
    expected[3:10, 4:12] = False
    expected[14:, 14:] = False
    assert torch.equal(bg[0], expected)


# ----------------------------------------------------------------------------------------------------------
# threshold
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


def test_threshold_three_levels() -> None:
    a, hi, lo = _levels()
    masker = build_masker("threshold")
    assert not masker.needs_features
    t_low, t_high = masker.thresholds(a)
    assert 0.0 < t_low < 0.5 < t_high < 1.0
    out = masker.propose(a, None)
    for n in range(2):
        assert out[n].shape == (2, 8, 8)
        assert torch.equal(out[n][0], hi[n]) and torch.equal(out[n][1], lo[n])
    fg, bg = support_masks(masker, a, None, erode_px=0)
    assert torch.equal(fg, hi) and torch.equal(bg, lo)


def test_threshold_noisy_levels() -> None:
    a, hi, lo = _levels()
    g = torch.Generator().manual_seed(0)
    # Levels 0.02 / 0.5 / 1.0 minus 0.003 to 0.02 of noise, range pinned to [0, 1]. skimage returns the centre
    # of the last bin (of 256) of the lower class as threshold, so values of that bin above its centre would
    # change class: the maxima 0.017 and 0.497 stay below the centres 0.0176 and 0.498 of their bins.
    a = torch.where(lo, 0.02, a) - 0.003 - 0.017 * torch.rand(a.shape, generator=g)
    a[0, 7, 7] = 0.0
    a[1, 5, 5] = 1.0
    out = build_masker("threshold").propose(a, None)
    for n in range(2):
        assert torch.equal(out[n][0], hi[n]) and torch.equal(out[n][1], lo[n])


def test_threshold_is_joint_over_the_class() -> None:
    a, hi, lo = _levels()
    a[0][hi[0]] = 0.5  # image 0 has no high region left; the split is shared, so it gets no fg proposal
    out = build_masker("threshold").propose(a, None)
    assert out[0].shape == (1, 8, 8) and torch.equal(out[0][0], lo[0])
    assert torch.equal(out[1][0], hi[1]) and torch.equal(out[1][1], lo[1])


def test_threshold_fallback() -> None:
    masker = build_masker("threshold")
    # Only two distinct values: multi-Otsu cannot make 3 classes -> bg < 0.2, fg > 0.5.
    a = torch.full((1, 8, 8), 0.1)
    a[0, 2:5, 2:5] = 0.9
    assert masker.thresholds(a) == (THRESHOLD_FALLBACK_BG, THRESHOLD_FALLBACK_FG)
    out = masker.propose(a, None)
    assert torch.equal(out[0][0], a[0] > 0.5) and torch.equal(out[0][1], a[0] < 0.2)
    # Constant maps: one (full) proposal only; the empty one is dropped.
    z = torch.zeros(2, 8, 8)
    out = masker.propose(z, None)
    assert [o.shape[0] for o in out] == [1, 1] and bool(out[0].all())
    fg, bg = support_masks(masker, z, None)
    assert not bool(fg.any()) and bool(bg.all())
    ones = torch.ones(1, 8, 8)
    fg, bg = support_masks(masker, ones, None)
    assert bool(fg.all()) and not bool(bg.any())


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert registered_maskers() == ["cutler", "maskcut", "threshold"]
    assert available_maskers() == ["maskcut", "threshold"]
    assert resolve_masker_name("auto") == "maskcut"
    assert resolve_masker_name("Threshold") == "threshold"
    assert isinstance(build_masker("auto"), Masker) and build_masker("auto").name == "maskcut"
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


def test_cutler_unavailable() -> None:
    with pytest.raises(MaskerUnavailable) as err:
        build_masker("cutler")
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "checkpoint" in msg and "--masker maskcut" in msg and "--masker threshold" in msg
    assert "\n" not in msg


def test_lobpcg_path_matches_dense_eigh(monkeypatch):
    """Above EIGH_MAX_NODES the second eigenvector comes from deflated LOBPCG: same vector, same proposals."""
    torch.manual_seed(0)
    h = w = 24
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (((yy - 12) ** 2 + (xx - 9) ** 2) < 40).long() + (((yy - 4) ** 2 + (xx - 19) ** 2) < 9).long() * 2
    base = F.normalize(torch.randn(3, 16), dim=1)
    feats = F.normalize(base[labels.flatten()] + 0.3 * torch.randn(h * w, 16) / 4, dim=1)
    affinity = torch.where(feats @ feats.T > 0.15, 1.0, 1e-5).double()
    dense = masks._second_eigvec(affinity, eigh_max_nodes=h * w)
    iterative = masks._second_eigvec(affinity, eigh_max_nodes=0)
    assert F.cosine_similarity(dense, iterative, dim=0) > 1 - 1e-9
    assert h * w > masks.EIGH_MAX_NODES
    iterative_props = masks.maskcut_image(feats.view(h, w, -1))
    monkeypatch.setattr(masks, "EIGH_MAX_NODES", h * w)
    dense_props = masks.maskcut_image(feats.view(h, w, -1))
    assert len(dense_props) >= 2 and torch.equal(iterative_props, dense_props)
