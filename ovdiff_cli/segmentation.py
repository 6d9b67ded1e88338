"""Paper 3.4, eq. 4: each pixel takes the class whose best prototype is most similar to its features, computed
as the authors' code computes it (REFERENCE 6).

The vocabulary is the user's classes 1..C plus the background class 0, whose prototypes are the background
prototypes of the classes the pre-filter kept (paper: P_bg^fg = union of the classes' P^bg). Images are resized
(Lanczos) so their short side is ``short_side``; square windows of each size in ``scales`` slide over it with
``stride`` on mmseg's grid, and the whole resized image is one more window. For every extractor and every window,
each pixel feature is compared to that extractor's prototypes by cosine similarity, each class scores the max
over its prototypes (prototypes of classes the pre-filter removed score -1), and the class maps are upsampled
bilinear to the window. A pixel's score is the mean over every (extractor, window) pair covering it. Optionally
PAMR refines the scores; they are upsampled to the input size, scores <= 0 are zeroed, and the arg-max (ties to
the lowest id, so to background) is the label.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults as D
from . import filters
from .classes import ClassSpec
from .extractors.base import Extractor, l2n, resize
from .prototypes import BG, FG, PrototypeBank
from .timing import Timings

BACKGROUND_ID = 0
BACKGROUND_NAME = "background"
# Score of a class with no usable prototype (removed by the pre-filter, or a channel without prototypes such as
# the background under the no-background protocol): the lowest cosine similarity, as the reference scores a
# removed class's prototypes. It is zeroed with every other score <= 0 before the arg-max.
EXCLUDED_SCORE = -1.0
# Window sizes must be multiples of this (the ViT extractors' patch size).
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
    whole_image: bool = D.WHOLE_IMAGE
    short_side: int = D.SHORT_SIDE
    background: bool = D.BACKGROUND
    prefilter: bool = D.PREFILTER
    eta: int = D.ETA
    stuff_threshold: float = D.STUFF_THRESHOLD
    pamr: bool = D.PAMR
    pamr_iters: int = D.PAMR_ITERS
    pamr_dilations: tuple[int, ...] = D.PAMR_DILATIONS
    batch_size: int | None = None  # None: D.SEGMENT_BATCH_SIZE, or D.CPU_BATCH_SIZE on the CPU (Segmenter)
    max_pixels: int = D.MAX_PIXELS

    #: The command-line option of each field whose name differs from the field's (messages name what was typed).
    option_names: ClassVar[dict[str, str]] = {"batch_size": "--window-batch", "prefilter": "--filter"}

    @classmethod
    def option(cls, name: str) -> str:
        """The command-line option that sets field ``name``: ``batch_size`` -> ``--window-batch``."""
        return cls.option_names.get(name, "--" + name.replace("_", "-"))

    def __post_init__(self) -> None:
        scales = parse_int_list(self.scales, "--scales")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "pamr_dilations", parse_int_list(self.pamr_dilations, "--pamr-dilations"))
        for name in ("stride", "short_side", "eta", "batch_size", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{self.option(name)} {getattr(self, name)}: must be at least 1")
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
class ExtractorSet:
    """One extractor's prototypes for eq. 4, grouped by score channel, with provenance.

    P = number of prototypes, K = C + 1 channels: 0 is the background class, i the i-th class. Prototypes are
    ordered by channel, so channel k owns rows ``bounds[k]:bounds[k + 1]``.

    Attributes:
        prototypes: (P, D) float32 unit rows.
        channel: (P,) int64 in [0, K), non-decreasing.
        source: (P,) int64 in [1, C], the class whose bank the prototype came from (for background prototypes,
            the class whose support images' backgrounds it was pooled from).
        index: (P,) int64, the prototype's row in that class's bank for this extractor.
        num_channels: K.
    """

    prototypes: torch.Tensor
    channel: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor
    num_channels: int

    def __len__(self) -> int:
        return int(self.channel.shape[0])

    @property
    def bounds(self) -> list[int]:
        """K + 1 offsets: channel k's prototypes are rows bounds[k]:bounds[k + 1]."""
        counts = torch.bincount(self.channel, minlength=self.num_channels)
        return [0, *torch.cumsum(counts, 0).tolist()]

    def allowed(self, kept: Sequence[int]) -> torch.Tensor:
        """(P,) bool: the prototypes of the classes in ``kept`` (1-based ids), fg and bg."""
        return torch.isin(self.source, torch.as_tensor(list(kept), dtype=torch.int64, device=self.source.device))

    def to(self, device: torch.device | str) -> ExtractorSet:
        return ExtractorSet(
            self.prototypes.to(device),
            self.channel.to(device),
            self.source.to(device),
            self.index.to(device),
            self.num_channels,
        )


@dataclass
class PrototypeSet:
    """Every prototype eq. 4 compares against: one :class:`ExtractorSet` per extractor.

    Attributes:
        classes: the vocabulary in the user's order (channel i = classes[i - 1]).
        sets: extractor -> its prototypes.
        background: whether the background class has prototypes by design (False = no-background protocol).
        dropped: extractor -> how many thing-class background prototypes the stuff filter removed.
        banks: the classes' banks, in class order, when built from banks (explain follows provenance there).
    """

    classes: list[ClassSpec]
    sets: dict[str, ExtractorSet]
    background: bool = True
    dropped: dict[str, int] = field(default_factory=dict)
    banks: list[PrototypeBank] = field(default_factory=list, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.classes) + 1

    def allowed(self, kept: Sequence[int]) -> dict[str, torch.Tensor]:
        """Extractor -> (P_e,) bool, the prototypes of the classes in ``kept`` (1-based ids)."""
        return {e: s.allowed(kept) for e, s in self.sets.items()}

    def to(self, device: torch.device | str) -> PrototypeSet:
        sets = {e: s.to(device) for e, s in self.sets.items()}
        return PrototypeSet(self.classes, sets, self.background, self.dropped, self.banks)


def build_prototype_set(
    banks: Sequence[PrototypeBank],
    classes: Sequence[ClassSpec],
    background: bool = D.BACKGROUND,
    stuff_threshold: float = D.STUFF_THRESHOLD,
) -> PrototypeSet:
    """Assemble eq. 4's prototypes from the classes' banks, applying the stuff filter per extractor.

    Class i (1-based) contributes its fg prototypes to channel i. With ``background``, thing classes also
    contribute their bg prototypes to channel 0, except those the stuff filter drops (cosine above
    ``stuff_threshold`` to any stuff class's fg prototype of the same extractor); stuff classes contribute fg
    prototypes only.

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
    names = banks[0].names
    for bank in banks:
        if bank.names != names:
            raise ValueError(f"banks use different extractors: {', '.join(names)} and {', '.join(bank.names)}")
    sets, dropped = {}, {}
    for e in names:
        rows: list[tuple[int, int, int, bool, bool]] = []  # (channel, source, index, thing-bg, stuff-fg)
        for cid, (bank, spec) in enumerate(zip(banks, classes, strict=True), start=1):
            rows += [(cid, cid, int(i), False, spec.stuff) for i in bank[e].select(FG)]
            if background and not spec.stuff:
                rows += [(BACKGROUND_ID, cid, int(i), True, False) for i in bank[e].select(BG)]
        rows.sort(key=lambda r: r[:3])
        channel, source, index = (torch.tensor([r[j] for r in rows], dtype=torch.int64) for j in range(3))
        # One gather from all banks' rows stacked (row of bank s, index i = offset[s - 1] + i).
        offset = torch.tensor([0, *itertools.accumulate(len(b[e]) for b in banks)][:-1], dtype=torch.int64)
        rows_all = offset[source - 1] + index if rows else torch.zeros(0, dtype=torch.int64)
        protos = torch.cat([b[e].prototypes for b in banks])[rows_all]
        keep = filters.stuff_filter(
            protos,
            torch.tensor([r[3] for r in rows], dtype=torch.bool),
            torch.tensor([r[4] for r in rows], dtype=torch.bool),
            stuff_threshold,
        )
        sets[e] = ExtractorSet(protos[keep], channel[keep], source[keep], index[keep], len(classes) + 1)
        dropped[e] = int((~keep).sum())
    return PrototypeSet(list(classes), sets, background, dropped, list(banks))


def class_scores(sims: torch.Tensor, bounds: Sequence[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's inner max for one extractor: each channel's best prototype similarity.

    Args:
        sims: (..., P) float similarities, prototypes ordered by channel.
        bounds: K + 1 offsets of the channels' prototype ranges (ExtractorSet.bounds).
        allowed: optional bool, broadcastable to ``sims``: prototypes that may vote; the others score
            EXCLUDED_SCORE, as the reference scores the prototypes of removed classes.

    Returns:
        (..., K) float: the max over each channel's prototypes, EXCLUDED_SCORE for a channel without any.
    """
    if allowed is not None:
        sims = sims.masked_fill(~allowed, EXCLUDED_SCORE)
    out = sims.new_full((*sims.shape[:-1], len(bounds) - 1), EXCLUDED_SCORE)
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        if b > a:
            out[..., k] = sims[..., a:b].amax(-1)
    return out


# --- geometry -----------------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size of an image scaled (up or down) so its short side is ``short_side``, aspect kept, the long side
    truncated as the reference's ``int()`` does (REFERENCE 6): 375 x 501 -> 448 x 598 (598.53), not 599. Integer
    arithmetic, so an exact product is never truncated from 0.999... below it."""
    short = min(height, width)
    return (
        short_side if height == short else height * short_side // short,
        short_side if width == short else width * short_side // short,
    )


def window_offsets(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``window`` covering [0, length) with ``stride``; the last one is moved
    back to end exactly at ``length`` (windows never leave the image). ``length`` >= ``window``."""
    n = max(0, math.ceil((length - window) / stride)) + 1
    return [min(i * stride, length - window) for i in range(n)]


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
        scores: (K, h, w) float32 CPU class scores in [-1, 1] at the working resolution (short side
            ``short_side``), channel 0 = background; classes the pre-filter removed hold EXCLUDED_SCORE.
        size: (H, W) of the input image.
        kept: 1-based ids of the classes the pre-filter kept (all of them when it is off).
        background: whether channel 0 is a real class (False under the no-background protocol).
    """

    scores: torch.Tensor
    size: tuple[int, int]
    kept: tuple[int, ...]
    background: bool = True

    def labels(self) -> np.ndarray:
        """(H, W) int64 label ids at the input size: 0 = background, i = i-th class.

        As the reference: scores upsampled bilinear to the input size, scores <= 0 zeroed, then the arg-max with
        ties to the lowest id (so a pixel where no class scores above 0 is background). Without background,
        channel 0 takes no part and ties go to the first class.
        """
        first = 0 if self.background else 1
        best = labels = None
        for k0, _, up in _upsampled_chunks(self.scores[first:], self.size):
            value, index = up.clamp_min(0).max(0)
            if best is None:
                best, labels = value, index
            else:
                better = value > best  # strict: an earlier class keeps a tie, as argmax does
                best = torch.where(better, value, best)
                labels = torch.where(better, index + k0, labels)
        return labels.numpy().astype(np.int64) + first

    def pixel_scores(self, x: int, y: int) -> torch.Tensor:
        """(K,) float32 class scores at input pixel (x, y), interpolated exactly as :meth:`labels` does (before
        the zeroing)."""
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


# (top, left, height, width) of one window of a working image.
Window = tuple[int, int, int, int]
# reduce(extractor name, features (B, h, w, D) raw, allowed (B, P_e)) -> (B, C, h, w) maps, or None to skip.
Reduce = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None]


class Segmenter:
    """Eq. 4 with the reference's windows, per-extractor scores and filters, for batches of images.

    Args:
        protoset: the prototypes (moved to ``device``).
        extractors: name -> extractor, the same extractors the prototypes were built with.
        options: window sizes, filters, batch size.
        prefilter: the CLIP pre-filter, or None to keep every class.
        device: where the computation runs.
        timings: optional accumulator of seconds per phase.
        compile: run the extractors' networks through ``torch.compile``. Sliding windows come in one fixed shape
            per scale, so each extractor compiles once per window size (and once per whole-image shape).
        sim_dtype: dtype of the matching matmul: fp32 by default, as the reference (REFERENCE 6); fp16 is faster
            on CUDA (``--precision fast``), to about 3 significant digits.
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
        sim_dtype: torch.dtype = torch.float32,
    ) -> None:
        if set(extractors) != set(protoset.sets):
            raise ValueError(
                f"extractors {', '.join(sorted(extractors))} differ from the prototypes'"
                f" {', '.join(sorted(protoset.sets))}"
            )
        self.device = torch.device(device)
        self.protoset = protoset.to(self.device)
        self.sim_dtype = sim_dtype
        self._protos = {e: s.prototypes.to(sim_dtype) for e, s in self.protoset.sets.items()}
        self.bounds = {e: s.bounds for e, s in self.protoset.sets.items()}
        self.extractors = dict(extractors)
        if compile:
            # A copy per extractor with its network call compiled: the caller's extractors stay eager.
            for name, ext in extractors.items():
                self.extractors[name] = copy.copy(ext)
                self.extractors[name].forward = torch.compile(ext.forward, dynamic=False)
        self.options = options or SegmentOptions()
        if self.options.batch_size is None:
            cpu = self.device.type == "cpu"
            self.options = replace(self.options, batch_size=D.CPU_BATCH_SIZE if cpu else D.SEGMENT_BATCH_SIZE)
        self.prefilter = prefilter
        self.timings = timings or Timings()

    def windows(self, height: int, width: int) -> list[Window]:
        """(top, left, height, width) of every window over an input of (height, width) after resizing: the
        sliding windows of each scale, then the whole image (with ``whole_image``)."""
        h, w = resized_size(height, width, self.options.short_side)
        out = [
            (y, x, s, s)
            for s in self.options.scales
            for y in window_offsets(h, s, self.options.stride)
            for x in window_offsets(w, s, self.options.stride)
        ]
        return [*out, (0, 0, h, w)] if self.options.whole_image else out

    def batch_counts(self, height: int, width: int) -> tuple[int, ...]:
        """How many windows an input of (height, width) adds to each stream of batches (see :meth:`_batches`): one
        stream per scale for the extractors that see windows at their own size, and one stream of all windows for
        those that resize every window to one input size. A group of images whose counts are all multiples of the
        batch size fills every batch."""
        h, w = resized_size(height, width, self.options.short_side)
        opts = self.options
        sliding = [len(window_offsets(h, s, opts.stride)) * len(window_offsets(w, s, opts.stride)) for s in opts.scales]
        inputs = [ext.window_input() for ext in self.extractors.values()]
        per_scale = sliding if any(size is None for size in inputs) else []
        all_windows = [sum(sliding) + int(opts.whole_image)] if any(size is not None for size in inputs) else []
        return (*per_scale, *all_windows)

    def score_bytes(self, height: int, width: int) -> int:
        """Bytes of the float32 score maps an input of (height, width) holds while it is segmented (one map per
        class and extractor, at the working resolution)."""
        h, w = resized_size(height, width, self.options.short_side)
        return 4 * self.protoset.num_channels * len(self.extractors) * h * w

    def kept_classes(self, images: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """Per image, the 1-based ids of the classes the pre-filter keeps (all when it is off).

        ``images``: the :meth:`resized_input` of each input (uint8 or float, as given): the reference's pre-filter
        resizes its PIL working image's bytes, not the float working image."""
        everything = tuple(range(1, len(self.protoset.classes) + 1))
        if self.prefilter is None or len(everything) == 1:
            return [everything] * len(images)
        with self.timings("prefilter"):
            emb = self.prefilter.image_embeddings(images, batch=self.options.batch_size)
            return [tuple(i + 1 for i in self.prefilter(e)) for e in emb]

    def similarities(self, name: str, feats: torch.Tensor) -> torch.Tensor:
        """Raw features (B, h, w, D) of extractor ``name`` -> (B, h, w, P_e) cosine similarity to its prototypes
        (features are L2-normalised here, at matching time, as the reference does)."""
        with self.timings("similarity"):
            return (l2n(feats).to(self.sim_dtype) @ self._protos[name].T).float()

    def eq4(self, name: str, feats: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Eq. 4's class scores of a batch of windows for one extractor.

        Args:
            name: the extractor.
            feats: (B, h, w, D) raw features.
            allowed: (B, P_e) bool, the prototypes each window may use.

        Returns:
            (B, K, h, w) float32 scores: per class, its best prototype's similarity (EXCLUDED_SCORE for removed
            classes and empty channels).
        """
        sims = self.similarities(name, feats)
        with self.timings("similarity"):
            return class_scores(sims, self.bounds[name], allowed[:, None, None]).permute(0, 3, 1, 2)

    def resized_input(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or [0, 1] float image -> (3, h, w) of the same dtype, short side ``short_side``, resized
        with Lanczos as the reference resizes its PIL image (:func:`filters.lanczos_resize`; a uint8 image as 8-bit
        RGB). The pre-filter is handed this image; :meth:`working_image` is it as floats on the device."""
        return filters.lanczos_resize(image, resized_size(*image.shape[-2:], self.options.short_side))

    def working_image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or [0, 1] float image -> (3, h, w) float32 in [0, 1] on the device: :meth:`resized_input`
        as floats."""
        return filters.unit_float(self.resized_input(image).to(self.device))

    def _batches(
        self, work: Sequence[torch.Tensor], one_input: bool = False
    ) -> list[tuple[list[tuple[int, Window]], int]]:
        """The windows of all working images in fixed-shape batches, each with the batch size it is padded to, so
        results never depend on which windows share a batch (on the CPU with MKL, given the strict reproducible mode
        the CLI sets: see cli._environment). For a network that sees each window at its own size:
        sliding windows of one scale together, ``batch_size`` at a time (the last batch padded), and each whole-image
        window alone. For one that resizes every window to one input size (``one_input``): all windows together, in
        the same order (scales, then the whole images), ``batch_size`` at a time."""
        opts = self.options
        batches: list[tuple[list[tuple[int, Window]], int]] = []
        streams = [
            [
                (i, (y, x, s, s))
                for i, im in enumerate(work)
                for y in window_offsets(im.shape[-2], s, opts.stride)
                for x in window_offsets(im.shape[-1], s, opts.stride)
            ]
            for s in opts.scales
        ]
        whole = [(i, (0, 0, *im.shape[-2:])) for i, im in enumerate(work)] if opts.whole_image else []
        if one_input:
            streams = [[job for stream in streams for job in stream] + whole]
        for jobs in streams:
            batches += [(jobs[a : a + opts.batch_size], opts.batch_size) for a in range(0, len(jobs), opts.batch_size)]
        return batches if one_input else batches + [([job], 1) for job in whole]

    def _inputs(self, work: Sequence[torch.Tensor], chunk: list[tuple[int, Window]], size: int, name: str):
        """The network input of one batch for extractor ``name``: the chunk's crops (resized one by one to the
        extractor's window input size when it has one), zero-padded to ``size``."""
        target = self.extractors[name].window_input()
        crops = [work[i][:, y : y + h, x : x + w] for i, (y, x, h, w) in chunk]
        if target is not None:
            crops = [resize(c[None], target)[0] for c in crops]
        stacked = torch.stack(crops)
        pad = size - stacked.shape[0]
        return torch.cat([stacked, stacked.new_zeros(pad, *stacked.shape[1:])]) if pad > 0 else stacked

    def _extractor_batches(self, work: Sequence[torch.Tensor], name: str) -> list[tuple[list[tuple[int, Window]], int]]:
        """:meth:`_batches` as extractor ``name`` takes its windows."""
        return self._batches(work, one_input=self.extractors[name].window_input() is not None)

    def accumulate(
        self,
        work: Sequence[torch.Tensor],
        allowed: Mapping[str, torch.Tensor],
        reduce: Reduce,
        channels: int,
        extractors: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Run every window through every extractor and average what ``reduce`` makes of it.

        Args:
            work: working images, each (3, h, w) float32 in [0, 1] on the device.
            allowed: extractor -> (len(work), P_e) bool, the prototypes each image may use.
            reduce: (extractor, window features, (B, P_e) allowed) -> (B, channels, h_e, w_e) maps, or None to
                skip that extractor.
            channels: how many maps ``reduce`` makes per window.
            extractors: which extractors to run (default: all).

        Returns:
            Per image, (channels, h, w) float32: each (extractor, window) pair's maps upsampled bilinear to the
            window's pixels and clamped to [-1, 1], averaged over the pairs covering each pixel.
        """
        names = list(extractors) if extractors is not None else list(self.extractors)
        # One canvas per extractor and image, each summed in the image's own window order, then added up in a fixed
        # extractor order: the float sums never depend on how the windows of several images were batched.
        canvases = {e: [torch.zeros(channels, *im.shape[-2:], device=self.device) for im in work] for e in names}
        counts = [torch.zeros(im.shape[-2:], device=self.device) for im in work]
        for name in names:
            for chunk, size in self._extractor_batches(work, name):
                index = [i for i, _ in chunk] + [0] * (size - len(chunk))
                with self.timings("forward"):
                    feats = self.extractors[name](self._inputs(work, chunk, size, name))
                # Rows stacked on the device: indexing with a host list would copy it there, and a copy from the
                # host waits for the device to finish its queue.
                maps = reduce(name, feats, torch.stack([allowed[name][i] for i in index]))
                if maps is None:
                    continue
                with self.timings("accumulate"):
                    for (i, (y, x, h, w)), m in zip(chunk, maps, strict=False):
                        up = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                        canvases[name][i][:, y : y + h, x : x + w] += up.clamp_(-1, 1)
                        counts[i][y : y + h, x : x + w] += 1
        with self.timings("accumulate"):
            return [sum(canvases[e][i] for e in sorted(names)) / n.clamp_min(1) for i, n in enumerate(counts)]

    @torch.no_grad()
    def pixel_similarities(self, work: torch.Tensor, y: int, x: int) -> dict[str, torch.Tensor]:
        """Every prototype's similarity to one pixel of a working image, per extractor, averaged over the
        windows that cover the pixel exactly as :meth:`accumulate` averages one extractor's maps.

        Normalised features are interpolated to the pixel as the window maps are upsampled (bilinear, the same
        weights); similarity is linear in them, so this equals the upsampled per-prototype similarity maps.

        Returns:
            extractor -> (P_e,) float32 CPU similarities.
        """
        total = {e: torch.zeros(len(s), device=self.device) for e, s in self.protoset.sets.items()}
        for e, ext in self.extractors.items():
            batches = [
                ([job for job in c if _covers(job[1], y, x)], size) for c, size in self._extractor_batches([work], e)
            ]
            chunks = [(c, size) for c, size in batches if c]
            n = sum(len(c) for c, _ in chunks)
            for chunk, size in chunks:
                feats = l2n(ext(self._inputs([work], chunk, size, e)))
                for j, (_, (wy, wx, h, w)) in enumerate(chunk):
                    rows = interpolation_matrix(h, feats.shape[1]).to(self.device)[y - wy]
                    cols = interpolation_matrix(w, feats.shape[2]).to(self.device)[x - wx]
                    cell = torch.einsum("h,w,hwd->d", rows, cols, feats[j])
                    total[e] += cell @ self.protoset.sets[e].prototypes.T / n
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
            resized = [self.resized_input(im) for im in images]
            work = [filters.unit_float(im.to(self.device)) for im in resized]
        kept = self.kept_classes(resized)
        allowed = {e: torch.stack([s.allowed(k) for k in kept]) for e, s in self.protoset.sets.items()}
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


def _covers(window: Window, y: int, x: int) -> bool:
    top, left, h, w = window
    return top <= y < top + h and left <= x < left + w
