"""Prototype aggregation (paper 3.3, eq. 2 and 3): hand-computed values on planted features and masks."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from ovdiff_cli.defaults import K_PARTS
from ovdiff_cli.prototypes import (
    BG,
    FG,
    KIND_CLASS,
    KIND_INSTANCE,
    KIND_NAMES,
    KIND_PART,
    PrototypeBank,
    build_bank,
    kmeans,
    masks_on_grid,
)

# Prototypes are float32 (REFERENCE 5): pooled and normalised in float32, against a float32 re-computation with
# other reduction orders they agree to ~1e-6 per component.
ATOL = 1e-5


def unit(*v: float) -> torch.Tensor:
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the labelings a and b (same length) are equal up to a permutation of labels."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------------------------------
# eq. 2 and eq. 3 by hand
# ----------------------------------------------------------------------------------------------------


def small_bank(k: int = 2) -> PrototypeBank:
    """2 images, 2x2 grid, one 2-d extractor "a" with unit-length pixels."""
    feats = torch.tensor(
        [
            [[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]],  # image 0
            [[[0.6, 0.8], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]],  # image 1
        ]
    )
    fg = torch.tensor([[[1, 1], [0, 0]], [[1, 1], [1, 0]]], dtype=torch.bool)
    bg = torch.tensor([[[0, 0], [1, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)
    return build_bank("thing", {"a": feats}, fg, bg, k=k, support_keys=["k0", "k1"], meta={"n": 2})


def test_instance_and_class_prototypes_by_hand():
    bank = small_bank(k=2)
    a = bank["a"]
    pa = a.prototypes
    fg_c, fg_i0, fg_i1 = pa[0], pa[1], pa[2]
    # eq. 2: image 0 fg = {(1,0), (0,1)} -> (0.5, 0.5); image 1 fg = {(.6,.8), (1,0), (1,0)} -> (2.6/3, .8/3)
    assert torch.allclose(fg_i0, unit(0.5, 0.5), atol=ATOL)
    assert torch.allclose(fg_i1, unit(2.6 / 3, 0.8 / 3), atol=ATOL)
    # eq. 3: (2 * (0.5, 0.5) + 3 * (2.6/3, 0.8/3)) / 5 = (0.72, 0.36), the mean of the 5 fg pixels
    assert torch.allclose(fg_c, unit(0.72, 0.36), atol=ATOL)
    assert torch.allclose(fg_c, unit((1 + 0 + 0.6 + 1 + 1) / 5, (0 + 1 + 0.8 + 0 + 0) / 5), atol=ATOL)

    bg_idx = a.select(region="bg").tolist()
    assert a.kind[bg_idx[:3]].tolist() == [KIND_CLASS, KIND_INSTANCE, KIND_INSTANCE]
    bg_c, bg_i0, bg_i1 = pa[bg_idx[0]], pa[bg_idx[1]], pa[bg_idx[2]]
    assert torch.allclose(bg_i0, unit(0.6, 0.8), atol=ATOL)
    assert torch.allclose(bg_i1, unit(0.0, 1.0), atol=ATOL)
    assert torch.allclose(bg_c, unit(0.3, 0.9), atol=ATOL)
    # every stored prototype is (to float32 precision) unit length
    assert torch.allclose(pa.norm(dim=1), torch.ones(len(a)), atol=ATOL)


def test_prototypes_pool_raw_features():
    # REFERENCE 5: means of raw features, normalised only afterwards. Two fg pixels (10, 0) and (0, 1): the raw
    # mean (5, 0.5) points almost along x; the mean of unit vectors would be the diagonal.
    feats = torch.tensor([[[[10.0, 0.0], [0.0, 1.0]]]])  # 1 image, 1x2 grid
    fg = torch.tensor([[[True, True]]])
    bank = build_bank("c", {"a": feats}, fg, torch.zeros_like(fg), k=1, support_keys=["s"])
    assert torch.allclose(bank["a"].prototypes[0], unit(5.0, 0.5), atol=ATOL)
    # K-means also runs on the raw features: with k=2 the two pixels are their own parts.
    assert bank["a"].counts() == {"class": 1, "instance": 1, "part": 1}


def test_layout_and_counts():
    bank = small_bank(k=2)
    a = bank["a"]
    # fg: class, 2 instances, 2 parts; bg: class, 2 instances, 2 parts (2 distinct bg pixels)
    assert a.kind.tolist() == [0, 1, 1, 2, 2] * 2
    assert a.region.tolist() == [FG] * 5 + [BG] * 5
    assert a.image.tolist() == [-1, 0, 1, -1, -1] * 2
    assert a.part.tolist() == [-1, -1, -1, 0, 1] * 2
    assert len(a) == 10
    assert bank.counts() == {"a": {"class": 2, "instance": 4, "part": 4}}
    assert list(a.counts()) == list(KIND_NAMES)
    assert bank.names == ("a",)
    assert bank.num_images == 2 and a.grid == (2, 2)
    assert bank.support_keys == ["k0", "k1"] and bank.meta == {"n": 2}
    assert a.select(region=FG, kinds="part").tolist() == [3, 4]
    assert a.select(kinds=[KIND_CLASS, "instance"]).tolist() == [0, 1, 2, 5, 6, 7]
    assert a.select().tolist() == list(range(10))
    with pytest.raises(ValueError):
        a.select(region="sky")


def test_class_prototype_equals_pooled_mean_random():
    g = torch.Generator().manual_seed(1)
    n, h, w = 3, 5, 4
    feats = {e: torch.randn(n, h, w, d, generator=g) * 3 for e, d in (("x", 6), ("y", 3))}
    fg = torch.rand(n, h, w, generator=g) > 0.5
    bg = ~fg & (torch.rand(n, h, w, generator=g) > 0.3)
    bank = build_bank("c", feats, fg, bg, k=3, support_keys=["a", "b", "c"])
    for e, f in feats.items():
        protos = bank[e]
        for g_id, mask in ((FG, fg), (BG, bg)):
            c = protos.select(region=g_id, kinds="class").item()
            assert torch.allclose(protos.prototypes[c], F.normalize(f[mask].mean(0), dim=0), atol=ATOL)
            for i in protos.select(region=g_id, kinds="instance").tolist():
                nimg = int(protos.image[i])
                want = F.normalize(f[nimg][mask[nimg]].mean(0), dim=0)
                assert torch.allclose(protos.prototypes[i], want, atol=ATOL)


def test_masks_reach_each_extractor_grid_bilinear_then_binarised():
    # 8x8 -> 2x2 bilinear (no antialiasing, align_corners=False) samples cell (i, j) at source (4i + 1.5, 4j + 1.5):
    # the mean of pixels 4i+1..4i+2 by 4j+1..4j+2. The reference keeps a cell where that value is > 0 (any
    # overlap): one of those four pixels is enough, a pixel outside them counts for nothing.
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 1, 1] = True  # cell (0, 0): value 1/4, kept
    m[0, 0, 4] = True  # cell (0, 1): pixel (0, 4) is outside the sample, value 0, not kept
    m[0, 5:7, 5:7] = True  # cell (1, 1): value 1
    assert masks_on_grid(m, (2, 2))[0].tolist() == [[True, False], [False, True]]
    assert masks_on_grid(m, (2, 2), threshold=0.5)[0].tolist() == [[False, False], [False, True]]
    assert torch.equal(masks_on_grid(m, (8, 8)), m)
    # In a bank, each extractor gets the masks on its own grid, fg and bg each on its own: on a coarse grid a cell
    # both regions overlap is in both (cell (0, 0): fg 1/4, bg 3/4), as in the reference.
    feats = {"fine": torch.rand(1, 8, 8, 2), "coarse": torch.rand(1, 2, 2, 3)}
    bank = build_bank("c", feats, m, ~m, k=1, support_keys=["s"])
    assert torch.equal(bank["fine"].fg_masks, m) and torch.equal(bank["fine"].bg_masks, ~m)
    assert bank["coarse"].fg_masks[0].tolist() == [[True, False], [False, True]]
    assert bank["coarse"].bg_masks[0].tolist() == [[True, True], [True, False]]  # 3/4, 1, 1, 0


def test_empty_masks_make_no_prototypes():
    feats = {"a": F.normalize(torch.rand(3, 2, 2, 4), dim=-1)}
    fg = torch.zeros(3, 2, 2, dtype=torch.bool)
    fg[0, 0, 0] = fg[2, 1, 1] = True  # image 1 has an empty fg mask
    bg = torch.zeros(3, 2, 2, dtype=torch.bool)  # no bg anywhere
    a = build_bank("c", feats, fg, bg, support_keys=["a", "b", "c"])["a"]
    assert a.region.tolist() == [FG] * len(a)
    assert a.image[a.kind == KIND_INSTANCE].tolist() == [0, 2]
    assert a.counts() == {"class": 1, "instance": 2, "part": 2}
    assert (a.part_bg == -1).all()
    assert a.select(region="bg").numel() == 0


def test_an_image_without_fg_on_a_grid_gives_that_extractor_nothing():
    # REFERENCE 3: skipping is decided per extractor on its own grid. Image 1's only fg pixel (0, 4) lies outside
    # every 2x2-grid cell's bilinear sample (see the test above): on the coarse grid its fg is empty, so its bg cells
    # are dropped there too; on the full-size grid it keeps both.
    fg = torch.zeros(2, 8, 8, dtype=torch.bool)
    fg[0, 5:7, 5:7] = True  # image 0: coarse cell (1, 1)
    fg[1, 0, 4] = True
    coarse = torch.rand(2, 2, 2, 3, generator=torch.Generator().manual_seed(5))
    feats = {"coarse": coarse, "fine": torch.rand(2, 8, 8, 2)}
    bank = build_bank("c", feats, fg, ~fg, k=1, support_keys=["s0", "s1"])
    c = bank["coarse"]
    # image 0's bg on the coarse grid: every cell but (1, 1), whose sample is all fg; image 1: nothing
    assert c.bg_masks.tolist() == [[[True, True], [True, False]], [[False, False], [False, False]]]
    assert c.fg_masks.tolist() == [[[False, False], [False, True]], [[False, False], [False, False]]]
    assert c.image[c.kind == KIND_INSTANCE].tolist() == [0, 0]  # one fg and one bg instance, both image 0's
    (bg_class,) = c.select(region="bg", kinds="class").tolist()
    want = F.normalize((coarse[0, 0, 0] + coarse[0, 0, 1] + coarse[0, 1, 0]) / 3, dim=0)
    assert torch.allclose(c.prototypes[bg_class], want, atol=ATOL)
    assert (c.part_bg[1] == -1).all()
    # the full-size grid still has image 1, fg and bg
    f = bank["fine"]
    assert f.image[f.kind == KIND_INSTANCE].tolist() == [0, 1, 0, 1]
    assert torch.equal(f.bg_masks, ~fg)


def test_build_bank_default_k_and_input_checks():
    feats = {"a": torch.rand(1, 12, 12, 3, generator=torch.Generator().manual_seed(0))}
    fg = torch.zeros(1, 12, 12, dtype=torch.bool)
    fg[0, :6] = True
    bank = build_bank("c", feats, fg, ~fg, support_keys=["a"])
    # 72 distinct fg and 72 distinct bg pixels: min(K_PARTS, 72) parts in each region
    assert bank["a"].counts()["part"] == 2 * min(K_PARTS, 72)
    with pytest.raises(ValueError, match="overlap"):
        build_bank("c", feats, fg, fg, support_keys=["a"])
    with pytest.raises(ValueError, match="mask"):
        build_bank("c", feats, fg, ~fg, support_keys=["a", "b"])
    with pytest.raises(ValueError):
        build_bank("c", {"a": feats["a"], "b": torch.rand(2, 4, 4, 3)}, fg, ~fg, support_keys=["a"])
    with pytest.raises(ValueError):
        build_bank("c", feats, fg.float(), ~fg, support_keys=["a"])


# ----------------------------------------------------------------------------------------------------
# kmeans
# ----------------------------------------------------------------------------------------------------


def planted_points(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    labels = torch.arange(3).repeat_interleave(20)[torch.randperm(60, generator=g)]
    return centres[labels] + 0.1 * torch.randn(60, 4, generator=g), labels


@pytest.fixture(params=["index_add", "matmul"])
def cluster_sums(request, monkeypatch):
    """Both ways of summing a cluster's members: index_add_ (the CPU's) and the one-hot matrix product (the
    accelerators', where index_add_'s atomics would make every run's prototypes differ in their last bits)."""
    import ovdiff_cli.prototypes as module

    monkeypatch.setattr(module, "_sums_by_matmul", lambda device: request.param == "matmul")
    return request.param


@pytest.fixture
def first_rows_init(monkeypatch):
    """K-means seeded with known centres, the first k rows of the data, instead of the k-means++ draw."""
    import ovdiff_cli.prototypes as module

    monkeypatch.setattr(module, "_kmeans_plusplus", lambda x, x_sq, k, gen, eps: x[:k].clone())


def lloyd_sklearn(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int, bool, float]:
    """scikit-learn 1.2's _kmeans_single_lloyd, re-stated in float64 with explicit differences (no cluster may
    empty here): (last centres, labels_, n_iter_, strict convergence, the smallest gap between a point's nearest
    and second-nearest squared distance seen in any assignment)."""
    x, centres = x.double(), centres.double()
    tol = tol * float(x.var(0, correction=0).mean())  # sklearn's _tolerance: tol * mean(var(X, axis=0))
    labels_old = torch.full((x.shape[0],), -1)
    margin = math.inf
    for i in range(max_iter):
        d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
        top2 = d2.topk(2, dim=1, largest=False).values
        margin = min(margin, float((top2[:, 1] - top2[:, 0]).min()))
        labels = d2.argmin(1)
        assert (torch.bincount(labels, minlength=len(centres)) > 0).all()
        new = torch.stack([x[labels == j].mean(0) for j in range(len(centres))])
        center_shift_tot = float(((new - centres) ** 2).sum())
        centres = new
        if torch.equal(labels, labels_old):
            return centres, labels, i + 1, True, margin
        if center_shift_tot <= tol:
            break
        labels_old = labels
    # not strictly converged: the E-step again, so the labels match the returned centres
    labels = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return centres, labels, i + 1, False, margin


def slow_points() -> torch.Tensor:
    """600 uniform points in the unit square: from its first 4 rows as centres, Lloyd stops by the centre-shift
    tolerance after 8 iterations, while labels still change (11 until none does)."""
    return torch.rand(600, 2, generator=torch.Generator().manual_seed(98))


@pytest.mark.parametrize("tol", [1e-4, 0.0])
def test_kmeans_stops_as_scikit_learn(tol, first_rows_init, cluster_sums):
    x = slow_points()
    want_centres, want_labels, want_iter, want_strict, margin = lloyd_sklearn(x, x[:4], 300, tol)
    # the data tells the two stopping rules apart, and their part maps and prototypes differ
    _, strict_labels, strict_iter, _, _ = lloyd_sklearn(x, x[:4], 300, 0.0)
    assert (want_iter, want_strict) == ((8, False) if tol else (11, True)) and strict_iter == 11
    if tol:
        assert not torch.equal(want_labels, strict_labels)
        member_means = torch.stack([x.double()[want_labels == j].mean(0) for j in range(4)])
        assert (member_means - want_centres).abs().max() > 1e-3  # the last centres are not the labels' means

    got = kmeans(x, 4, tol=tol)
    assert (got.n_iter, got.strict) == (want_iter, want_strict)
    # Float32 matmul distances against float64 differences: ~1e-6 apart, while every nearest centre won by at
    # least `margin` (> 1e-4), so the labels must agree exactly.
    assert margin > 1e-4
    assert torch.equal(got.labels, want_labels)
    # float32 means of 150 points in [0, 1]^2 against float64: a few ulps
    assert torch.allclose(got.centers.double(), want_centres, atol=1e-6)


def test_kmeans_relocates_empty_clusters_as_scikit_learn(monkeypatch, cluster_sums):
    import ovdiff_cli.prototypes as module

    # Centres 0, 2, 100 on a line: points 0 and 0.9 go to 0, points 2 and 10 to 2, none to 100. The empty cluster
    # takes the point farthest from its own centre (10, 64 away), which leaves its old cluster: that centre is the
    # mean of 2 alone, not of 2 and 10.
    monkeypatch.setattr(module, "_kmeans_plusplus", lambda x, x_sq, k, gen, eps: torch.tensor([[0.0], [2.0], [100.0]]))
    x = torch.tensor([[0.0], [2.0], [0.9], [10.0]])
    got = kmeans(x, 3, iters=1)
    assert got.centers[:, 0].tolist() == pytest.approx([0.45, 2.0, 10.0])
    assert got.labels.tolist() == [0, 1, 0, 2]  # re-assigned to the last centres (stopped at iters, not strict)
    assert (got.n_iter, got.strict) == (1, False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters(seed, cluster_sums):
    x, labels = planted_points()
    got = kmeans(x, 3, seed=seed)
    assert got.centers.shape == (3, 4) and got.labels.shape == (60,) and got.labels.dtype == torch.int64
    assert same_partition(got.labels, labels)
    # The first assignment already finds the planted clusters and the second one confirms it: strict convergence,
    # so the last centres are exactly their members' means.
    assert (got.n_iter, got.strict) == (2, True)
    for j in range(3):
        assert torch.allclose(got.centers[j], x[got.labels == j].mean(0), atol=1e-5)


def test_kmeans_deterministic(cluster_sums):
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(3))
    r1 = kmeans(x, 7, seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    r2 = kmeans(x, 7, seed=11)
    assert torch.equal(r1.centers, r2.centers) and torch.equal(r1.labels, r2.labels) and r1.n_iter == r2.n_iter
    assert r1.centers.shape == (7, 5)
    # the labels are each point's nearest centre among those returned
    assert torch.equal(r1.labels, torch.cdist(x, r1.centers).argmin(1))


def test_kmeans_clusters_never_empty(cluster_sums):
    # A tight blob next to a spread-out one, many clusters: k clusters come back, each some point's nearest centre
    # (how an emptied cluster is relocated: test_kmeans_relocates_empty_clusters_as_scikit_learn).
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(40, 2, generator=g)
        x[:20] *= 0.01
        got = kmeans(x, 12, seed=s)
        assert got.centers.shape == (12, 2)
        assert (torch.bincount(got.labels, minlength=12) > 0).all()
        if got.strict:
            for j in range(12):
                assert torch.allclose(got.centers[j], x[got.labels == j].mean(0), atol=1e-6)


def test_kmeans_k_larger_than_m_and_duplicates_and_empty(cluster_sums):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    got = kmeans(x, 10)
    assert got.centers.shape == (3, 2) and sorted(got.labels.tolist()) == [0, 1, 2]
    assert torch.equal(got.centers[got.labels], x)  # each point is its own cluster
    # fewer distinct points than k: only as many clusters as distinct points
    xd = torch.tensor([[1.0, 1.0]] * 4 + [[-1.0, 2.0]] * 3)
    got = kmeans(xd, 5)
    assert got.centers.shape == (2, 2)
    assert same_partition(got.labels, torch.tensor([0] * 4 + [1] * 3))
    got = kmeans(torch.zeros(0, 3), 4)
    assert got.centers.shape == (0, 3) and got.labels.shape == (0,) and got.labels.dtype == torch.int64
    with pytest.raises(ValueError):
        kmeans(x, 0)
    with pytest.raises(ValueError):
        kmeans(x, 2, iters=0)


def test_kmeans_init_is_greedy_kmeans_plus_plus():
    # 4 points: 3 stacked at the origin and one far away. Every k-means++ draw after the first centre is
    # proportional to D^2, so with k = 2 the far point (or, starting there, the stack) is always the second
    # centre, whatever the seed: the clusters are {stack} and {far}.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]])
    for seed in range(5):
        assert same_partition(kmeans(x, 2, seed=seed).labels, torch.tensor([0, 0, 0, 1]))


# ----------------------------------------------------------------------------------------------------
# parts per extractor, and provenance
# ----------------------------------------------------------------------------------------------------


def planted_two_extractors() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 images on a 4x4 grid. Foreground pixels belong to 4 planted groups (ga, gb) in {0,1}^2.

    Extractor "a" only sees ga, extractor "b" only sees gb (plus small noise): each extractor's own clustering
    (REFERENCE 5: per extractor) finds its own 2 groups.

    Returns features, fg, bg and the planted group map (-1 outside fg).
    """
    g = torch.Generator().manual_seed(7)
    group = torch.full((2, 4, 4), -1)
    group[0, 0, :] = 0
    group[0, 1, :2] = 1
    group[0, 2, 1:] = 2
    group[1, 0, 1:] = 3
    group[1, 1, :] = 1
    group[1, 3, :3] = 0
    fg = group >= 0
    bg = torch.zeros_like(fg)
    bg[0, 3, :] = True
    bg[1, 2, 1:3] = True
    ga, gb = (group.clamp_min(0) // 2), (group.clamp_min(0) % 2)
    basis = torch.eye(3)
    fa = basis[ga] + 0.02 * torch.randn(2, 4, 4, 3, generator=g)
    fb = torch.eye(2)[gb] + 0.02 * torch.randn(2, 4, 4, 2, generator=g)
    feats = {"b": fb, "a": fa}  # unsorted on purpose
    return feats, fg, bg, group


def test_parts_cluster_per_extractor_and_are_member_means():
    # The planted groups converge strictly (labels unchanged), where the last centres are their members' means.
    feats, fg, bg, group = planted_two_extractors()
    bank = build_bank("c", feats, fg, bg, k=2, support_keys=["s0", "s1"])
    assert bank.names == ("a", "b")
    # each extractor's parts follow what that extractor sees: ga for "a", gb for "b"
    assert same_partition(bank["a"].part_fg[fg], (group // 2)[fg])
    assert same_partition(bank["b"].part_fg[fg], (group % 2)[fg])
    for e, f in feats.items():
        protos = bank[e]
        assert ((protos.part_fg >= 0) == fg).all() and ((protos.part_bg >= 0) == bg).all()
        parts = protos.select(region="fg", kinds="part")
        assert len(parts) == 2
        for p in parts.tolist():
            members = protos.part_fg == int(protos.part[p])
            assert torch.allclose(protos.prototypes[p], F.normalize(f[members].mean(0), dim=0), atol=ATOL)
    # the same features given in another dict order give the identical bank
    again = build_bank("c", dict(sorted(feats.items())), fg, bg, k=2, support_keys=["s0", "s1"])
    assert again.digest() == bank.digest()


def test_parts_are_the_last_centres_and_the_map_their_labels(first_rows_init):
    # REFERENCE 5: the part prototypes are scikit-learn's cluster_centers_ (the centres after the last update) and
    # the part map its labels_. On slow_points Lloyd stops by tolerance, where those differ from re-pooled means.
    x = slow_points()
    want_centres, want_labels, _, strict, _ = lloyd_sklearn(x, x[:4], 300, 1e-4)
    assert not strict
    fg = torch.ones(1, 20, 30, dtype=torch.bool)
    a = build_bank("c", {"a": x.reshape(1, 20, 30, 2)}, fg, ~fg, k=4, support_keys=["s"])["a"]
    assert torch.equal(a.part_fg.flatten().long(), want_labels)  # masked cells in row-major order are x's rows
    parts = a.prototypes[a.select(region="fg", kinds="part")]
    # float32 centres against float64, normalised: a few ulps (see test_kmeans_stops_as_scikit_learn)
    assert torch.allclose(parts.double(), F.normalize(want_centres, dim=1), atol=1e-6)


def test_support_pixels_provenance():
    feats, fg, bg, group = planted_two_extractors()
    bank = build_bank("c", feats, fg, bg, k=2, support_keys=["s0", "s1"])
    a = bank["a"]
    for g_id, mask, pmap in ((FG, fg, a.part_fg), (BG, bg, a.part_bg)):
        (cls,) = a.select(region=g_id, kinds="class").tolist()
        assert torch.equal(a.support_pixels(cls), mask)
        for p in a.select(region=g_id, kinds="instance").tolist():
            n = int(a.image[p])
            want = torch.zeros_like(mask)
            want[n] = mask[n]
            assert torch.equal(a.support_pixels(p), want)
        union = torch.zeros_like(mask)
        for p in a.select(region=g_id, kinds="part").tolist():
            px = a.support_pixels(p)
            assert torch.equal(px, pmap == int(a.part[p]))
            assert not (union & px).any()  # parts are disjoint ...
            union |= px
        assert torch.equal(union, mask)  # ... and cover the region exactly
    # "a"'s fg parts are exactly the planted groups it can see
    for p in a.select(region=FG, kinds=KIND_PART).tolist():
        px = a.support_pixels(p)
        (planted,) = set((group // 2)[px].tolist())
        assert torch.equal(px, (group // 2 == planted) & fg)


# ----------------------------------------------------------------------------------------------------
# serialisation
# ----------------------------------------------------------------------------------------------------


def assert_banks_equal(a: PrototypeBank, b: PrototypeBank) -> None:
    assert a.class_name == b.class_name and a.names == b.names
    assert a.support_keys == b.support_keys and a.meta == b.meta
    for e in a.names:
        assert a[e].prototypes.dtype == b[e].prototypes.dtype == torch.float32
        assert torch.equal(a[e].prototypes, b[e].prototypes)
        for name in ("kind", "region", "image", "part", "fg_masks", "bg_masks", "part_fg", "part_bg"):
            ta, tb = getattr(a[e], name), getattr(b[e], name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def full_bank() -> PrototypeBank:
    feats, fg, bg, _ = planted_two_extractors()
    meta = {"k": 4, "masker": "threshold", "nested": {"list": [1, 2.5, None], "é": "ü"}}
    return build_bank("donut with chocolate glaze", feats, fg, bg, k=2, support_keys=["s0", "s1"], meta=meta)


def test_prototypes_are_stored_as_float32():
    # REFERENCE 5: prototypes are fp32, in memory and in the bank's bytes. A single pixel (1, 3) is its own class
    # prototype; 1 / sqrt(10) is 7e-5 away from its float16 rounding, far above float32 rounding.
    feats = {"a": torch.tensor([[[[1.0, 3.0]]]])}
    fg = torch.ones(1, 1, 1, dtype=torch.bool)
    bank = build_bank("c", feats, fg, ~fg, k=1, support_keys=["s"])
    want = F.normalize(torch.tensor([1.0, 3.0]), dim=0)
    assert (want.half().float() - want).abs().max() > 5e-5
    assert (bank["a"].prototypes[0] - want).abs().max() < 1e-7
    stored, _ = _split(bank.to_bytes())
    assert stored["a/prototypes"].dtype == torch.float32
    assert torch.equal(stored["a/prototypes"], bank["a"].prototypes)


def test_round_trip_and_deterministic_bytes():
    bank = full_bank()
    data = bank.to_bytes()
    back = PrototypeBank.from_bytes(data)
    assert_banks_equal(bank, back)
    assert back.to_bytes() == data
    assert back.digest() == bank.digest() and len(bank.digest()) == 64
    # deterministic: repeated serialisation and a rebuild from the same inputs give the same bytes
    assert len({bank.to_bytes() for _ in range(10)}) == 1
    assert full_bank().to_bytes() == data
    # a different meta changes the digest
    bank.meta = {"k": 5}
    assert bank.digest() != back.digest()


def test_round_trip_small_and_empty_region():
    bank = small_bank()
    assert_banks_equal(bank, PrototypeBank.from_bytes(bank.to_bytes()))
    feats = {"a": F.normalize(torch.rand(2, 2, 2, 3), dim=-1)}
    fg = torch.zeros(2, 2, 2, dtype=torch.bool)
    empty = build_bank("nothing", feats, fg, fg, support_keys=["a", "b"])
    assert len(empty["a"]) == 0 and empty["a"].prototypes.shape == (0, 3)
    assert_banks_equal(empty, PrototypeBank.from_bytes(empty.to_bytes()))


def _split(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (hlen,) = struct.unpack("<Q", data[:8])
    return load(data), json.loads(data[8 : 8 + hlen])["__metadata__"]


def test_malformed_payloads_raise_value_error():
    data = full_bank().to_bytes()
    tensors, metadata = _split(data)

    def tampered(**changes: torch.Tensor | None) -> bytes:
        t = dict(tensors)
        for key, value in changes.items():
            if value is None:
                del t[key]
            else:
                t[key] = value
        return save(t, metadata=metadata)

    cases = {
        "missing key": tampered(**{"a/part_fg": None}),
        "missing prototypes": tampered(**{"b/prototypes": None}),
        "wrong length": tampered(**{"a/kind": torch.cat([tensors["a/kind"], torch.zeros(1, dtype=torch.int8)])}),
        "wrong grid": tampered(**{"b/part_bg": tensors["b/part_bg"][:, :2].contiguous()}),
        "wrong dtype": tampered(**{"a/image": tensors["a/image"].to(torch.int32)}),
        "wrong N": tampered(**{"a/fg_masks": tensors["a/fg_masks"][:1]}),
        "bad proto rows": tampered(**{"a/prototypes": tensors["a/prototypes"][:-1]}),
        "bad index": tampered(**{"b/image": torch.where(tensors["b/image"] >= 0, 9, -1).to(torch.int16)}),
        "unexpected key": tampered(extra=torch.zeros(1)),
        "no metadata": save(tensors),
        "bad metadata": save(tensors, metadata={"ovdiff": "{not json"}),
        "other format": save(tensors, metadata={"ovdiff": json.dumps({"format": "x"})}),
        "float16 version": save(tensors, metadata={"ovdiff": metadata["ovdiff"].replace('"version":3', '"version":2')}),
        "truncated": data[:-10],
        "garbage": b"\x00" * 3,
        "garbage header": struct.pack("<Q", 5) + b"hello",
    }
    for name, payload in cases.items():
        with pytest.raises(ValueError) as info:
            PrototypeBank.from_bytes(payload)
        assert "\n" not in str(info.value), name


def test_non_json_meta_rejected():
    with pytest.raises(ValueError, match="JSON"):
        small_bank().__class__(**{**vars(small_bank()), "meta": {"x": object()}})
