"""Paper 3.4, eq. 4: each pixel takes the class whose best prototype is most similar to its features.

The vocabulary is the user's classes 1..C plus the background class 0, whose prototypes are the background
prototypes of the classes the pre-filter kept (paper: P_bg^fg = union of the classes' P^bg). Images are resized
so their short side is ``short_side``; square windows of each size in ``scales`` slide over it with ``stride``.
For every window, each extractor's dense features are compared to every prototype by cosine similarity, the
similarities are averaged over extractors (the ensemble), and each class scores the max over its prototypes.
Window scores are averaged where windows overlap and then over scales, optionally refined by PAMR, upsampled to
the input size and arg-maxed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults as D
from . import filters
from .classes import ClassSpec
from .extractors.base import Extractor, to_grid
from .prototypes import BG, FG, PrototypeBank
from .timing import Timings

BACKGROUND_ID = 0
BACKGROUND_NAME = "background"
# Score of a class with no usable prototype in a window (removed by the pre-filter, or the background class
# under the no-background protocol): below any cosine similarity, so it never wins, and finite, so averaging
# and interpolation stay well defined.
EXCLUDED_SCORE = -2.0
# Window sizes must be multiples of this (the ViT extractors' patch size) so every extractor tiles a window
# exactly and all feature grids line up with the pixels.
WINDOW_MULTIPLE = 16


def parse_int_list(value: str | Sequence[int], flag: str) -> tuple[int, ...]:
    """``"448,336"`` -> (448, 336); ValueError naming ``flag`` and the bad value otherwise."""
    if isinstance(value, str):
        try:
            items = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"{flag} {value!r}: expected comma-separated whole numbers, e.g. 448,336") from None
    else:
        items = tuple(int(v) for v in value)
    if not items:
        raise ValueError(f"{flag} {value!r}: give at least one value")
    return items


@dataclass(frozen=True)
class SegmentOptions:
    """How eq. 4 is applied to an image. Defaults are the paper's (see defaults.py)."""

    scales: tuple[int, ...] = D.SCALES
    stride: int = D.STRIDE
    short_side: int = D.SHORT_SIDE
    background: bool = D.BACKGROUND
    prefilter: bool = D.PREFILTER
    eta: int = D.ETA
    stuff_threshold: float = D.STUFF_THRESHOLD
    pamr: bool = D.PAMR
    pamr_iters: int = D.PAMR_ITERS
    pamr_dilations: tuple[int, ...] = D.PAMR_DILATIONS
    batch_size: int = D.SEGMENT_BATCH_SIZE
    max_pixels: int = D.MAX_PIXELS

    def __post_init__(self) -> None:
        scales = parse_int_list(self.scales, "--scales")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "pamr_dilations", parse_int_list(self.pamr_dilations, "--pamr-dilations"))
        for name in ("stride", "short_side", "eta", "batch_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for s in scales:
            if s < WINDOW_MULTIPLE or s % WINDOW_MULTIPLE:
                raise ValueError(f"--scales {s}: window sizes must be positive multiples of {WINDOW_MULTIPLE}")
            if s > self.short_side:
                raise ValueError(f"--scales {s}: larger than --short-side {self.short_side}; windows must fit")
        if len(set(scales)) != len(scales):
            raise ValueError(f"--scales {','.join(map(str, scales))}: a window size is listed twice")
        if not -1.0 <= self.stuff_threshold <= 1.0:
            raise ValueError(f"--stuff-threshold {self.stuff_threshold}: a cosine similarity, in [-1, 1]")
        if self.pamr_iters < 0 or any(d < 1 for d in self.pamr_dilations):
            raise ValueError("PAMR needs iterations >= 0 and dilations >= 1")


# --- the prototypes of eq. 4 --------------------------------------------------------------------------------------


@dataclass
class PrototypeSet:
    """Every prototype eq. 4 compares against, grouped by score channel, with provenance.

    P = number of prototypes, K = C + 1 channels: 0 is the background class, i the i-th class of ``classes``.
    Prototypes are ordered by channel, so channel k owns rows ``bounds[k]:bounds[k + 1]``.

    Attributes:
        classes: the vocabulary in the user's order (channel i = classes[i - 1]).
        prototypes: extractor -> (P, D_e) float32 unit rows.
        channel: (P,) int64 in [0, K), non-decreasing.
        source: (P,) int64 in [1, C], the class whose bank the prototype came from (for background prototypes,
            the class whose support images' backgrounds it was pooled from).
        index: (P,) int64, the prototype's row in that class's bank (its provenance: see PrototypeBank).
        background: whether the background class has prototypes by design (False = no-background protocol).
        dropped: how many thing-class background prototypes the stuff filter removed.
        banks: the classes' banks, in class order, when built from banks (explain follows provenance there).
    """

    classes: list[ClassSpec]
    prototypes: dict[str, torch.Tensor]
    channel: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor
    background: bool = True
    dropped: int = 0
    banks: list[PrototypeBank] = field(default_factory=list, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.classes) + 1

    @property
    def bounds(self) -> list[int]:
        """K + 1 offsets: channel k's prototypes are rows bounds[k]:bounds[k + 1]."""
        counts = torch.bincount(self.channel, minlength=self.num_channels)
        return [0, *torch.cumsum(counts, 0).tolist()]

    def allowed(self, kept: Sequence[int]) -> torch.Tensor:
        """(P,) bool: the prototypes of the classes in ``kept`` (1-based ids), fg and bg."""
        return torch.isin(self.source, torch.as_tensor(list(kept), dtype=torch.int64, device=self.source.device))

    def to(self, device: torch.device | str) -> PrototypeSet:
        return PrototypeSet(
            self.classes,
            {e: p.to(device) for e, p in self.prototypes.items()},
            self.channel.to(device),
            self.source.to(device),
            self.index.to(device),
            self.background,
            self.dropped,
            self.banks,
        )


def build_prototype_set(
    banks: Sequence[PrototypeBank],
    classes: Sequence[ClassSpec],
    background: bool = D.BACKGROUND,
    stuff_threshold: float = D.STUFF_THRESHOLD,
) -> PrototypeSet:
    """Assemble eq. 4's prototypes from the classes' banks, applying the stuff filter.

    Class i (1-based) contributes its fg prototypes to channel i. With ``background``, thing classes also
    contribute their bg prototypes to channel 0, except those the stuff filter drops (similarity above
    ``stuff_threshold`` to any stuff class's prototype); stuff classes contribute fg prototypes only.

    Args:
        banks: one bank per class, in the order of ``classes``, all with the same extractors.
        classes: the vocabulary.
        background: False for the no-background protocol (paper 4.4): no bg prototypes at all.
        stuff_threshold: cosine similarity above which a thing-bg prototype is dropped.

    Returns:
        A CPU :class:`PrototypeSet`.
    """
    if len(banks) != len(classes) or not banks:
        raise ValueError(f"need one prototype bank per class, got {len(banks)} for {len(classes)} classes")
    extractors = banks[0].extractors
    for bank in banks:
        if bank.extractors != extractors:
            raise ValueError(f"banks use different extractors: {extractors} and {bank.extractors}")
    rows: list[tuple[int, int, int, bool, bool]] = []  # (channel, source, index, thing-bg, stuff)
    for cid, (bank, spec) in enumerate(zip(banks, classes, strict=True), start=1):
        rows += [(cid, cid, int(i), False, spec.stuff) for i in bank.select(FG)]
        if background and not spec.stuff:
            rows += [(BACKGROUND_ID, cid, int(i), True, False) for i in bank.select(BG)]
    rows.sort(key=lambda r: r[:3])
    channel, source, index = (torch.tensor([r[j] for r in rows], dtype=torch.int64) for j in range(3))
    # One gather per extractor from all banks' rows stacked (row of bank s, index i = offset[s - 1] + i).
    offset = torch.tensor([0, *itertools.accumulate(len(b) for b in banks)][:-1], dtype=torch.int64)
    rows_all = offset[source - 1] + index if rows else torch.zeros(0, dtype=torch.int64)
    protos = {e: torch.cat([b.prototypes[e] for b in banks])[rows_all] for e in extractors}
    keep = filters.stuff_filter(
        protos,
        torch.tensor([r[3] for r in rows], dtype=torch.bool),
        torch.tensor([r[4] for r in rows], dtype=torch.bool),
        stuff_threshold,
    )
    return PrototypeSet(
        list(classes),
        {e: p[keep] for e, p in protos.items()},
        channel[keep],
        source[keep],
        index[keep],
        background,
        int((~keep).sum()),
        list(banks),
    )


def class_scores(sims: torch.Tensor, bounds: Sequence[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's inner max: each channel's best prototype similarity.

    Args:
        sims: (..., P) float similarities, prototypes ordered by channel.
        bounds: K + 1 offsets of the channels' prototype ranges (PrototypeSet.bounds).
        allowed: optional bool, broadcastable to ``sims``: prototypes that may vote (False = ignored).

    Returns:
        (..., K) float: the max over each channel's allowed prototypes, EXCLUDED_SCORE where it has none.
    """
    if allowed is not None:
        sims = sims.masked_fill(~allowed, -math.inf)
    out = sims.new_full((*sims.shape[:-1], len(bounds) - 1), -math.inf)
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        if b > a:
            out[..., k] = sims[..., a:b].amax(-1)
    return out.clamp_min(EXCLUDED_SCORE)


# --- geometry -----------------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size of an image scaled (up or down) so its short side is ``short_side``, aspect kept."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def window_offsets(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``window`` covering [0, length) with ``stride``; the last one is moved
    back to end exactly at ``length`` (windows never leave the image). ``length`` >= ``window``."""
    n = max(0, math.ceil((length - window) / stride)) + 1
    return [min(i * stride, length - window) for i in range(n)]


def coverage(length: int, window: int, offsets: Sequence[int]) -> torch.Tensor:
    """(length,) float32: how many of the windows cover each position."""
    counts = torch.zeros(length)
    for o in offsets:
        counts[o : o + window] += 1
    return counts


def interpolation_matrix(out_len: int, in_len: int) -> torch.Tensor:
    """(out_len, in_len) float32 R with R @ x == 1-d linear interpolation of x as F.interpolate does it
    (align_corners=False, edges clamped): for reading single rows or pixels of an upsampled map."""
    # float32 position arithmetic, as torch does it, so results agree to the last bits
    pos = ((torch.arange(out_len, dtype=torch.float32) + 0.5) * (in_len / out_len) - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=in_len - 1)
    hi = (lo + 1).clamp(max=in_len - 1)
    frac = (pos - lo).float()
    r = torch.zeros(out_len, in_len)
    r[torch.arange(out_len), lo] += 1 - frac
    r[torch.arange(out_len), hi] += frac
    return r


def _upsampled_chunks(scores: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 25):
    """Yield (k0, k1, (k1 - k0, H, W) float32): ``scores`` (K, h, w) resized bilinearly to ``size`` a few classes
    at a time, so the whole upsampled stack is never held (a 12-megapixel photo x 100 classes is 5 GB).

    Channels are independent under F.interpolate, so the chunks are exactly the one-pass result.
    """
    k = scores.shape[0]
    step = max(1, max_elements // max(1, size[0] * size[1]))
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        yield k0, k1, F.interpolate(scores[None, k0:k1].float(), size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class Segmentation:
    """The segmentation of one image.

    Attributes:
        scores: (K, h, w) float32 CPU class scores at the working resolution (short side ``short_side``),
            channel 0 = background; classes the pre-filter removed hold EXCLUDED_SCORE.
        size: (H, W) of the input image.
        kept: 1-based ids of the classes the pre-filter kept (all of them when it is off).
        background: whether channel 0 is a real class (False under the no-background protocol).
    """

    scores: torch.Tensor
    size: tuple[int, int]
    kept: tuple[int, ...]
    background: bool = True

    def labels(self) -> np.ndarray:
        """(H, W) int64 label ids at the input size: 0 = background, i = i-th class (argmax; ties: lowest id)."""
        best = labels = None
        for k0, _, up in _upsampled_chunks(self.scores, self.size):
            value, index = up.max(0)
            if best is None:
                best, labels = value, index
            else:
                better = value > best  # strict: an earlier class keeps a tie, as argmax does
                best = torch.where(better, value, best)
                labels = torch.where(better, index + k0, labels)
        return labels.numpy().astype(np.int64)

    def pixel_scores(self, x: int, y: int) -> torch.Tensor:
        """(K,) float32 class scores at input pixel (x, y), interpolated exactly as :meth:`labels` does."""
        h, w = self.scores.shape[-2:]
        rh = interpolation_matrix(self.size[0], h)[y]
        rw = interpolation_matrix(self.size[1], w)[x]
        return torch.einsum("h,khw,w->k", rh, self.scores.float(), rw)

    def input_scores(self) -> np.ndarray:
        """(K', H, W) float16 scores at the input size; K' = K, or K - 1 without the background channel."""
        first = 0 if self.background else 1
        out = np.empty((self.scores.shape[0] - first, *self.size), dtype=np.float16)
        for k0, k1, up in _upsampled_chunks(self.scores[first:], self.size):
            out[k0:k1] = up.numpy()
        return out


class Segmenter:
    """Eq. 4 with the paper's sliding windows, ensemble and filters, for batches of images.

    Args:
        protoset: the prototypes (moved to ``device``).
        extractors: name -> extractor, the same extractors the prototypes were built with.
        options: window sizes, filters, batch size.
        prefilter: the CLIP pre-filter, or None to keep every class.
        device: where the computation runs.
        timings: optional accumulator of seconds per phase.
        compile: run the extractors through ``torch.compile``. Window batches have one fixed shape per scale, so
            each extractor compiles once per window size, not per image.
    """

    def __init__(
        self,
        protoset: PrototypeSet,
        extractors: Mapping[str, Extractor],
        options: SegmentOptions | None = None,
        prefilter: filters.ClipPrefilter | None = None,
        device: torch.device | str = "cpu",
        timings: Timings | None = None,
        compile: bool = False,
    ) -> None:
        if set(extractors) != set(protoset.prototypes):
            raise ValueError(f"extractors {sorted(extractors)} != the prototypes' {sorted(protoset.prototypes)}")
        self.device = torch.device(device)
        self.protoset = protoset.to(self.device)
        # On CUDA the matching matmul (features x every prototype, D up to 7680 for SD) costs as much as a
        # network forward in fp32. fp16 keeps ~3 significant digits of a cosine in [-1, 1], and the prototypes
        # are stored at fp16 precision anyway.
        self.sim_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self._protos = {e: p.to(self.sim_dtype) for e, p in self.protoset.prototypes.items()}
        self.bounds = self.protoset.bounds
        self.extractors = {
            name: torch.compile(ext.__call__, dynamic=False) if compile else ext for name, ext in extractors.items()
        }
        self.options = options or SegmentOptions()
        self.prefilter = prefilter
        self.timings = timings or Timings()

    def windows(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(size, top, left) of every window over an input of (height, width) after resizing."""
        h, w = resized_size(height, width, self.options.short_side)
        return [
            (s, y, x)
            for s in self.options.scales
            for y in window_offsets(h, s, self.options.stride)
            for x in window_offsets(w, s, self.options.stride)
        ]

    def kept_classes(self, images: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """Per image, the 1-based ids of the classes the pre-filter keeps (all when it is off)."""
        everything = tuple(range(1, len(self.protoset.classes) + 1))
        if self.prefilter is None or len(everything) == 1:
            return [everything] * len(images)
        with self.timings("prefilter"):
            emb = self.prefilter.image_embeddings(images)
            return [tuple(i + 1 for i in self.prefilter(e)) for e in emb]

    def features(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """windows (B, 3, s, s) in [0, 1] -> extractor -> (B, g, g, D_e) unit features on one common grid (the
        finest any extractor produces)."""
        with self.timings("forward"):
            feats = {name: ext(windows) for name, ext in self.extractors.items()}
        grid = max((tuple(f.shape[1:3]) for f in feats.values()), key=lambda hw: hw[0] * hw[1])
        return {name: to_grid(f, grid) for name, f in feats.items()}

    def similarities(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ensemble: features (B, g, g, D_e) per extractor -> (B, g, g, P) cosine similarity to every
        prototype, averaged over extractors."""
        with self.timings("similarity"):
            sims = sum((f.to(self.sim_dtype) @ self._protos[name].T).float() for name, f in feats.items())
            return sims / len(feats)

    def eq4(self, feats: Mapping[str, torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
        """Eq. 4's class scores of a batch of windows.

        Args:
            feats: extractor -> (B, g, g, D_e) unit features on the common grid (see :meth:`features`).
            allowed: (B, P) bool, the prototypes each window may use.

        Returns:
            (B, K, g, g) float32 scores: per class, its best allowed prototype's ensemble similarity.
        """
        sims = self.similarities(feats)
        with self.timings("similarity"):
            return class_scores(sims, self.bounds, allowed[:, None, None]).permute(0, 3, 1, 2)

    def window_scores(self, windows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) windows in [0, 1] and (B, P) allowed prototypes -> (B, K, g, g) eq. 4 scores."""
        return self.eq4(self.features(windows), allowed)

    def working_image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or [0, 1] float image -> (3, h, w) float32 on the device, short side ``short_side``."""
        x = image.to(self.device)
        x = x.float() / 255 if not x.is_floating_point() else x.float()
        size = resized_size(*x.shape[-2:], self.options.short_side)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)

    def _padded(self, crops: torch.Tensor) -> torch.Tensor:
        # A fixed batch shape: results never depend on which windows share a batch.
        pad = self.options.batch_size - crops.shape[0]
        return torch.cat([crops, crops.new_zeros(pad, *crops.shape[1:])]) if pad > 0 else crops

    def accumulate(
        self,
        work: Sequence[torch.Tensor],
        allowed: torch.Tensor,
        reduce: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
        channels: int,
    ) -> list[torch.Tensor]:
        """Slide the windows over working images and average what ``reduce`` makes of each window.

        Args:
            work: working images, each (3, h, w) float32 in [0, 1] on the device.
            allowed: (len(work), P) bool, the prototypes each image may use.
            reduce: (window features as from :meth:`features`, (B, P) allowed) -> (B, channels, g, g) maps.
            channels: how many maps ``reduce`` makes per window.

        Returns:
            Per image, (channels, h, w) float32: the maps bilinearly upsampled to the window's pixels, averaged
            over the windows covering each pixel, then over scales.
        """
        opts = self.options
        canvases = [torch.zeros(channels, *im.shape[-2:], device=self.device) for im in work]
        for s in opts.scales:
            # Each window's weight makes the sum over windows the mean over covering windows, then over scales.
            jobs, weights = [], []
            for i, im in enumerate(work):
                h, w = im.shape[-2:]
                ys, xs = window_offsets(h, s, opts.stride), window_offsets(w, s, opts.stride)
                cover = coverage(h, s, ys)[:, None] * coverage(w, s, xs)[None]
                weights.append((1.0 / (len(opts.scales) * cover)).to(self.device))
                jobs += [(i, y, x) for y in ys for x in xs]
            for start in range(0, len(jobs), opts.batch_size):
                chunk = jobs[start : start + opts.batch_size]
                crops = self._padded(torch.stack([work[i][:, y : y + s, x : x + s] for i, y, x in chunk]))
                allow = allowed[[i for i, _, _ in chunk] + [0] * (crops.shape[0] - len(chunk))]
                maps = reduce(self.features(crops), allow)[: len(chunk)]
                with self.timings("accumulate"):
                    if maps.shape[-1] != s:
                        maps = F.interpolate(maps, size=(s, s), mode="bilinear", align_corners=False)
                    for (i, y, x), m in zip(chunk, maps, strict=True):
                        canvases[i][:, y : y + s, x : x + s] += m * weights[i][y : y + s, x : x + s]
        return canvases

    @torch.no_grad()
    def pixel_similarities(self, work: torch.Tensor, y: int, x: int) -> dict[str, torch.Tensor]:
        """Every prototype's similarity to one pixel of a working image, per extractor, averaged over the
        windows and scales that cover the pixel exactly as :meth:`accumulate` averages.

        Features are interpolated to the pixel as the window maps are upsampled (bilinear, the same weights);
        similarity is linear in the features, so this equals the upsampled per-prototype similarity maps.

        Returns:
            extractor -> (P,) float32 CPU similarities.
        """
        opts = self.options
        h, w = work.shape[-2:]
        total = {e: torch.zeros(len(self.protoset.channel), device=self.device) for e in self.extractors}
        for s in opts.scales:
            ys = [o for o in window_offsets(h, s, opts.stride) if o <= y < o + s]
            xs = [o for o in window_offsets(w, s, opts.stride) if o <= x < o + s]
            windows = [(wy, wx) for wy in ys for wx in xs]
            for start in range(0, len(windows), opts.batch_size):
                chunk = windows[start : start + opts.batch_size]
                feats = self.features(self._padded(torch.stack([work[:, a : a + s, b : b + s] for a, b in chunk])))
                g = next(iter(feats.values())).shape[1]
                rows = interpolation_matrix(s, g).to(self.device)
                for j, (wy, wx) in enumerate(chunk):
                    for e, f in feats.items():
                        cell = torch.einsum("h,w,hwd->d", rows[y - wy], rows[x - wx], f[j])
                        total[e] += cell @ self.protoset.prototypes[e].T / (len(opts.scales) * len(windows))
        return {e: t.cpu() for e, t in total.items()}

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor]) -> list[Segmentation]:
        """Segment a batch of images; the windows of all of them go through each network together.

        Args:
            images: each (3, H, W) uint8 in [0, 255] or float in [0, 1] RGB, any size, on any device.

        Returns:
            One :class:`Segmentation` per image, in order.
        """
        opts = self.options
        with self.timings("resize"):
            work = [self.working_image(im) for im in images]
        kept = self.kept_classes(work)
        allowed = torch.stack([self.protoset.allowed(k) for k in kept])
        canvases = self.accumulate(work, allowed, self.eq4, self.protoset.num_channels)
        if opts.pamr:
            with self.timings("pamr"):
                canvases = [
                    filters.pamr(im[None], c[None], opts.pamr_iters, opts.pamr_dilations)[0]
                    for im, c in zip(work, canvases, strict=True)
                ]
        return [
            Segmentation(c.cpu(), tuple(im.shape[-2:]), kp, self.protoset.background)
            for c, im, kp in zip(canvases, images, kept, strict=True)
        ]
