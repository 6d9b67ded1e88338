"""Prototype aggregation (paper 3.3, eq. 2 and 3): hand-computed values on planted features and masks."""

from __future__ import annotations

import json
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

# fp16 storage of prototypes: unit vectors are exact to ~5e-4 per component.
ATOL = 2e-3


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
    # every stored prototype is (to fp16 precision) unit length
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters(seed, cluster_sums):
    x, labels = planted_points()
    centroids, assign = kmeans(x, 3, seed=seed)
    assert centroids.shape == (3, 4) and assign.shape == (60,) and assign.dtype == torch.int64
    assert same_partition(assign, labels)
    for j in range(3):
        assert torch.allclose(centroids[j], x[assign == j].mean(0), atol=1e-5)


def test_kmeans_deterministic(cluster_sums):
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(3))
    c1, a1 = kmeans(x, 7, seed=11)
    torch.manual_seed(123)  # the global RNG must not matter
    c2, a2 = kmeans(x, 7, seed=11)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    counts = torch.bincount(a1, minlength=7)
    assert (counts > 0).all()  # every returned cluster has members
    for j in range(7):
        assert torch.allclose(c1[j], x[a1 == j].mean(0), atol=1e-5)


def test_kmeans_clusters_never_empty(cluster_sums):
    # A tight blob next to a spread-out one, many clusters: Lloyd steps sometimes empty a cluster (seed 224
    # does with the current init), which must be re-seeded, so k clusters come back, all non-empty.
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(40, 2, generator=g)
        x[:20] *= 0.01
        c, a = kmeans(x, 12, seed=s)
        assert c.shape == (12, 2)
        assert (torch.bincount(a, minlength=12) > 0).all()
        for j in range(12):
            assert torch.allclose(c[j], x[a == j].mean(0), atol=1e-6)


def test_kmeans_k_larger_than_m_and_duplicates_and_empty(cluster_sums):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    c, a = kmeans(x, 10)
    assert c.shape == (3, 2) and sorted(a.tolist()) == [0, 1, 2]
    assert torch.equal(c[a], x)  # each point is its own cluster
    # fewer distinct points than k: only as many clusters as distinct points
    xd = torch.tensor([[1.0, 1.0]] * 4 + [[-1.0, 2.0]] * 3)
    c, a = kmeans(xd, 5)
    assert c.shape == (2, 2)
    assert same_partition(a, torch.tensor([0] * 4 + [1] * 3))
    c, a = kmeans(torch.zeros(0, 3), 4)
    assert c.shape == (0, 3) and a.shape == (0,) and a.dtype == torch.int64
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_kmeans_init_is_greedy_kmeans_plus_plus():
    # 4 points: 3 stacked at the origin and one far away. Every k-means++ draw after the first centre is
    # proportional to D^2, so with k = 2 the far point (or, starting there, the stack) is always the second
    # centre, whatever the seed: the clusters are {stack} and {far}.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]])
    for seed in range(5):
        _, a = kmeans(x, 2, seed=seed)
        assert same_partition(a, torch.tensor([0, 0, 0, 1]))


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
