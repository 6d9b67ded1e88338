"""Prototype aggregation (paper section 3.3, eq. 2 and 3), per extractor as the authors' code does it
(REFERENCE 5).

For one class and each extractor on its own, the support images' raw dense features (on that extractor's grid)
and the foreground/background masks (made at the support image's resolution, resized bilinear to the grid and
binarised) become an :class:`ExtractorPrototypes`: for each region g in (fg, bg)

* one *class* prototype, the mean of all masked features (so mask-size weighted, eq. 3),
* one *instance* prototype per support image whose mask in g is not empty on the grid, the masked mean (eq. 2),
* up to K *part* prototypes, the centres of a K-means clustering of that extractor's masked features.

An image whose foreground mask is empty on an extractor's grid gives that extractor no prototype at all, background
included (REFERENCE 3).

A :class:`PrototypeBank` holds one of these per extractor. Every prototype keeps its provenance (kind, region,
image or cluster) and each extractor keeps its masks and cluster maps on its grid, so
:meth:`ExtractorPrototypes.support_pixels` says exactly which support cells a prototype was pooled from
(``ovdiff explain`` needs this).

Banks serialise to safetensors bytes (never pickle), deterministically, so the digest of a bank is stable.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ovdiff_cli.defaults import K_PARTS, KMEANS_ITERS, KMEANS_SEED, KMEANS_TOL, MASK_GRID_THRESHOLD

__all__ = [
    "BG",
    "FG",
    "FORMAT",
    "FORMAT_VERSION",
    "KIND_CLASS",
    "KIND_INSTANCE",
    "KIND_NAMES",
    "KIND_PART",
    "REGION_NAMES",
    "ExtractorPrototypes",
    "KMeansResult",
    "PrototypeBank",
    "build_bank",
    "kmeans",
    "masks_on_grid",
]

# Prototype kinds, as stored in PrototypeBank.kind (int8).
KIND_CLASS = 0
KIND_INSTANCE = 1
KIND_PART = 2
KIND_NAMES: tuple[str, ...] = ("class", "instance", "part")

# Regions, as stored in PrototypeBank.region (int8).
FG = 0
BG = 1
REGION_NAMES: tuple[str, ...] = ("fg", "bg")

FORMAT = "ovdiff-prototype-bank"
# 3: prototypes stored as float32 (2 stored them as float16).
FORMAT_VERSION = 3

# Tensors in the safetensors payload are named "<extractor>/<field>".
_INT_FIELDS: dict[str, torch.dtype] = {
    "kind": torch.int8,
    "region": torch.int8,
    "image": torch.int16,
    "part": torch.int16,
}
_GRID_FIELDS: dict[str, torch.dtype] = {
    "fg_masks": torch.bool,
    "bg_masks": torch.bool,
    "part_fg": torch.int16,
    "part_bg": torch.int16,
}
# The one safetensors metadata key. A single key on purpose: safetensors writes its metadata from a Rust
# HashMap, so with several keys their order (and thus the bytes and the digest) would change from run to run.
_META_KEY = "ovdiff"


# ----------------------------------------------------------------------------------------------------
# K-means
# ----------------------------------------------------------------------------------------------------


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (M, k) between rows of x (M, D) and c (k, D), clamped at 0.

    Uses ||x||^2 - 2 x.c + ||c||^2 (one matmul) rather than explicit differences: with M ~ 10^5 pixels and D
    in the thousands the (M, k, D) difference tensor would not fit in memory.
    """
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _sums_by_matmul(device: torch.device) -> bool:
    """Whether cluster sums are a one-hot matrix product on ``device`` rather than ``index_add_``.

    On the CPU ``index_add_`` adds row by row, in order (so deterministically), and is the faster of the two. On
    accelerators it adds with atomics, in an order that changes from run to run, and so would the prototypes and
    the bank's digest; the matrix product is deterministic there, and faster than atomics that all contend for the
    same k rows.
    """
    return device.type != "cpu"


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (k, D) of the rows of x (M, D) and member counts (k,) int64 under ``labels`` (M,)."""
    counts = torch.bincount(labels, minlength=k)
    if _sums_by_matmul(x.device):
        sums = F.one_hot(labels, k).to(x.dtype).T @ x
    else:
        sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums, counts


def _kmeans_plusplus(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator, eps: float) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's, which the reference's KMeans uses): (k', D) initial centres, rows
    of x (M, D); ``x_sq`` (M,) is x's squared row norms.

    Each next centre is the best, by the resulting potential, of 2 + log(k) candidates drawn from ``gen`` with
    probability proportional to D(x)^2. Points within ``eps`` (squared distance) of a centre count as coinciding
    with it and are never drawn, so k' < k when x has fewer than k distinct rows.
    """
    m = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(m, (1,), generator=gen).item())
    centers = x[first : first + 1].clone()
    min_d2 = _sq_dists(x, x_sq, centers)[:, 0]
    while centers.shape[0] < k:
        w = torch.where(min_d2 > eps, min_d2, torch.zeros_like(min_d2)).double().cpu()
        if float(w.sum()) <= 0.0:
            break  # every point coincides with a centre: no further distinct centres exist
        cumulative = torch.cumsum(w, 0)
        draws = torch.rand(trials, generator=gen, dtype=torch.float64) * cumulative[-1]
        cand = torch.searchsorted(cumulative, draws, right=True).clamp_max(m - 1)
        d2 = torch.minimum(min_d2[None], _sq_dists(x, x_sq, x[cand.to(x.device)]).T)  # (trials, M)
        best = int(d2.sum(1).argmin())
        centers = torch.cat([centers, x[int(cand[best]) : int(cand[best]) + 1]])
        min_d2 = d2[best]
    return centers


