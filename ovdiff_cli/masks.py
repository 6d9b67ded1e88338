"""Foreground/background masks of support images (paper section 3.3, eq. 1).

An unsupervised segmenter (a *masker*) proposes binary object masks per support image; `select_masks` adds
the background proposal (complement of all proposals) and picks fg = the candidate with the highest mean
attribution, bg = the one with the lowest, then refines bg (attribution below `BG_ATTRIBUTION_MAX`, eroded by
`BG_ERODE_PX`).

Maskers are looked up by name in a small registry (`register_masker`, `build_masker`, `available_maskers`,
`resolve_masker_name`). Registered:

* ``maskcut``: training-free normalised cut on DINO key features, as in CutLER's MaskCut.
* ``threshold``: a 3-class multi-Otsu split of the class's attribution maps (the paper's "-CutLER" variant).
* ``cutler``: the CutLER detector; registered so the name is accepted, but unavailable until its checkpoint
  support is ported (`build_masker("cutler")` raises `MaskerUnavailable`).

All masks live on the grid (H, W) of the attribution maps; `maskcut` resizes its proposals from the feature
grid (h, w) by nearest neighbour when the two differ.
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
    BG_ERODE_PX,
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
    "maskcut_image",
    "register_masker",
    "registered_maskers",
    "resolve_masker_name",
    "select_masks",
    "support_masks",
]

AUTO = "auto"


class MaskerUnavailable(ValueError):
    """A registered masker that cannot be built in this installation (e.g. missing checkpoint support)."""


class Masker(ABC):
    """Proposes binary object masks for the N support images of one class.

    Subclasses set `name` (registry name), `needs_features` (True if `propose` needs DINO key features) and
    `version` (bump when the output changes for the same parameters, so cache keys change too).
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    version: ClassVar[int] = 1
    # Set for registered names whose backend is not usable yet; `build_masker` raises MaskerUnavailable(it).
    unavailable_reason: ClassVar[str | None] = None

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-able parameters that change the output of `propose` (for cache keys)."""

    @abstractmethod
    def propose(self, attribution: torch.Tensor, features: torch.Tensor | None) -> list[torch.Tensor]:
        """Object proposals per support image.

        Args:
            attribution: (N, H, W) float32 in [0, 1], per-image min-max normalised attribution maps of one
                class's N support images.
            features: (N, h, w, D) float32 L2-normalised DINO key features, or None (allowed only when
                `needs_features` is False).

        Returns:
            N bool tensors of shape (R_n, H, W), R_n >= 0, on the attribution grid. The background proposal is
            not included: `select_masks` adds it.
        """


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


def resolve_masker_name(name: str) -> str:
    """Map "auto" to the best available masker; return other known names unchanged (lower-cased).

    Raises:
        ValueError: `name` is not "auto" nor a registered masker; the message lists the accepted names.
    """
    key = name.strip().lower()
    if key == AUTO:
        usable = available_maskers()
        if not usable:
            raise MaskerUnavailable("no masker is available in this installation")
        return usable[0]
    if key not in _REGISTRY:
        raise ValueError(f"unknown masker {name!r}; accepted: {_accepted()}")
    return key


def build_masker(name: str, **params: Any) -> Masker:
    """Instantiate the masker `name` ("auto" allowed) with keyword `params` (e.g. tau, n_masks for maskcut).

    Raises:
        MaskerUnavailable: the masker is registered but cannot be used here (cutler).
        ValueError: unknown masker name, unknown parameter or invalid parameter value.
    """
    key = resolve_masker_name(name)
    cls = _REGISTRY[key]
    if cls.unavailable_reason is not None:
        raise MaskerUnavailable(cls.unavailable_reason)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
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
    """Training-free MaskCut (CutLER): repeated normalised cuts on the DINO patch affinity graph.

    Per image and per round: A = F F^T binarised at `tau` (non-edges get weight `eps` so the graph stays
    connected), second-smallest generalised eigenvector x of (D - A) x = lambda D x, bipartition at the mean
    of x over the uncovered patches; the side holding the seed (max |x|) is foreground unless it holds >= 2
    image corners (object-centric prior: then the other side is), and the proposal is the 4-connected
    component of the foreground containing the seed. Patches already covered by a proposal are cut off (all
    their affinities set to `eps`, as MaskCut does by zeroing their features) for later rounds, so proposals
    are pairwise disjoint. Rounds stop early when every patch is covered, or when the uncovered patches are
    all mutually similar (a complete graph has no meaningful cut: splitting it would only follow the noise).

    Cost: one dense (h*w)^2 eigendecomposition per round, in float64 on the features' device (about 7 s per
    round for a 64x64 grid on CPU, milliseconds on a GPU).
    """

    needs_features = True

    def __init__(self, tau: float = MASKCUT_TAU, n_masks: int = MASKCUT_N_MASKS, eps: float = 1e-5) -> None:
        if not -1.0 <= float(tau) < 1.0:
            raise ValueError(f"maskcut tau must be in [-1, 1), got {tau}")
        if int(n_masks) != n_masks or n_masks < 1:
            raise ValueError(f"maskcut n_masks must be a positive integer, got {n_masks}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"maskcut eps must be in (0, 1), got {eps}")
        self.tau = float(tau)
        self.n_masks = int(n_masks)
        self.eps = float(eps)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "n_masks": self.n_masks, "eps": self.eps}

    def propose(self, attribution: torch.Tensor, features: torch.Tensor | None) -> list[torch.Tensor]:
        _check_attribution(attribution)
        feats = _check_features(features, attribution)
        size = (int(attribution.shape[1]), int(attribution.shape[2]))
        out = []
        for n in range(feats.shape[0]):
            props = maskcut_image(feats[n], tau=self.tau, n_masks=self.n_masks, eps=self.eps)
            out.append(_resize_masks(props, size).to(attribution.device))
        return out


# Up to this many patches a full eigendecomposition is cheap; above it LOBPCG is ~60x faster (64x64 patches).
EIGH_MAX_NODES = 256


def _second_eigvec(affinity: torch.Tensor, eigh_max_nodes: int | None = None) -> torch.Tensor:
    """Second-smallest generalised eigenvector x of (D - A) x = lambda D x, sign fixed (max |x| entry > 0).

    Solved through M = D^-1/2 A D^-1/2 (L_sym = I - M has the same eigenvectors) and x = D^-1/2 y. Small graphs
    use a dense eigendecomposition. Large ones need only one eigenvector, so: M's top eigenvector is known in
    closed form (D^1/2 1, eigenvalue 1), deflate it, shift by I so every eigenvalue is >= 0, and take the
    largest eigenpair with LOBPCG from a fixed start vector (a few dense products instead of an O(n^3) solve).
    """
    n = affinity.shape[0]
    eigh_max_nodes = EIGH_MAX_NODES if eigh_max_nodes is None else eigh_max_nodes
    d_isqrt = affinity.sum(dim=1).rsqrt()
    m = d_isqrt[:, None] * affinity * d_isqrt[None, :]
    m = 0.5 * (m + m.T)  # exact symmetry; the solvers assume it
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    if n <= eigh_max_nodes:
        y = torch.linalg.eigh(eye - m)[1][:, 1]
    else:
        v1 = F.normalize(affinity.sum(dim=1).sqrt(), dim=0)
        shifted = m - v1[:, None] * v1[None, :] + eye
        start = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=m.dtype).to(m.device)
        y = torch.lobpcg(shifted, k=1, X=start, largest=True, niter=1000, tol=1e-9)[1][:, 0]
    x = y * d_isqrt
    # Eigenvectors are defined up to sign; pin it so equal inputs give equal outputs on every run.
    if x[int(torch.argmax(x.abs()))] < 0:
        x = -x
    return x


def maskcut_image(
    features: torch.Tensor, tau: float = MASKCUT_TAU, n_masks: int = MASKCUT_N_MASKS, eps: float = 1e-5
) -> torch.Tensor:
    """MaskCut proposals for one image on its feature grid.

    Args:
        features: (h, w, D) float, L2-normalised patch features (re-normalised here defensively).
        tau: affinity threshold; cosine similarities above it become edges of weight 1, others weight `eps`.
        n_masks: maximum number of proposals; fewer when every patch is covered earlier.
        eps: weight of non-edges and of every edge touching an already covered patch.

    Returns:
        (R, h, w) bool, 0 <= R <= n_masks, pairwise disjoint proposals in discovery order.
    """
    h, w, _ = features.shape
    feats = F.normalize(features.reshape(h * w, -1).to(torch.float64), dim=1)
    binary = torch.where(feats @ feats.T > tau, 1.0, eps).to(torch.float64)
    corners = torch.zeros(h * w, dtype=torch.bool, device=feats.device)
    corners[[0, w - 1, (h - 1) * w, h * w - 1]] = True

    covered = torch.zeros(h * w, dtype=torch.bool, device=feats.device)
    proposals: list[torch.Tensor] = []
    for _ in range(n_masks):
        active = ~covered
        if not bool(active.any()) or bool((binary[active][:, active] > 0.5).all()):
            break
        # Equivalent to MaskCut zeroing the features of covered patches: their cosine is 0 <= tau -> eps.
        affinity = binary.clone()
        affinity[covered, :] = eps
        affinity[:, covered] = eps
        x = _second_eigvec(affinity)

        above = x > x[active].mean()
        score = torch.where(active, x.abs(), torch.full_like(x, -1.0))
        seed = int(torch.argmax(score))
        fg = (above if bool(above[seed]) else ~above) & active
        if int((fg & corners).sum()) >= 2:
            flipped = ~fg & active
            if bool(flipped.any()):
                fg = flipped
                seed = int(torch.argmax(torch.where(fg, x.abs(), torch.full_like(x, -1.0))))

        labels, _ = ndi.label(fg.reshape(h, w).cpu().numpy())  # default structure = 4-connectivity
        comp = labels == labels.reshape(-1)[seed]
        mask = torch.from_numpy(comp.reshape(-1)).to(feats.device)
        proposals.append(mask.reshape(h, w))
        covered |= mask
    if not proposals:
        return torch.zeros((0, h, w), dtype=torch.bool, device=features.device)
    return torch.stack(proposals).to(features.device)


# ----------------------------------------------------------------------------------------------------------
# threshold ("-CutLER")
# ----------------------------------------------------------------------------------------------------------


@register_masker("threshold")
class ThresholdMasker(Masker):
    """Attribution thresholds only: the paper's "-CutLER" variant.

    One 3-class multi-Otsu split over all N maps of the class together (so an image's proposals depend on the
    other images of its class); fg = attribution > t_high, bg region = attribution < t_low. When multi-Otsu
    cannot split the maps (fewer than 3 distinct values, or non-increasing thresholds) the fixed fallback
    thresholds are used instead: bg region < `fallback_bg`, fg > `fallback_fg`.
    """

    needs_features = False

    def __init__(self, fallback_bg: float = THRESHOLD_FALLBACK_BG, fallback_fg: float = THRESHOLD_FALLBACK_FG) -> None:
        if not fallback_bg <= fallback_fg:
            raise ValueError(f"threshold fallback_bg ({fallback_bg}) must not exceed fallback_fg ({fallback_fg})")
        self.fallback_bg = float(fallback_bg)
        self.fallback_fg = float(fallback_fg)

    def params(self) -> dict[str, Any]:
        return {"fallback_bg": self.fallback_bg, "fallback_fg": self.fallback_fg}

    def thresholds(self, attribution: torch.Tensor) -> tuple[float, float]:
        """(t_low, t_high) for the (N, H, W) maps of one class: multi-Otsu, or the fallback pair.

        Multi-Otsu thresholds are skimage's: the centres of the last histogram bin (256 bins over the value
        range) of the lower classes, used as bg = A < t_low, fg = A > t_high.
        """
        values = attribution.detach().to(torch.float64).cpu().numpy().ravel()
        try:
            t_low, t_high = (float(t) for t in threshold_multiotsu(values, classes=3))
        except ValueError:
            return self.fallback_bg, self.fallback_fg
        if not (np.isfinite(t_low) and np.isfinite(t_high) and t_low < t_high):
            return self.fallback_bg, self.fallback_fg
        return t_low, t_high

    def propose(self, attribution: torch.Tensor, features: torch.Tensor | None) -> list[torch.Tensor]:
        _check_attribution(attribution)
        t_low, t_high = self.thresholds(attribution)
        out = []
        for a in attribution:
            props = [m for m in (a > t_high, a < t_low) if bool(m.any())]
            h, w = a.shape
            out.append(torch.stack(props) if props else torch.zeros((0, h, w), dtype=torch.bool, device=a.device))
        return out


# ----------------------------------------------------------------------------------------------------------
# cutler (placeholder)
# ----------------------------------------------------------------------------------------------------------


@register_masker("cutler")
class CutlerMasker(Masker):
    """The CutLER detector. Not available yet: its checkpoint loading has not been ported."""

    needs_features = False
    unavailable_reason = (
        "masker 'cutler' needs the CutLER checkpoint, which is not supported yet; "
        "use --masker maskcut or --masker threshold"
    )

    def __init__(self, **params: Any) -> None:
        raise MaskerUnavailable(self.unavailable_reason)

    def params(self) -> dict[str, Any]:  # pragma: no cover - never instantiated
        return {}

    def propose(
        self, attribution: torch.Tensor, features: torch.Tensor | None
    ) -> list[torch.Tensor]:  # pragma: no cover
        raise MaskerUnavailable("masker 'cutler' is not available")


# ----------------------------------------------------------------------------------------------------------
# selection (eq. 1)
# ----------------------------------------------------------------------------------------------------------


def select_masks(
    proposals: torch.Tensor,
    attribution: torch.Tensor,
    bg_max: float = BG_ATTRIBUTION_MAX,
    erode_px: int = BG_ERODE_PX,
    fg_fallback: float = THRESHOLD_FALLBACK_FG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: pick the foreground and background masks of one support image among its proposals.

    Candidates are the non-empty proposals, in order, followed by the background proposal (pixels outside
    every proposal) when it is non-empty. Each is scored by its mean attribution M^T A / M^T M; fg = the
    highest, bg = the lowest (ties: the lowest candidate index). bg is then refined: only pixels with
    attribution < `bg_max`, eroded `erode_px` times with a 3x3 square (pixels outside the image count as bg,
    so the image border does not erode it).

    With fewer than two candidates (no proposals, so the background proposal is the whole image, or a single
    proposal covering it) eq. 1 cannot tell fg from bg; then fg = pixels with attribution >= `fg_fallback` and
    bg is the refined whole image. fg never overlaps bg: shared pixels stay fg.

    Args:
        proposals: (R, H, W) bool, R >= 0, object proposals (without the background proposal).
        attribution: (H, W) float in [0, 1].
        bg_max: bg keeps only pixels with attribution strictly below this.
        erode_px: number of one-pixel erosions of bg (0: none).
        fg_fallback: fg threshold when there are fewer than two candidates.

    Returns:
        (fg, bg): two disjoint (H, W) bool tensors on the attribution's device; either may be empty.
    """
    if attribution.ndim != 2:
        raise ValueError(f"attribution must be (H, W), got shape {tuple(attribution.shape)}")
    if proposals.ndim != 3 or tuple(proposals.shape[1:]) != tuple(attribution.shape):
        raise ValueError(
            f"proposals must be (R, {attribution.shape[0]}, {attribution.shape[1]}), got shape {tuple(proposals.shape)}"
        )
    if erode_px < 0:
        raise ValueError(f"erode_px must be >= 0, got {erode_px}")

    attr = attribution.detach().to(torch.float64).cpu().numpy()
    props = proposals.detach().to(torch.bool).cpu().numpy()
    candidates = [m for m in props if m.any()]
    rest = ~props.any(axis=0)
    if rest.any():
        candidates.append(rest)

    if len(candidates) < 2:
        fg = attr >= fg_fallback
        bg = np.ones_like(fg)
    else:
        scores = np.array([attr[m].mean() for m in candidates])
        # np.argmax / np.argmin return the first extremum: ties go to the lowest index.
        fg = candidates[int(np.argmax(scores))]
        bg = candidates[int(np.argmin(scores))]

    bg = bg & (attr < bg_max)
    if erode_px > 0 and bg.any():
        # iterations=0 would mean "until nothing changes" in scipy, hence the guard above.
        bg = ndi.binary_erosion(bg, structure=np.ones((3, 3), bool), iterations=erode_px, border_value=1)
    bg = bg & ~fg
    dev = attribution.device
    return torch.from_numpy(np.ascontiguousarray(fg)).to(dev), torch.from_numpy(np.ascontiguousarray(bg)).to(dev)


def support_masks(
    masker: Masker,
    attribution: torch.Tensor,
    features: torch.Tensor | None,
    bg_max: float = BG_ATTRIBUTION_MAX,
    erode_px: int = BG_ERODE_PX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose with `masker`, then `select_masks` per image.

    Args:
        masker: a built masker.
        attribution: (N, H, W) float32 in [0, 1], per-image min-max normalised attribution maps of one class.
        features: (N, h, w, D) float32 L2-normalised DINO keys, or None when `masker.needs_features` is False.

    Returns:
        (fg, bg): (N, H, W) bool each, disjoint per image.
    """
    _check_attribution(attribution)
    if masker.needs_features:
        _check_features(features, attribution)
    proposals = masker.propose(attribution, features)
    fgs, bgs = [], []
    for props, attr in zip(proposals, attribution, strict=True):
        fg, bg = select_masks(props, attr, bg_max=bg_max, erode_px=erode_px)
        fgs.append(fg)
        bgs.append(bg)
    h, w = attribution.shape[1:]
    if not fgs:
        empty = torch.zeros((0, h, w), dtype=torch.bool, device=attribution.device)
        return empty, empty.clone()
    return torch.stack(fgs), torch.stack(bgs)
