"""Foreground/background masks of support images (paper section 3.3, eq. 1), as the authors' code makes them.

An unsupervised segmenter (a *masker*) proposes binary object masks per support image; `select_masks` adds
the background proposal (complement of all proposals) as proposal 0, ranks them by mean attribution and gives each
pixel to the highest-ranked proposal covering it: fg = the top proposal, bg = the pixels won by the lowest-ranked
proposal that wins any, refined to attribution < `BG_ATTRIBUTION_MAX` and eroded once with a 3x3 cross
(REFERENCE 3). Everything happens at the support image's resolution, on attribution maps upsampled to it
(:func:`ovdiff_cli.attribution.at_image_size`).

Maskers are looked up by name in a small registry (`register_masker`, `build_masker`, `available_maskers`,
`resolve_masker_name`). Registered:

* ``cutler``: the CutLER detector, the paper's segmenter (REFERENCE 3).
* ``maskcut``: training-free normalised cuts on DINO keys, as CutLER's MaskCut (a fallback; no CRF).
* ``threshold``: a 3-class multi-Otsu split of the class's attribution maps (the paper's "-CutLER" variant),
  thresholds from the latent-grid maps, applied at the image size: it makes fg and bg directly, with no proposals,
  no extra 0.2 cut and no erosion.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from skimage.filters import threshold_multiotsu

from ovdiff_cli.defaults import (
    BG_ATTRIBUTION_MAX,
    BG_ERODE,
    CUTLER_SCORE,
    FG_FALLBACK,
    MASKCUT_CORNERS,
    MASKCUT_MAX_IOU,
    MASKCUT_MIN_AREA,
    MASKCUT_N_MASKS,
    MASKCUT_TAU,
    THRESHOLD_FALLBACK_BG,
    THRESHOLD_FALLBACK_FG,
)

__all__ = [
    "Masker",
    "MaskerUnavailable",
    "available_maskers",
    "build_masker",
    "maskcut_batch",
    "maskcut_image",
    "register_masker",
    "registered_maskers",
    "resolve_masker_name",
    "select_masks",
    "stack_masks",
]

AUTO = "auto"


class MaskerUnavailable(ValueError):
    """A registered masker that cannot be built in this installation (e.g. missing checkpoint support)."""


class Masker(ABC):
    """Makes the foreground and background masks of the N support images of one class.

    Subclasses set `name` (registry name), `needs_features` (True if `propose` needs MaskCut's DINO key
    features), `needs_images` (True if it needs the support images) and `version` (bump when the output changes
    for the same parameters, so cache keys change too). A proposal-based masker implements `propose`; eq. 1
    then picks fg and bg among the proposals (`masks`). A masker that makes fg and bg directly overrides `masks`
    and sets `proposal_based` to False.
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    proposal_based: ClassVar[bool] = True
    version: ClassVar[int] = 2
    # Set for registered names whose backend is not usable yet; `build_masker` raises MaskerUnavailable(it).
    unavailable_reason: ClassVar[str | None] = None

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-able parameters that change the masks (for cache keys)."""

    def propose(
        self, attribution: torch.Tensor, features: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Object proposals per support image.

        Args:
            attribution: (N, S, S) float32 in [0, 1], the class's attribution maps at the support image size.
            features: (N, h, w, D) float32 DINO key features (MaskCut's input), or None unless `needs_features`.
            images: (N, 3, S, S) float32 RGB in [0, 1], or None unless `needs_images`.

        Returns:
            N bool tensors of shape (R_n, S, S), R_n >= 0. The background proposal is not included:
            `select_masks` adds it.
        """
        raise NotImplementedError(f"masker {self.name!r} makes masks directly")

    def masks(
        self,
        attribution: torch.Tensor,
        features: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        *,
        grid_attribution: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fg, bg): (N, S, S) bool each, disjoint per image; eq. 1 over `propose`'s proposals.

        Args:
            attribution: (N, S, S) float32 in [0, 1], the class's attribution maps at the support image size.
            features, images: as for `propose`.
            grid_attribution: (N, G, G) float32 in [0, 1], the same maps on the latent grid before upsampling, for
                maskers that compute something there (the threshold masker's multi-Otsu); eq. 1 ignores it.
        """
        _check_attribution(attribution)
        proposals = self.propose(attribution, features, images)
        return stack_masks([select_masks(p, a) for p, a in zip(proposals, attribution, strict=True)], attribution)


_REGISTRY: dict[str, type[Masker]] = {}
# Order in which "auto" tries maskers: best first.
_PREFERENCE = ("cutler", "maskcut", "threshold")

M = TypeVar("M", bound=type[Masker])


def register_masker(name: str) -> Callable[[M], M]:
    """Class decorator registering a `Masker` subclass under `name` (lower case, not "auto")."""
    key = name.strip().lower()
    if not key or key == AUTO:
        raise ValueError(f"invalid masker name {name!r}")

    def deco(cls: M) -> M:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"masker {key!r} is already registered")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def _ordered(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(_PREFERENCE)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def registered_maskers() -> list[str]:
    """Every registered masker name, usable or not, best first (accepted `--masker` values besides "auto")."""
    return _ordered(list(_REGISTRY))


def available_maskers() -> list[str]:
    """Names of the maskers that can be built now, best first."""
    return [n for n in registered_maskers() if _REGISTRY[n].unavailable_reason is None]


def _accepted() -> str:
    return ", ".join([AUTO, *registered_maskers()])


def resolve_masker_name(name: str, cutler_weights: bool = True) -> str:
    """Map "auto" to the best available masker: cutler, or maskcut when CutLER's weights are not here
    (``cutler_weights``); return other known names unchanged (lower-cased).

    Raises:
        ValueError: `name` is not "auto" nor a registered masker; the message lists the accepted names.
    """
    key = name.strip().lower()
    if key == AUTO:
        usable = [n for n in available_maskers() if cutler_weights or n != "cutler"]
        if not usable:
            raise MaskerUnavailable("no masker is available in this installation")
        return usable[0]
    if key not in _REGISTRY:
        raise ValueError(f"unknown masker {name!r}; accepted: {_accepted()}")
    return key


def build_masker(name: str, models: Any = None, **params: Any) -> Masker:
    """Instantiate the masker `name` ("auto" allowed) with keyword `params` (e.g. tau, n_masks for maskcut).

    ``models``: the model set's networks, for maskers that run one (cutler); never loaded here.

    Raises:
        MaskerUnavailable: the masker is registered but cannot be used here.
        ValueError: unknown masker name, unknown parameter or invalid parameter value.
    """
    key = resolve_masker_name(name)
    cls = _REGISTRY[key]
    if cls.unavailable_reason is not None:
        raise MaskerUnavailable(cls.unavailable_reason)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "models")]
    if "models" in inspect.signature(cls.__init__).parameters:
        params = {**params, "models": models}
    unknown = sorted(set(params) - {*accepted, "models"})
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for masker {key!r}; accepted: {', '.join(accepted)}"
        )
    return cls(**params)


def _check_attribution(attribution: torch.Tensor) -> None:
    if attribution.ndim != 3:
        raise ValueError(f"attribution must be (N, H, W), got shape {tuple(attribution.shape)}")


def _check_features(features: torch.Tensor | None, attribution: torch.Tensor) -> torch.Tensor:
    if features is None:
        raise ValueError("this masker needs DINO features, got None")
    if features.ndim != 4 or features.shape[0] != attribution.shape[0]:
        raise ValueError(
            f"features must be (N, h, w, D) with N={attribution.shape[0]}, got shape {tuple(features.shape)}"
        )
    return features


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(R, h, w) bool -> (R, H, W) bool by nearest neighbour (pixel-centre aligned)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=masks.device)
    if tuple(masks.shape[-2:]) == size:
        return masks
    out = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0] > 0.5


# ----------------------------------------------------------------------------------------------------------
# maskcut
# ----------------------------------------------------------------------------------------------------------


@register_masker("maskcut")
class MaskCutMasker(Masker):
    """Training-free MaskCut (CutLER), with the reference's rules (REFERENCE 3): `maskcut_batch` on DINO keys of a
    square `maskcut_input` image (`MASKCUT_BATCH` images at a time on an accelerator, one at a time on the CPU),
    proposals resized to the support image by nearest neighbour.

    Cost: one (h*w)^2 eigenproblem per image and round, solved for the whole batch at once (60x60 patches: about
    a second per image and round on a CPU; on a GPU the batch's iterations are a few matrix products each).
    """

    needs_features = True
    # 3: the batched block LOBPCG (issue 15). Same masks wherever the second eigenvector is defined; on a graph
    # whose second eigenvalue is repeated (random-weight DINO keys make every patch an edge of every other) any
    # vector of its eigenspace is an answer, and the new solver picks another one than the old.
    version = 3

    def __init__(
        self,
        tau: float = MASKCUT_TAU,
        n_masks: int = MASKCUT_N_MASKS,
        eps: float = 1e-5,
        max_iou: float = MASKCUT_MAX_IOU,
        min_area: float = MASKCUT_MIN_AREA,
    ) -> None:
        if not -1.0 <= float(tau) < 1.0:
            raise ValueError(f"maskcut tau must be in [-1, 1), got {tau}")
        if int(n_masks) != n_masks or n_masks < 1:
            raise ValueError(f"maskcut n_masks must be a positive integer, got {n_masks}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"maskcut eps must be in (0, 1), got {eps}")
        self.tau = float(tau)
        self.n_masks = int(n_masks)
        self.eps = float(eps)
        self.max_iou = float(max_iou)
        self.min_area = float(min_area)

    def params(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "n_masks": self.n_masks,
            "eps": self.eps,
            "max_iou": self.max_iou,
            "min_area": self.min_area,
            "corners": MASKCUT_CORNERS,
        }

    def propose(
        self, attribution: torch.Tensor, features: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        _check_attribution(attribution)
        feats = _check_features(features, attribution)
        size = (int(attribution.shape[1]), int(attribution.shape[2]))
        out = []
        # A batch iterates until its slowest image converges: worth it where launches and reads dominate (a
        # GPU), not on a CPU, where every image's arithmetic is paid in full.
        chunk = 1 if feats.device.type == "cpu" else MASKCUT_BATCH
        for start in range(0, feats.shape[0], chunk):
            props = maskcut_batch(
                feats[start : start + chunk],
                self.tau,
                self.n_masks,
                self.eps,
                max_iou=self.max_iou,
                min_area=self.min_area,
            )
            out.extend(_resize_masks(p, size).to(attribution.device) for p in props)
        return out


# Up to this many patches a full eigendecomposition is cheap; above it LOBPCG is ~60x faster (64x64 patches).
EIGH_MAX_NODES = 256
# LOBPCG: stop an image's iteration once its residual |S x - lambda x| (x unit, |S| <= 2) is below this; the
# eigenvector is then accurate to about this over the spectral gap, far below the spread of x around its mean.
LOBPCG_TOL = 1e-10
LOBPCG_MAX_ITERS = 1000
LOBPCG_BLOCK = 4
# Images solved together on an accelerator: their (h*w)^2 float64 cosines and affinities (100 MB each at 60x60
# patches) are in memory at once.
MASKCUT_BATCH = 8


def _second_eigvecs(affinity: torch.Tensor, eigh_max_nodes: int | None = None) -> torch.Tensor:
    """Second-smallest generalised eigenvectors x of (D - A) x = lambda D x for a batch of graphs, each sign fixed
    (its max |x| entry > 0).

    Solved through M = D^-1/2 A D^-1/2 (L_sym = I - M has the same eigenvectors) and x = D^-1/2 y. Small graphs
    use a dense batched eigendecomposition. Large ones need only one eigenvector, so: M's top eigenvector is known
    in closed form (D^1/2 1, eigenvalue 1), deflate it, shift by I so every eigenvalue is >= 0, and take the
    largest eigenpair of S = M - v1 v1^T + I by a batched LOBPCG (:func:`_top_eigvecs`; a few matrix products per
    iteration instead of an O(n^3) solve). Every graph's result is its own: solved alone it is the same to rounding
    (1e-16).

    Args:
        affinity: (B, n, n) float64, symmetric, positive entries.

    Returns:
        (B, n) float64.
    """
    b, n, _ = affinity.shape
    eigh_max_nodes = EIGH_MAX_NODES if eigh_max_nodes is None else eigh_max_nodes
    degree = affinity.sum(dim=2)
    d_isqrt = degree.rsqrt()
    if n <= eigh_max_nodes:
        m = d_isqrt[:, :, None] * affinity * d_isqrt[:, None, :]
        m = 0.5 * (m + m.mT)  # exact symmetry; the solver assumes it
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        y = torch.linalg.eigh(eye - m)[1][:, :, 1]
    else:
        v1 = F.normalize(degree.sqrt(), dim=1)

        def shifted(v: torch.Tensor) -> torch.Tensor:  # S v for v (B, n, k), without forming S
            mv = d_isqrt[:, :, None] * torch.bmm(affinity, d_isqrt[:, :, None] * v)
            return mv - v1[:, :, None] * (v1[:, None, :] @ v) + v

        y = _top_eigvecs(shifted, b, n, affinity.dtype, affinity.device)
    x = y * d_isqrt
    # Eigenvectors are defined up to sign; pin it so equal inputs give equal outputs on every run.
    flip = x.gather(1, x.abs().argmax(dim=1, keepdim=True)) < 0
    return torch.where(flip, -x, x)


def _top_eigvecs(
    op: Callable[[torch.Tensor], torch.Tensor], b: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Unit eigenvectors (B, n) of the largest eigenvalue of B symmetric positive semi-definite operators ``op``
    ((B, n, k) -> (B, n, k)), by block LOBPCG: each iteration is a Rayleigh-Ritz step on the orthonormalised span
    of the `LOBPCG_BLOCK` current Ritz vectors X, their residuals S X - X diag(lambda) and the previous search
    directions; the block's extra vectors make the top one converge at the rate of the gap to the block's
    last eigenvalue rather than to the second.

    Every graph starts from the same fixed random block, and a graph whose top residual falls below
    `LOBPCG_TOL` is frozen from that iteration on, so its result does not depend on the other graphs of the
    batch or on how many there are (to rounding: batched products may sum in another order). The loop stops
    when all are frozen (checked every few iterations: each check waits for the device) or after
    `LOBPCG_MAX_ITERS`.
    """
    k = min(LOBPCG_BLOCK, max(1, (n - 1) // 3))
    start = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    x = _complement_basis(torch.zeros(b, n, 0, dtype=dtype, device=device), start.expand(b, n, k))
    sx = op(x)
    p: torch.Tensor | None = None
    done = torch.zeros(b, 1, 1, dtype=torch.bool, device=device)
    for it in range(LOBPCG_MAX_ITERS):
        r = sx - x * (x * sx).sum(dim=1, keepdim=True)
        done = done | (r[:, :, :1].norm(dim=1, keepdim=True) < LOBPCG_TOL)
        if it % 8 == 0 and bool(done.all()):
            break
        basis = torch.cat([x, _complement_basis(x, r if p is None else torch.cat([r, p], dim=2))], dim=2)
        sbasis = op(basis)
        ritz = basis.mT @ sbasis
        coef = torch.linalg.eigh(0.5 * (ritz + ritz.mT))[1].flip(-1)[:, :, :k]  # the k largest Ritz pairs
        new_x = basis @ coef
        new_p = basis[:, :, k:] @ coef[:, k:]  # the step taken away from the block's own span
        x = torch.where(done, x, new_x)
        sx = torch.where(done, sx, sbasis @ coef)
        p = new_p if p is None else torch.where(done, p, new_p)
    return x[:, :, 0]


def _complement_basis(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (B, n, m) of the part of span(w) orthogonal to the orthonormal columns of x (B, n, k).

    Projection against x, then SVQB (Stathopoulos and Wu): scale w's columns to unit length, diagonalise their
    Gram matrix G = U L U^T, and take w U L^-1/2, dropping directions with L below 1e-12 of the largest (columns
    that repeat one another) as zero columns, which add nothing to a Rayleigh-Ritz step. Done
    twice, as rounding leaves the first pass slightly off. A fixed number of batched products and one small
    eigendecomposition per pass: no loops over columns, no per-matrix factorisation calls on the device.
    """
    for _ in range(2):
        w = w - x @ (x.mT @ w)
        d = w.norm(dim=1, keepdim=True).clamp_min(1e-300).reciprocal()  # (B, 1, m)
        w = w * d
        lam, u = torch.linalg.eigh(w.mT @ w)
        keep = lam > 1e-12 * lam[:, -1:].clamp_min(1e-300)
        w = w @ (u * torch.where(keep, lam.clamp_min(1e-300).rsqrt(), 0.0)[:, None, :])
    return w


def _seed_components(fg: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of ``fg`` holding each image's seed.

    Args:
        fg: (B, h, w) bool.
        seeds: (B,) int64 flat indices into h*w.

    Returns:
        (B, h * w) bool on fg's device. A seed outside fg yields the background (as the reference's label
        lookup does: label 0 is everything outside fg).
    """
    # One labelling of the whole stack, connected within each image only (the structure is flat along B).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    labels = torch.from_numpy(ndi.label(fg.cpu().numpy(), structure=structure)[0]).flatten(1)
    seed_labels = labels.gather(1, seeds.cpu()[:, None])
    return (labels == seed_labels).to(fg.device)


def maskcut_image(features: torch.Tensor, **options: Any) -> torch.Tensor:
    """MaskCut proposals for one image: :func:`maskcut_batch` (same ``options``) of a batch of one.
    (h, w, D) -> (n_masks, h, w)."""
    return maskcut_batch(features[None], **options)[0]


def maskcut_batch(
    features: torch.Tensor,
    tau: float = MASKCUT_TAU,
    n_masks: int = MASKCUT_N_MASKS,
    eps: float = 1e-5,
    *,
    max_iou: float = MASKCUT_MAX_IOU,
    min_area: float = MASKCUT_MIN_AREA,
) -> torch.Tensor:
    """MaskCut proposals for a batch of images on their feature grids, round by round as CutLER's
    ``maskcut_forward``, all images of a round solved together on the features' device.

    Each round: A = F F^T binarised at `tau` (non-edges weigh `eps`), in float64 as the reference's solver;
    x = the second-smallest generalised eigenvector of (D - A) x = lambda D x (sign pinned: its largest-magnitude
    entry positive); the bipartition is x above the mean of the *whole* x. It is reversed when it holds at least
    `MASKCUT_CORNERS` of the 4 corners, or else when the seed argmax |x| lies outside it; the seed is then argmax
    x (not reversed) or argmin x (reversed). The round's mask is the seed's 4-connected component. From the second
    round on, a mask with IoU > `max_iou` to the previous round's mask, or covering at most `min_area` of the
    grid, is rejected (an empty mask; the next round then compares with that empty mask). Before every later
    round the features of the patches of the previous rounds' masks are zeroed (so their affinities fall to
    `eps`). A round's proposal is its mask minus everything earlier rounds proposed.

    An image's proposals do not depend on the other images of the batch: its eigenvectors are those of a solve
    of its own to rounding (1e-16), far below anything the split at the mean could notice.

    Args:
        features: (B, h, w, D) float DINO patch features (L2-normalised here).
        tau: affinity threshold on the cosine similarity.
        n_masks: number of rounds.
        eps: weight of non-edges.

    Returns:
        (B, n_masks, h, w) bool on the features' device, pairwise disjoint per image; a rejected round's
        proposal is empty.
    """
    b, h, w, _ = features.shape
    n = h * w
    dev = features.device
    feats = F.normalize(features.reshape(b, n, -1).to(torch.float64), dim=2)
    # Cosines once: zeroing a patch's features (below) zeroes exactly its row and column, the rest is unchanged.
    cosine = feats @ feats.mT
    del feats
    corners = torch.zeros(n, dtype=torch.bool, device=dev)
    corners[[0, w - 1, (h - 1) * w, n - 1]] = True

    painted = torch.zeros(b, n, dtype=torch.bool, device=dev)
    current = torch.zeros(b, n, dtype=torch.bool, device=dev)
    proposed = torch.zeros(b, n, dtype=torch.bool, device=dev)
    proposals: list[torch.Tensor] = []
    for round_ in range(n_masks):
        painted |= current
        kept = ~painted
        cosine.masked_fill_(~(kept[:, :, None] & kept[:, None, :]), 0.0)  # in place: what is painted stays painted
        # float64 throughout, eps included (1e-5 exactly, as CutLER's numpy affinity).
        affinity = torch.full_like(cosine, eps).masked_fill_(cosine > tau, 1.0)
        x = _second_eigvecs(affinity)
        del affinity

        above = x > x.mean(dim=1, keepdim=True)
        seed_side = above.gather(1, x.abs().argmax(dim=1, keepdim=True))[:, 0]
        reverse = ((above & corners).sum(dim=1) >= MASKCUT_CORNERS) | ~seed_side
        fg = torch.where(reverse[:, None], ~above, above)
        seeds = torch.where(reverse, x.argmin(dim=1), x.argmax(dim=1))
        mask = _seed_components(fg.view(b, h, w), seeds)
        if round_ >= 1:
            inter, union = (current & mask).sum(dim=1), (current | mask).sum(dim=1)
            # Both empty: IoU is undefined (NaN in the reference) and never rejects.
            overlap = (union > 0) & (inter.to(torch.float64) / union.clamp_min(1) > max_iou)
            small = mask.to(torch.float64).mean(dim=1) <= min_area
            mask = mask & ~(overlap | small)[:, None]
        current = mask
        proposals.append((mask & ~proposed).view(b, h, w))
        proposed |= mask
    return torch.stack(proposals, dim=1)


# ----------------------------------------------------------------------------------------------------------
# threshold ("-CutLER")
# ----------------------------------------------------------------------------------------------------------


@register_masker("threshold")
class ThresholdMasker(Masker):
    """Attribution thresholds only: the paper's "-CutLER" variant (REFERENCE 3).

    One 3-class multi-Otsu split over all N maps of the class together (so an image's masks depend on the other
    images of its class), computed on the latent-grid maps and applied to the image-size maps (`masks`'
    ``grid_attribution``); fg = attribution > t_high, bg = attribution < t_low, with no further cut and no
    erosion. When multi-Otsu cannot split the maps (fewer than 3 distinct values, or non-increasing thresholds)
    the fallback thresholds are used: bg < `fallback_bg`, fg > `fallback_fg`. An image with an empty fg gets
    no bg either (the reference skips it).
    """

    proposal_based = False

    def __init__(self, fallback_bg: float = THRESHOLD_FALLBACK_BG, fallback_fg: float = THRESHOLD_FALLBACK_FG) -> None:
        if not fallback_bg <= fallback_fg:
            raise ValueError(f"threshold fallback_bg ({fallback_bg}) must not exceed fallback_fg ({fallback_fg})")
        self.fallback_bg = float(fallback_bg)
        self.fallback_fg = float(fallback_fg)

    def params(self) -> dict[str, Any]:
        return {"fallback_bg": self.fallback_bg, "fallback_fg": self.fallback_fg}

    def thresholds(self, maps: torch.Tensor) -> tuple[float, float]:
        """(t_low, t_high) of one class's (N, G, G) maps: multi-Otsu over all their values, or the fallback pair.

        The reference computes them on the latent-grid maps (64x64 for SD 1.5), before upsampling (REFERENCE 3).
        Multi-Otsu thresholds are skimage's: the centres of the last histogram bin (256 bins over the value range)
        of the lower classes, used as bg = A < t_low, fg = A > t_high.
        """
        values = maps.detach().to(torch.float64).cpu().numpy().ravel()
        try:
            t_low, t_high = (float(t) for t in threshold_multiotsu(values, classes=3))
        except ValueError:
            return self.fallback_bg, self.fallback_fg
        if not (np.isfinite(t_low) and np.isfinite(t_high) and t_low < t_high):
            return self.fallback_bg, self.fallback_fg
        return t_low, t_high

    def masks(
        self,
        attribution: torch.Tensor,
        features: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        *,
        grid_attribution: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fg, bg): (N, S, S) bool each: the thresholds of `grid_attribution` applied to `attribution`.

        Args:
            attribution: (N, S, S) float32 in [0, 1], the maps at the support image size; the masks are cut here.
            features, images: unused.
            grid_attribution: (N, G, G) float32 in [0, 1], the same maps on the latent grid before upsampling; the
                thresholds are computed on them, as the reference does. None: computed on `attribution` itself
                (only right when no grid maps exist, e.g. maps that were never upsampled).
        """
        _check_attribution(attribution)
        if grid_attribution is None:
            grid_attribution = attribution
        _check_attribution(grid_attribution)
        if grid_attribution.shape[0] != attribution.shape[0]:
            raise ValueError(
                f"grid_attribution has {grid_attribution.shape[0]} maps, attribution {attribution.shape[0]}"
            )
        t_low, t_high = self.thresholds(grid_attribution)
        fg = attribution > t_high
        present = fg.flatten(1).any(1)[:, None, None]
        return fg, (attribution < t_low) & present


# ----------------------------------------------------------------------------------------------------------
# cutler
# ----------------------------------------------------------------------------------------------------------


@register_masker("cutler")
class CutlerMasker(Masker):
    """The CutLER detector's instances (REFERENCE 3): every detection scoring above `score_threshold` (at most
    100 per image, the detector's own cap), its mask pasted at the support image's size. The detector runs on the
    models' device, `batch_size` support images at a time; it is loaded on first use, so building the masker (for
    cache keys) loads nothing.
    """

    needs_images = True

    def __init__(self, models: Any = None, score_threshold: float = CUTLER_SCORE, batch_size: int = 8) -> None:
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"cutler score_threshold must be in [0, 1], got {score_threshold}")
        self.models = models
        self.score_threshold = float(score_threshold)
        self.batch_size = int(batch_size)

    def params(self) -> dict[str, Any]:
        from ovdiff_cli.cutler.configs import FULL

        return {
            "score_threshold": self.score_threshold,
            "max_detections": FULL.max_detections,
            "test_size": [FULL.min_size_test, FULL.max_size_test],
            "mask_threshold": FULL.mask_threshold,
        }

    def propose(
        self, attribution: torch.Tensor, features: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        _check_attribution(attribution)
        if images is None or images.shape[0] != attribution.shape[0]:
            raise ValueError("masker 'cutler' needs the N support images")
        if self.models is None:
            raise ValueError("masker 'cutler' was built without models to run the detector on")
        detector = self.models.get("cutler")
        param = next(detector.parameters())
        out: list[torch.Tensor] = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(param.device, param.dtype)
            for det in detector.detect(list(chunk), score_threshold=self.score_threshold):
                out.append(det.masks.to(attribution.device))
        return out


# ----------------------------------------------------------------------------------------------------------
# selection (eq. 1)
# ----------------------------------------------------------------------------------------------------------


def _erode_cross(mask: np.ndarray, times: int) -> np.ndarray:
    """``times`` erosions with a 3x3 cross; pixels outside the image count as set, so the border does not erode
    (as OpenCV's and a min-pool's default border). Each erosion keeps a pixel when it and its four neighbours are
    set: the same pixels as scipy's ``binary_erosion`` with that structure and ``border_value=1``, four times
    faster at 512x512."""
    out = mask.copy()
    for _ in range(times):
        prev = out.copy()
        out[1:] &= prev[:-1]
        out[:-1] &= prev[1:]
        out[:, 1:] &= prev[:, :-1]
        out[:, :-1] &= prev[:, 1:]
    return out


def select_masks(
    proposals: torch.Tensor,
    attribution: torch.Tensor,
    bg_max: float = BG_ATTRIBUTION_MAX,
    erode: int = BG_ERODE,
    fg_fallback: float = FG_FALLBACK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 as the authors' code applies it (REFERENCE 3): fg and bg masks of one support image.

    Candidates are the background proposal (pixels outside every proposal) as index 0, then the proposals in
    order; empty candidates are left out. Each is scored by its mean attribution M^T A / M^T M and ranked by score,
    highest first (ties: the lower candidate index ranks higher). The pixels are then partitioned: each goes to the
    highest-ranked candidate covering it. fg = the pixels won by the top candidate (all of it). bg = the pixels won
    by the lowest-scoring candidate that wins any pixel (ties: the lowest candidate index, so the background
    proposal first): a low proposal lying wholly inside higher-ranked ones is passed over, and the pixels a low
    proposal shares with a higher-ranked one are not bg. bg is then refined: only pixels with attribution <
    `bg_max`, eroded `erode` times with a 3x3 cross (the image border counts as set). When the top candidate wins
    every pixel, bg is empty.

    With fewer than two non-empty candidates eq. 1 cannot tell fg from bg: then fg = attribution > `fg_fallback`
    and bg = attribution < `bg_max`, with no erosion. Shared pixels stay fg. An image whose fg is empty gets an
    empty bg too: the reference skips such a support image entirely.

    Args:
        proposals: (R, S, S) bool, R >= 0, object proposals (without the background proposal), may overlap.
        attribution: (S, S) float in [0, 1], at the same resolution.

    Returns:
        (fg, bg): two disjoint (S, S) bool tensors on the attribution's device; both empty for a skipped image.
    """
    if attribution.ndim != 2:
        raise ValueError(f"attribution must be (H, W), got shape {tuple(attribution.shape)}")
    if proposals.ndim != 3 or tuple(proposals.shape[1:]) != tuple(attribution.shape):
        raise ValueError(
            f"proposals must be (R, {attribution.shape[0]}, {attribution.shape[1]}), got shape {tuple(proposals.shape)}"
        )
    if erode < 0:
        raise ValueError(f"erode must be >= 0, got {erode}")

    attr = attribution.detach().to(torch.float64).cpu().numpy()
    props = proposals.detach().to(torch.bool).cpu().numpy()
    candidates = [m for m in [~props.any(axis=0), *props] if m.any()]
    if len(candidates) < 2:
        fg, bg = attr > fg_fallback, attr < bg_max
    else:
        # np.compress gathers the same values in the same order as attr[m] (so the same mean, to the last bit),
        # three times faster.
        flat = attr.ravel()
        scores = np.array([np.compress(m.ravel(), flat).mean() for m in candidates])
        # Best first; lexsort's last key is the primary one, and the index breaks ties (lower index first).
        ranked = np.lexsort((np.arange(len(candidates)), -scores))
        # Paint from the lowest-ranked candidate up, so each pixel ends with the highest-ranked one covering it;
        # every pixel is painted (the background proposal covers the rest). Over ten times faster than an argmax
        # over the (K, S*S) stack, whose reduction axis is strided.
        winner = np.empty(attr.shape, dtype=np.intp)
        for i in ranked[::-1]:
            winner[candidates[i]] = i
        won = np.bincount(winner.ravel(), minlength=len(candidates)) > 0
        # np.argmin returns the first minimum: ties go to the lowest candidate index.
        lowest = int(np.argmin(np.where(won, scores, np.inf)))
        fg = candidates[int(ranked[0])]
        bg = _erode_cross((winner == lowest) & (attr < bg_max), erode)
    bg = bg & ~fg
    if not fg.any():
        bg = np.zeros_like(bg)
    dev = attribution.device
    return torch.from_numpy(np.ascontiguousarray(fg)).to(dev), torch.from_numpy(np.ascontiguousarray(bg)).to(dev)


def stack_masks(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], attribution: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (fg, bg) pairs -> (N, S, S) fg and bg stacks (empty stacks for N = 0)."""
    if not pairs:
        empty = torch.zeros((0, *attribution.shape[1:]), dtype=torch.bool, device=attribution.device)
        return empty, empty.clone()
    fg, bg = zip(*pairs, strict=True)
    return torch.stack(fg), torch.stack(bg)