@dataclass(frozen=True)
class KMeansResult:
    """What :func:`kmeans` returns, named after scikit-learn's ``KMeans`` attributes.

    Attributes:
        centers: (k', D) float32 on x's device: the centres after the last Lloyd update (``cluster_centers_``).
        labels: (M,) int64 on x's device, values in [0, k'): each point's nearest centre in ``centers``
            (``labels_``). A centre may be nobody's nearest (rare: the last update moved it off all its points).
        n_iter: Lloyd iterations run (``n_iter_``), in [1, iters]; 0 when M == 0.
        strict: True when the run stopped because no label changed (scikit-learn's strict convergence); False
            when it stopped by the centre-shift tolerance or at ``iters``.
    """

    centers: torch.Tensor
    labels: torch.Tensor
    n_iter: int
    strict: bool


def kmeans(
    x: torch.Tensor, k: int, seed: int = KMEANS_SEED, iters: int = KMEANS_ITERS, tol: float = KMEANS_TOL
) -> KMeansResult:
    """K-means as scikit-learn 1.2's ``KMeans(n_clusters=k, n_init="auto")`` runs it (REFERENCE 5): one greedy
    k-means++ seeding, then Lloyd iterations, deterministic, on x's device.

    Each iteration assigns every point to its nearest centre, then moves each centre to its members' mean. It stops
    when no label changed since the previous iteration, when the centres moved by at most ``tol`` times the mean
    per-feature variance of x (sum over centres of the squared shift), or after ``iters`` iterations; unless it
    stopped on unchanged labels, the labels are then recomputed from the last centres. ``tol=0`` stops only on
    unchanged labels.

    Args:
        x: (M, D) float points (computed in float32).
        k: requested number of clusters (>= 1).
        seed: seeds a CPU ``torch.Generator`` used for every random draw of the seeding, so the result depends only
            on (x, k, seed, iters, tol), not on the global RNG state or on the device's RNG. (Not scikit-learn's
            RNG: the same seed draws other points than ``random_state``.)
        iters: maximum number of Lloyd iterations (scikit-learn's ``max_iter``).
        tol: centre-shift tolerance relative to the data's mean per-feature variance (scikit-learn's ``tol``).

    Returns:
        A :class:`KMeansResult` with k' = min(k, M) centres, fewer when x has fewer distinct rows than that (only
        as many clusters as distinct rows can be formed). M == 0 gives (0, D) centres and no labels.

    Empty clusters, relocated as scikit-learn does: when an assignment leaves clusters empty, they take, in index
    order, the points farthest from their assigned centres (farthest first, ties -> lowest index); each such point
    becomes its new cluster's centre and leaves its old cluster's mean. A point that coincides with its centre is
    never taken, and a cluster left empty keeps its centre.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects a 2-d (M, D) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    if iters < 1:
        raise ValueError(f"kmeans needs iters >= 1, got {iters}")
    x = x.float()
    m, d = x.shape
    if m == 0:
        return KMeansResult(x.new_zeros((0, d)), torch.zeros(0, dtype=torch.int64, device=x.device), 0, True)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x_sq = (x * x).sum(1)
    # Squared distances below this are rounding noise of the matmul expansion: such a point coincides with a centre.
    eps = 1e-6 * max(1.0, float(x_sq.max()))
    centers = _kmeans_plusplus(x, x_sq, min(k, m), gen, eps)
    k = centers.shape[0]
    # scikit-learn's _tolerance: tol scaled by the mean over features of the data's (biased) variance.
    shift_tol = tol * float(x.var(0, correction=0).mean())

    previous = None
    strict = False
    n_iter = 0
    while n_iter < iters:
        n_iter += 1
        d2 = _sq_dists(x, x_sq, centers)
        labels = d2.argmin(1)
        sums, counts = _cluster_sums(x, labels, k)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            far = d2.gather(1, labels[:, None])[:, 0]
            for j, p in zip(empty, far.argsort(descending=True, stable=True)[: len(empty)].tolist(), strict=True):
                if float(far[p]) <= eps:
                    break  # the rest sit on their centres: nothing left to split off
                sums[labels[p]] -= x[p]
                counts[labels[p]] -= 1
                sums[j], counts[j] = x[p], 1
        new = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1).to(x.dtype)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if previous is not None and torch.equal(labels, previous):
            strict = True
            break
        if shift <= shift_tol:
            break
        previous = labels
    if not strict:
        labels = _sq_dists(x, x_sq, centers).argmin(1)
    return KMeansResult(centers, labels, n_iter, strict)


# ----------------------------------------------------------------------------------------------------
# The bank
# ----------------------------------------------------------------------------------------------------


def _to_index(value: int | str, names: tuple[str, ...], what: str) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(names)}")
        return names.index(value)
    if not 0 <= int(value) < len(names):
        raise ValueError(f"unknown {what} {value!r}; expected 0..{len(names) - 1}")
    return int(value)


def _canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal objects give equal strings (and equal bytes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(eq=False)
class ExtractorPrototypes:
    """One extractor's prototypes of one class, with full provenance on that extractor's feature grid.

    P = number of prototypes, N = number of support images, (h, w) = the extractor's feature grid.

    Attributes:
        prototypes: (P, D) float32 CPU tensor. Rows are pooled from raw features, then L2-normalised (norm 1 up to
            float32 rounding).
        kind: (P,) int8, KIND_CLASS / KIND_INSTANCE / KIND_PART.
        region: (P,) int8, FG / BG.
        image: (P,) int16, support image index in [0, N) for instance prototypes, -1 otherwise.
        part: (P,) int16, cluster index for part prototypes, -1 otherwise.
        fg_masks, bg_masks: (N, h, w) bool support masks on the grid.
        part_fg, part_bg: (N, h, w) int16, the part cluster of each cell of the fg (bg) mask, -1 elsewhere.

    Order of prototypes: fg class, fg instances (by image), fg parts (by cluster), then the same for bg.
    """

    prototypes: torch.Tensor
    kind: torch.Tensor
    region: torch.Tensor
    image: torch.Tensor
    part: torch.Tensor
    fg_masks: torch.Tensor
    bg_masks: torch.Tensor
    part_fg: torch.Tensor
    part_bg: torch.Tensor

    def validate(self, n: int, name: str) -> None:
        """Raise ValueError (one line, naming extractor ``name``) unless dtypes, shapes and index ranges are
        consistent with ``n`` support images."""
        for field_name in _INT_FIELDS:
            t = getattr(self, field_name)
            if not isinstance(t, torch.Tensor) or t.dtype != _INT_FIELDS[field_name] or t.dim() != 1:
                raise ValueError(f"{name}: {field_name} must be a 1-d {_INT_FIELDS[field_name]} tensor")
        p = self.kind.shape[0]
        for field_name in ("region", "image", "part"):
            if getattr(self, field_name).shape[0] != p:
                raise ValueError(f"{name}: {field_name} has length {getattr(self, field_name).shape[0]}, expected {p}")
        t = self.prototypes
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != p:
            raise ValueError(f"{name}: prototypes must be a (P={p}, D) float32 tensor")
        for field_name, dtype in _GRID_FIELDS.items():
            t = getattr(self, field_name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 3:
                raise ValueError(f"{name}: {field_name} must be a 3-d (N, h, w) {dtype} tensor")
            if t.shape != self.fg_masks.shape or t.shape[0] != n:
                raise ValueError(f"{name}: {field_name} has shape {tuple(t.shape)}, expected ({n}, h, w)")
        if p:
            if int(self.kind.min()) < 0 or int(self.kind.max()) >= len(KIND_NAMES):
                raise ValueError(f"{name}: kind values out of range")
            if int(self.region.min()) < 0 or int(self.region.max()) >= len(REGION_NAMES):
                raise ValueError(f"{name}: region values out of range")
        inst = self.kind == KIND_INSTANCE
        if bool(((self.image >= 0) != inst).any()) or bool((self.image[inst] >= n).any()):
            raise ValueError(f"{name}: image must be in [0, N) exactly for instance prototypes and -1 otherwise")
        parts = self.kind == KIND_PART
        if bool(((self.part >= 0) != parts).any()):
            raise ValueError(f"{name}: part must be >= 0 exactly for part prototypes and -1 otherwise")
        for g, mask, pmap in ((FG, self.fg_masks, self.part_fg), (BG, self.bg_masks, self.part_bg)):
            if bool(((pmap >= 0) != mask).any()):
                raise ValueError(f"{name}: part_{REGION_NAMES[g]} must be >= 0 exactly on the {REGION_NAMES[g]} mask")
            n_parts = int((parts & (self.region == g)).sum())
            if bool((pmap >= n_parts).any()):
                raise ValueError(f"{name}: part_{REGION_NAMES[g]} names a cluster without a prototype")

    def __len__(self) -> int:
        """Number of prototypes P."""
        return int(self.kind.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """The feature grid (h, w) the masks and part maps live on."""
        return int(self.fg_masks.shape[1]), int(self.fg_masks.shape[2])

    def counts(self) -> dict[str, int]:
        """Kind name -> number of prototypes of that kind, fg and bg together."""
        return {name: int((self.kind == i).sum()) for i, name in enumerate(KIND_NAMES)}

    def select(
        self,
        region: int | str | None = None,
        kinds: int | str | Iterable[int | str] | None = None,
    ) -> torch.Tensor:
        """Indices of the prototypes in ``region`` (FG/BG or "fg"/"bg"; None = both) whose kind is in
        ``kinds`` (KIND_* constants or names, one or several; None = all).

        Returns a sorted (P',) int64 CPU tensor.
        """
        keep = torch.ones(len(self), dtype=torch.bool)
        if region is not None:
            keep &= self.region == _to_index(region, REGION_NAMES, "region")
        if kinds is not None:
            if isinstance(kinds, (int, str)):
                kinds = [kinds]
            wanted = torch.zeros(len(self), dtype=torch.bool)
            for kd in kinds:
                wanted |= self.kind == _to_index(kd, KIND_NAMES, "kind")
            keep &= wanted
        return torch.nonzero(keep).flatten()

    def support_pixels(self, p: int) -> torch.Tensor:
        """(N, h, w) bool: exactly the support cells prototype ``p`` was pooled from.

        Class prototype: every cell of its region's masks; instance prototype of image n: image n's mask of
        its region; part prototype j: the cells of its region whose cluster is j.
        """
        if not -len(self) <= p < len(self):
            raise IndexError(f"prototype index {p} out of range for {len(self)} prototypes")
        g = int(self.region[p])
        mask = self.fg_masks if g == FG else self.bg_masks
        kd = int(self.kind[p])
        if kd == KIND_CLASS:
            return mask.clone()
        if kd == KIND_INSTANCE:
            out = torch.zeros_like(mask)
            n = int(self.image[p])
            out[n] = mask[n]
            return out
        pmap = self.part_fg if g == FG else self.part_bg
        return pmap == int(self.part[p])


@dataclass(eq=False)
class PrototypeBank:
    """The prototypes of one class: one :class:`ExtractorPrototypes` per extractor, with full provenance.

    Attributes:
        class_name: the class (prompt text) the bank belongs to.
        extractors: extractor name -> its prototypes, keys sorted.
        support_keys: the N support images' cache keys (opaque strings).
        meta: JSON-able dict provided by the caller (e.g. the parameters that produced the bank).
    """

    class_name: str
    extractors: dict[str, ExtractorPrototypes]
    support_keys: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.extractors = {e: self.extractors[e] for e in sorted(self.extractors)}
        self.support_keys = list(self.support_keys)
        if not isinstance(self.class_name, str):
            raise ValueError("class_name must be a string")
        if not self.extractors:
            raise ValueError("a prototype bank needs at least one extractor")
        n = len(self.support_keys)
        if not all(isinstance(s, str) for s in self.support_keys):
            raise ValueError("support_keys must be strings")
        for name, protos in self.extractors.items():
            protos.validate(n, name)
        if not isinstance(self.meta, dict):
            raise ValueError("meta must be a dict")
        try:
            _canonical_json(self.meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta is not JSON-serialisable: {exc}") from None

    def __getitem__(self, extractor: str) -> ExtractorPrototypes:
        return self.extractors[extractor]

    @property
    def names(self) -> tuple[str, ...]:
        """The extractor names, sorted."""
        return tuple(self.extractors)

    @property
    def num_images(self) -> int:
        """Number of support images N."""
        return len(self.support_keys)

    def counts(self) -> dict[str, dict[str, int]]:
        """Extractor -> kind name -> number of prototypes (for the CLI summary)."""
        return {e: p.counts() for e, p in self.extractors.items()}

    # -- serialisation ---------------------------------------------------------------------------------------

    def _header(self) -> str:
        return _canonical_json(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "class_name": self.class_name,
                "extractors": list(self.extractors),
                "support_keys": list(self.support_keys),
                "meta": self.meta,
            }
        )

    def to_bytes(self) -> bytes:
        """Safetensors bytes of the bank: prototypes as float32 (as the reference stores them), provenance arrays
        in their own dtypes, names and ``meta`` as one canonical JSON string in the metadata. Deterministic: the
        same bank gives the same bytes. Raises ValueError if ``meta`` is not JSON-able.
        """
        from safetensors.torch import save

        try:
            header = self._header()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bank metadata is not JSON-serialisable: {exc}") from None
        tensors: dict[str, torch.Tensor] = {}
        for e, protos in self.extractors.items():
            tensors[f"{e}/prototypes"] = protos.prototypes.detach().cpu().contiguous()
            for name in (*_INT_FIELDS, *_GRID_FIELDS):
                tensors[f"{e}/{name}"] = getattr(protos, name).detach().cpu().contiguous()
        return save(tensors, metadata={_META_KEY: header})

    @classmethod
    def from_bytes(cls, data: bytes) -> PrototypeBank:
        """Inverse of :meth:`to_bytes`. Raises ValueError with a one-line reason on any malformed payload
        (not safetensors, wrong format/version, missing or unexpected keys, wrong dtypes, inconsistent
        shapes).
        """
        from safetensors.torch import load

        data = bytes(data)
        info = read_bank_info(data)
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types; all mean "not a valid bank"
            raise ValueError(f"prototype bank payload is not valid safetensors ({type(exc).__name__})") from None
        extractors = info["extractors"]
        if not isinstance(extractors, list) or not all(isinstance(e, str) for e in extractors):
            raise ValueError("prototype bank extractors must be a list of strings")
        fields_ = {"prototypes": torch.float32} | _INT_FIELDS | _GRID_FIELDS
        expected = {f"{e}/{name}": dtype for e in extractors for name, dtype in fields_.items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"prototype bank lacks tensor {missing[0]!r}")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise ValueError(f"prototype bank has unexpected tensor {extra[0]!r}")
        for key, dtype in expected.items():
            if tensors[key].dtype != dtype:
                raise ValueError(f"prototype bank tensor {key!r} has dtype {tensors[key].dtype}, expected {dtype}")
        if not isinstance(info["support_keys"], list):
            raise ValueError("prototype bank support_keys must be a list")
        return cls(
            class_name=info["class_name"],
            extractors={
                e: ExtractorPrototypes(
                    prototypes=tensors[f"{e}/prototypes"],
                    **{name: tensors[f"{e}/{name}"] for name in (*_INT_FIELDS, *_GRID_FIELDS)},
                )
                for e in extractors
            },
            support_keys=info["support_keys"],
            meta=info["meta"],
        )

    def digest(self) -> str:
        """sha256 hex digest of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


def read_bank_info(data: bytes) -> dict:
    """A bank payload's metadata (class_name, extractors, support_keys, meta, format, version) from its
    safetensors header alone, without reading a tensor (``ovdiff cache ls`` lists banks this way).

    Raises ValueError with a one-line reason when the payload is not a bank of this format version.
    """
    # Read the metadata from the header ourselves (8-byte little-endian length + JSON, the safetensors layout)
    # since safetensors' Python API only exposes metadata for files.
    if len(data) < 8:
        raise ValueError("prototype bank payload is truncated")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise ValueError("prototype bank payload is truncated")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError:
        raise ValueError("prototype bank payload is not valid safetensors (unreadable header)") from None
    raw = header.get("__metadata__", {}).get(_META_KEY) if isinstance(header, dict) else None
    if not isinstance(raw, str):
        raise ValueError("payload is not an ovdiff prototype bank (no bank metadata)")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError("prototype bank metadata is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError("payload is not an ovdiff prototype bank")
    if info.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported prototype bank version {info.get('version')!r}")
    for key in ("class_name", "extractors", "support_keys", "meta"):
        if key not in info:
            raise ValueError(f"prototype bank metadata lacks {key!r}")
    return info


# ----------------------------------------------------------------------------------------------------
# Building a bank
# ----------------------------------------------------------------------------------------------------


def _normalise(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows of t (P, D) float32, on the CPU. Stored as they are (float32), so a freshly built bank
    is bit-identical to the same bank read back from its bytes."""
    return F.normalize(t, dim=-1).cpu()


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int], threshold: float = MASK_GRID_THRESHOLD) -> torch.Tensor:
    """(N, S, S) bool masks at the support image's resolution -> (N, h, w) bool on a feature grid: resized
    bilinear (as F.interpolate samples, no antialiasing) and kept where the value is above ``threshold``."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks.clone()
    resized = F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
    return resized > threshold


def _region_prototypes(
    feats: torch.Tensor, mask: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class, instance and part prototypes of one region of one extractor.

    Args:
        feats: (N, h, w, D) float32 raw features on the computation device.
        mask: (N, h, w) bool on the same device.

    Returns:
        (prototypes (P_g, D) normalised CPU float32, kind (P_g,) int8, image (P_g,) int16, part map (N, h, w)
        int16 CPU with the cluster (K-means label) of each masked cell and -1 elsewhere); P_g = 0 and an all -1
        part map when the mask is empty everywhere. Part prototypes are the K-means centres, as the reference's
        ``cluster_centers_`` (not re-pooled from the final labels).
    """
    n = mask.shape[0]
    sizes = mask.flatten(1).sum(1)  # m_n, (N,)
    # Only images with a non-empty mask get an instance prototype (an empty mask has no mean).
    present = torch.nonzero(sizes).flatten()
    part_map = torch.full(mask.shape, -1, dtype=torch.int16)
    if present.numel() == 0:
        return (
            torch.zeros(0, feats.shape[-1]),
            torch.zeros(0, dtype=torch.int8),
            torch.zeros(0, dtype=torch.int16),
            part_map,
        )
    m = sizes[present].to(torch.float32)  # (N',)
    w = mask.flatten(1).to(torch.float32)  # (N, hw) mask weights
    pix = feats[mask]  # (M, D), masked cells in row-major (n, y, x) order
    clusters = kmeans(pix, k, seed=seed)
    n_parts = clusters.centers.shape[0]
    part_map[mask.cpu()] = clusters.labels.to(torch.int16).cpu()
    # eq. 2: P_n = M_n^T Phi(S_n) / m_n (the masked sum over all images first, so no feature copy is made)
    sums = torch.einsum("nh,nhd->nd", w, feats.reshape(n, -1, feats.shape[-1]))[present]
    inst = sums / m[:, None]
    cls = sums.sum(0, keepdim=True) / m.sum()  # eq. 3: sum_n m_n P_n / sum_n m_n, the mean of every masked cell
    kind = torch.tensor([KIND_CLASS] + [KIND_INSTANCE] * len(present) + [KIND_PART] * n_parts, dtype=torch.int8)
    image = torch.cat([torch.tensor([-1]), present.cpu(), torch.full((n_parts,), -1, dtype=torch.int64)])
    return _normalise(torch.cat([cls, inst, clusters.centers])), kind, image.to(torch.int16), part_map


def extractor_prototypes(
    features: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, *, k: int = K_PARTS, seed: int = KMEANS_SEED
) -> ExtractorPrototypes:
    """One extractor's prototypes of one class (paper eq. 2 and 3 plus K-means parts), fg and bg separately.

    Args:
        features: (N, h, w, D) float raw features on the extractor's grid, on the computation device.
        fg, bg: (N, h, w) bool masks on that grid, each region on its own: resized from disjoint masks, they may
            share cells on a coarse grid (a cell both overlap, REFERENCE 5). An image whose fg is empty here gives
            no prototype at all: its bg cells are dropped too (REFERENCE 3, skipping per extractor), and the stored
            bg mask says so.
        k: part clusters per region (fewer if a region has fewer distinct masked cells).
        seed: K-means seed (both regions).
    """
    features = features.float()
    fg, bg = fg.to(features.device), bg.to(features.device)
    bg = bg & fg.flatten(1).any(1)[:, None, None]
    protos, kinds, regions, images, parts, part_maps = [], [], [], [], [], []
    for g, mask in ((FG, fg), (BG, bg)):
        pr, kind, image, part_map = _region_prototypes(features, mask, k, seed)
        protos.append(pr)
        kinds.append(kind)
        regions.append(torch.full(kind.shape, g, dtype=torch.int8))
        images.append(image)
        is_part = kind == KIND_PART
        part_idx = torch.full(kind.shape, -1, dtype=torch.int16)
        part_idx[is_part] = torch.arange(int(is_part.sum()), dtype=torch.int16)
        parts.append(part_idx)
        part_maps.append(part_map)
    return ExtractorPrototypes(
        prototypes=torch.cat(protos),
        kind=torch.cat(kinds),
        region=torch.cat(regions),
        image=torch.cat(images),
        part=torch.cat(parts),
        fg_masks=fg.cpu().clone(),
        bg_masks=bg.cpu().clone(),
        part_fg=part_maps[0],
        part_bg=part_maps[1],
    )


def build_bank(
    class_name: str,
    features: Mapping[str, torch.Tensor],
    fg: torch.Tensor,
    bg: torch.Tensor,
    *,
    k: int = K_PARTS,
    seed: int = KMEANS_SEED,
    support_keys: list[str],
    meta: dict | None = None,
) -> PrototypeBank:
    """Build one class's prototype bank: every extractor on its own, from its raw features (REFERENCE 5).

    Args:
        class_name: the class.
        features: extractor name -> (N, h_e, w_e, D_e) float raw support features on that extractor's grid.
        fg, bg: (N, S, S) bool foreground / background masks at the support image's resolution, disjoint; each
            extractor sees them resized to its grid (:func:`masks_on_grid`), where an image without fg gives that
            extractor no prototype (:func:`extractor_prototypes`).
        k: number of part clusters per extractor and region.
        seed: K-means seed.
        support_keys: the N support images' cache keys.
        meta: JSON-able dict stored with the bank.

    Raises:
        ValueError: on inconsistent shapes or dtypes, overlapping masks, or a wrong number of support keys.
    """
    if not features:
        raise ValueError("build_bank needs features from at least one extractor")
    n = len(support_keys)
    for name, mask in (("fg", fg), ("bg", bg)):
        if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] != n:
            raise ValueError(f"{name} mask must be ({n}, S, S) bool, got {tuple(mask.shape)} {mask.dtype}")
    if fg.shape != bg.shape:
        raise ValueError(f"fg {tuple(fg.shape)} and bg {tuple(bg.shape)} masks differ in shape")
    if bool((fg & bg).any()):
        raise ValueError("fg and bg masks overlap")
    per: dict[str, ExtractorPrototypes] = {}
    for e in sorted(features):
        f = features[e]
        if f.dim() != 4 or f.shape[0] != n:
            raise ValueError(f"features[{e!r}] has shape {tuple(f.shape)}, expected ({n}, h, w, D)")
        if not f.is_floating_point():
            raise ValueError(f"features[{e!r}] must be floating point, got {f.dtype}")
        grid = (int(f.shape[1]), int(f.shape[2]))
        per[e] = extractor_prototypes(f, masks_on_grid(fg, grid), masks_on_grid(bg, grid), k=k, seed=seed)
    return PrototypeBank(class_name, per, list(support_keys), dict(meta) if meta is not None else {})
