"""The commands end to end.

``synth``: support set -> attribution -> masks -> features -> prototype bank, through the cache. Every stage
reads the content-addressed cache first and writes what it computed at once, so a second run computes nothing,
a new class computes only itself, a larger N generates only the new images, and an interrupted run resumes
where it stopped.

``segment``: prototype banks (from the cache, synthesised first where missing) -> eq. 4 over a list of files
-> label maps, overlays and scores, written atomically, skipping what exists.

``eval``: the same segmentation over a benchmark's images -> confusion matrices against the ground truth, per
seed (or existing prediction files scored without any model).
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

import numpy as np
import torch

from . import attribution, evaluation, masks, outputs, prototypes, synthesis
from . import cache as cachelib
from . import defaults as D
from .classes import ClassSpec
from .datasets import DatasetSpec, Sample
from .extractors import build_extractor, parse_extractors
from .inputs import ImageError, InputImage, load_image
from .models.loading import Models, dtype_name
from .segmentation import Segmentation, Segmenter, SegmentOptions, build_prototype_set
from .timing import Timings

T = TypeVar("T")

# Bump a stage's version whenever its bytes would change for the same key fields.
# 2: the reference's recipe (issue 11): DPM-Solver++ by default, bicubic per-step attribution stored in float32,
# masks chosen at the support image's resolution, per-extractor prototypes from raw features.
# 3: the last mile (issue 23): images floored with their residual kept, DPM-Solver++'s last step second order,
# tokens upsampled one by one; CutLER on the float image at torchvision's size; eq. 1's per-pixel partition,
# per-grid skips, sklearn's K-means stop, fp32 prototypes, DINO support at 512, windows resized without antialias.
SUPPORT_VERSION = 3
PROPOSALS_VERSION = 3
BANK_VERSION = 3
# Segmented images whose outputs may wait for the writer thread before the next image waits for them.
WRITE_QUEUE = 4


@dataclass(frozen=True)
class SynthOptions:
    """What determines a class's support set and prototype bank. Defaults are the paper's (see defaults.py)."""

    n: int = D.N_SUPPORT
    steps: int = D.STEPS
    scheduler: str = D.SCHEDULER
    guidance: float = D.GUIDANCE
    seed: int = D.SEED
    batch_size: int | None = None  # None: D.BATCH_SIZE, or D.CPU_BATCH_SIZE on the CPU (see batch_size())
    masker: str = D.MASKER
    extractors: tuple[str, ...] = D.EXTRACTORS
    k: int = D.K_PARTS
    negative_prompt: str = D.NEGATIVE_PROMPT

    def __post_init__(self) -> None:
        for name in ("n", "steps", "batch_size", "k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.n > D.N_MAX:
            raise ValueError(
                f"--n {self.n:,}: more than {D.N_MAX:,} support images per class (the paper uses {D.N_SUPPORT});"
                " a class's prototypes hold every image's features in memory at once"
            )
        if self.scheduler not in D.SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(D.SCHEDULERS)}")
        object.__setattr__(self, "extractors", parse_extractors(self.extractors))
        name = self.masker.strip().lower()
        # "auto" stays "auto" here: which masker it means depends on the models (see effective_masker).
        object.__setattr__(self, "masker", name if name == masks.AUTO else masks.resolve_masker_name(name))
        masks.build_masker(self.masker)  # an unknown masker or bad parameter fails here, early


@dataclass
class ClassResult:
    """What ``synth`` did for one class (the CLI's summary row and JSON entry)."""

    name: str
    stuff: bool
    images_generated: int = 0
    images_cached: int = 0
    prototypes: dict[str, dict[str, int]] = field(default_factory=dict)
    digest: str = ""
    bank_key: str = ""
    bank_cached: bool = False
    seconds: float = 0.0
    # Seconds per stage: sampling, encode, decode, masks, features, prototypes (see ensure_support, build_class_bank)
    stages: dict[str, float] = field(default_factory=dict)
    bank: prototypes.PrototypeBank | None = field(default=None, repr=False)


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class _Silent:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


# --- keys ---------------------------------------------------------------------------------------------------------


def configured_batch_size(opts: SynthOptions, models: Models) -> int:
    """The user's ``--batch-size``, else D.BATCH_SIZE on an accelerator and the model set's ``cpu_batch_size`` on
    the CPU (D.CPU_BATCH_SIZE for full-size networks)."""
    if opts.batch_size is not None:
        return opts.batch_size
    return models.spec.cpu_batch_size if models.device.type == "cpu" else D.BATCH_SIZE


def batch_size(opts: SynthOptions, models: Models) -> int:
    """Images per network batch when computing on support images (masks, features): the configured batch size,
    never more than N."""
    return min(configured_batch_size(opts, models), opts.n)


def sampling_batch_size(opts: SynthOptions, models: Models) -> int:
    """Images per batch when generating: images run in batches of this size aligned to their index, every slot a
    genuine image (see :func:`support_key`). On an accelerator it is :func:`batch_size`, so a small support set
    never generates images it does not need; on the CPU the configured batch size whatever N (1 for full-size
    networks), so N never changes an image's batch there."""
    return batch_size(opts, models) if models.device.type != "cpu" else configured_batch_size(opts, models)


def support_key(models: Models, class_name: str, index: int, opts: SynthOptions) -> str:
    """Cache key of support image ``index`` of ``class_name``: everything that determines its bytes.

    N is absent. The batch is present, as (batch, slot, batch size) of :func:`sampling_batch_size`: the batch
    size changes low-order bits (on this project's CPU an image generated alone differs from the same image in a
    batch of 4), the slot and the neighbours do not (every slot holds its genuine image, so they are the same
    whoever asks). On the CPU that batch does not follow N, so a growing N reuses every cached image; on an
    accelerator it follows N while N is below the batch size. Passing an accelerator's ``--batch-size`` and
    ``--precision`` on the CPU asks for the images and banks it made. The dtype SD ran in is in the key too.
    """
    b = sampling_batch_size(opts, models)
    slot = [index // b, index % b, b]
    return cachelib.make_key(
        "support",
        SUPPORT_VERSION,
        prompt=synthesis.prompt_for(class_name),
        negative_prompt=opts.negative_prompt,
        class_name=class_name,
        image_seed=synthesis.image_seed(opts.seed, class_name, index),
        batch_slot=slot,
        model=models.hashes["sd"],
        steps=opts.steps,
        guidance=opts.guidance,
        scheduler=opts.scheduler,
        size=models.spec.image_size,
        dtype=dtype_name(models.dtype("sd")),
    )


def effective_masker(opts: SynthOptions, models: Models) -> str:
    """The masker a run uses: ``--masker auto`` is cutler when the model set's CutLER checkpoint is on this machine
    (the paper's recipe), else maskcut (see :func:`masker_note`)."""
    if opts.masker != masks.AUTO:
        return opts.masker
    return masks.resolve_masker_name(masks.AUTO, cutler_weights=models.has_weights("cutler"))


def masker_note(opts: SynthOptions, models: Models) -> str | None:
    """What to tell the user when ``--masker auto`` could not use CutLER; None when there is nothing to say."""
    if opts.masker != masks.AUTO or models.has_weights("cutler"):
        return None
    comp = models.spec.components.get("cutler")
    where = f" ({comp.source})" if comp is not None else ""
    return (
        f"--masker auto uses {effective_masker(opts, models)}: the CutLER checkpoint{where} is not on this machine,"
        " so support masks are not the paper's recipe; get it with `ovdiff models fetch sd15` or pass"
        " --models NAME,cutler=PATH"
    )


def build_class_masker(opts: SynthOptions, models: Models) -> masks.Masker:
    """The run's masker, bound to the models (it loads nothing until it runs)."""
    return masks.build_masker(effective_masker(opts, models), models=models)


def _masker_fields(models: Models, masker: masks.Masker) -> dict:
    """What a masker's output depends on, for cache keys: its name, version, parameters and the network it runs."""
    model = models.hashes["dino"] if masker.needs_features else None
    if masker.name == "cutler":
        model = models.hashes["cutler"]
    return {
        "masker": masker.name,
        "masker_version": masker.version,
        "masker_params": masker.params(),
        "masker_model": model,
        "masker_input": models.spec.maskcut_input if masker.needs_features else None,
    }


def bank_key(models: Models, class_name: str, keys: list[str], opts: SynthOptions) -> str:
    masker = build_class_masker(opts, models)
    extractors = {name: build_extractor(name, models) for name in opts.extractors}
    return cachelib.make_key(
        "bank",
        BANK_VERSION,
        class_name=class_name,
        support=keys,
        **_masker_fields(models, masker),
        extractors={
            n: {"model": models.hashes[e.role], "params": e.params(), "dtype": dtype_name(models.dtype(e.role))}
            for n, e in extractors.items()
        },
        mask_size=models.spec.image_size,
        mask_grid_threshold=D.MASK_GRID_THRESHOLD,
        selection={"bg_max": D.BG_ATTRIBUTION_MAX, "erode": D.BG_ERODE, "fg_fallback": D.FG_FALLBACK},
        k=opts.k,
        kmeans_seed=D.KMEANS_SEED,
        kmeans_iters=D.KMEANS_ITERS,
        kmeans_tol=D.KMEANS_TOL,
    )


def class_keys(models: Models, class_name: str, opts: SynthOptions) -> tuple[list[str], str]:
    """The class's N support keys and its bank key: computed from model hashes and options, no model loaded."""
    keys = [support_key(models, class_name, i, opts) for i in range(opts.n)]
    return keys, bank_key(models, class_name, keys, opts)


# --- stages -------------------------------------------------------------------------------------------------------


class InOrder:
    """Jobs run on one worker thread, or in line (``background=False``), and handed back in submission order, each
    with a tag; ``timings[phase]`` gets the time the calling thread spends waiting for them (and running them, in
    line). Used to encode support images and to write segment's outputs while the device works on. Use it as a
    context manager: leaving it waits for the worker."""

    def __init__(self, timings: Timings, phase: str, background: bool = True) -> None:
        self.timings, self.phase = timings, phase
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"ovdiff-{phase}") if background else None
        self._pending: deque[tuple[object, Future]] = deque()

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(self, tag: object, fn: Callable, *args: object) -> None:
        if self._pool is not None:
            future = self._pool.submit(fn, *args)
        else:
            future = Future()
            with self.timings(self.phase):
                try:
                    future.set_result(fn(*args))
                except Exception as exc:  # handed back like a worker's error, in order
                    future.set_exception(exc)
        self._pending.append((tag, future))

    def finished(self, keep: int = 0, wait: bool = True) -> Iterator[tuple[object, Future]]:
        """(tag, done future), oldest first, until at most ``keep`` jobs are pending; ``wait=False``: only those
        already done."""
        while len(self._pending) > keep and (wait or self._pending[0][1].done()):
            tag, future = self._pending.popleft()
            with self.timings(self.phase):
                future.exception()  # waits
            yield tag, future


@dataclass
class SupportSet:
    """What :func:`ensure_support` did for one class: its N support keys, how many images it generated, and those
    images themselves (key -> SupportImage, pixels still on the models' device) for the rest of the run."""

    keys: list[str]
    generated: int = 0
    fresh: dict[str, synthesis.SupportImage] = field(default_factory=dict)


class SupportWriter:
    """Stores support images in the cache, encoding them (PNG: about 0.15 s of one core each at 512x512, seconds
    for a class) on a worker thread while the device generates the next batch and then builds the bank. Entries
    are put into the cache from the calling thread, in order, as their encoding finishes. Leaving the block, also
    on Ctrl-C or an error, stores every image handed over: nothing generated is lost. ``timings`` gets "encode":
    the time the calling thread waits for encodings and writes (what the background work still costs the run)."""

    def __init__(self, cache: cachelib.Cache, class_name: str, timings: Timings) -> None:
        self.cache, self.class_name, self.timings = cache, class_name, timings
        self._jobs = InOrder(timings, "encode")

    def __enter__(self) -> SupportWriter:
        return self

    def submit(self, key: str, index: int, image: synthesis.SupportImage) -> None:
        self._jobs.submit(key, encode_support, image.image, image.residual, image.attribution, self.class_name, index)
        self._store(wait=False)

    def _store(self, wait: bool) -> None:
        for key, future in self._jobs.finished(wait=wait):
            with self.timings("encode"):
                self.cache.put("support", key, future.result())

    def __exit__(self, *exc: object) -> None:
        with self._jobs:
            self._store(wait=True)


def ensure_support(
    cache: cachelib.Cache,
    models: Models,
    class_name: str,
    opts: SynthOptions,
    progress: Progress,
    timings: Timings | None = None,
    writer: SupportWriter | None = None,
) -> SupportSet:
    """Make sure images 0..N-1 of the class are cached; return their keys and the images generated here.
    ``timings`` accumulates "sampling" (the denoising loop with capture and decoding) and "encode" (PNG + cache,
    as far as it is not hidden behind other work). With a caller's ``writer``, the last images are in the cache
    once that writer's block ends (so their encoding can overlap the caller's next stages); without one, on
    return."""
    timings = timings or Timings()
    if writer is None:
        with SupportWriter(cache, class_name, timings) as own:
            return ensure_support(cache, models, class_name, opts, progress, timings, own)
    support = SupportSet([support_key(models, class_name, i, opts) for i in range(opts.n)])
    keys = support.keys
    missing = {i for i, k in enumerate(keys) if cache.get("support", k) is None}
    progress.start(f"{class_name}: images", opts.n)
    progress.advance(opts.n - len(missing))
    b = sampling_batch_size(opts, models)
    for batch in sorted({i // b for i in missing}):
        # Every slot holds its genuine image (even past N), so the batch is the same whoever asks for it.
        slots = range(batch * b, (batch + 1) * b)
        seeds = [synthesis.image_seed(opts.seed, class_name, i) for i in slots]
        with timings("sampling"):  # the first batch also loads SD: "load" in synthesize's stages says how long
            out = synthesis.generate(
                models.get("sd"),
                class_name,
                seeds,
                steps=opts.steps,
                guidance=opts.guidance,
                negative_prompt=opts.negative_prompt,
                scheduler=opts.scheduler,
                image_size=models.spec.image_size,
            )
        for i, img in zip(slots, out, strict=True):
            if i in missing:
                writer.submit(keys[i], i, img)
                support.fresh[keys[i]] = img
                support.generated += 1
                progress.advance()
    return support


def encode_support(
    image: np.ndarray, residual: np.ndarray, attribution: np.ndarray, class_name: str, index: int
) -> bytes:
    """A support cache entry, in safetensors: the (H, W, 3) uint8 image as PNG, its (H, W, 3) uint8 flooring
    residual raw (noise: PNG would not shrink it; see :func:`synthesis.quantise`) and the (G, G) attribution as
    float32 (the thresholds 0.2 and 0.5 are applied to it after upsampling, so it is kept exact)."""
    return cachelib.encode_arrays(
        {
            "image_png": np.frombuffer(cachelib.encode_png(image), dtype=np.uint8),
            "residual": np.ascontiguousarray(residual, dtype=np.uint8),
            "attribution": attribution.astype(np.float32),
        },
        {"class": class_name, "index": index},
    )


def load_support(cache: cachelib.Cache, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image, (H, W, 3) uint8 flooring residual and (G, G) float32 attribution in [0, 1] of one
    cached support image."""
    payload = cache.get("support", key)
    if payload is None:
        raise KeyError(f"support image {key[:12]} is not in the cache")
    arrays, _ = cachelib.decode_arrays(payload)
    image = cachelib.decode_png(arrays["image_png"].tobytes())
    return image, arrays["residual"], arrays["attribution"].astype(np.float32)


def support_image(cache: cachelib.Cache, key: str) -> np.ndarray | None:
    """The (H, W, 3) uint8 support image under ``key``, or None when the cache does not hold it."""
    try:
        return load_support(cache, key)[0]
    except KeyError:
        return None


def _batched(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> torch.Tensor:
    """Run ``fn`` over fixed-shape batches (the last zero-padded) so results never depend on N. The results stay
    where ``fn`` put them (the models' device): support features go from the networks to the prototypes without a
    round trip through host memory (gigabytes for 32 images of SD features)."""
    outs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
        outs.append(fn(chunk)[:n])
    return torch.cat(outs)


def support_masks(
    cache: cachelib.Cache, models: Models, keys: list[str], support: SupportTensors, opts: SynthOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """fg, bg (N, S, S) bool masks at the support image's resolution (REFERENCE 3).

    CutLER sees the unquantised images (``support.floats``, as the reference runs it at sampling time), MaskCut's
    DINO the saved ones. Proposals of proposal-based maskers are cached per image (bit-packed).
    """
    masker = build_class_masker(opts, models)
    attr = support.attribution
    if not masker.proposal_based:
        return masker.masks(attr, grid_attribution=support.grid_attribution)
    size = tuple(attr.shape[1:])
    fields = _masker_fields(models, masker)
    pkeys = [cachelib.make_key("proposals", PROPOSALS_VERSION, support=k, **fields) for k in keys]
    proposals: list[torch.Tensor | None] = [None] * len(keys)
    for i, k in enumerate(pkeys):
        payload = cache.get("proposals", k)
        if payload is not None:
            proposals[i] = _unpack_masks(payload, size)
    todo = [i for i in range(len(keys)) if proposals[i] is None]
    if todo:
        feats = None
        if masker.needs_features:
            # On the models' device: MaskCut's eigenproblems are milliseconds on a GPU, seconds on a CPU.
            dino = build_extractor("dino", models)
            feats = _batched(support.images[todo], dino.maskcut_keys, batch_size(opts, models))
        for i, props in zip(todo, masker.propose(attr[todo], feats, support.floats[todo]), strict=True):
            proposals[i] = props.cpu()
            packed = np.packbits(props.cpu().numpy().astype(bool).reshape(-1))
            cache.put("proposals", pkeys[i], cachelib.encode_arrays({"masks": packed}, {"count": len(props)}))
    pairs = [masks.select_masks(p, a) for p, a in zip(proposals, attr, strict=True)]
    return masks.stack_masks(pairs, attr)


def _unpack_masks(payload: bytes, size: tuple[int, int]) -> torch.Tensor:
    """A cached proposals entry -> (R, *size) bool."""
    arrays, meta = cachelib.decode_arrays(payload)
    count = int(meta["count"])
    bits = np.unpackbits(arrays["masks"])[: count * size[0] * size[1]]
    return torch.from_numpy(bits.astype(bool).reshape(count, *size))


@dataclass
class SupportTensors:
    """A class's support set on the models' device, ready for masks and features (N images of side S).

    Attributes:
        images: (N, 3, S, S) float32 in [0, 1], the saved bytes / 255: what the feature extractors see.
        floats: (N, 3, S, S) float32 in [0, 1], the unquantised images (to 1/512 of a grey level): what CutLER
            sees (REFERENCE 1).
        attribution: (N, S, S) float32 in [0, 1] at the image size: what masks are chosen on.
        grid_attribution: (N, G, G) float32 in [0, 1] on the latent grid, as captured.
    """

    images: torch.Tensor
    floats: torch.Tensor
    attribution: torch.Tensor
    grid_attribution: torch.Tensor


def support_tensors(
    cache: cachelib.Cache, models: Models, keys: list[str], fresh: dict[str, synthesis.SupportImage] | None = None
) -> SupportTensors:
    """A class's support images and attribution maps on the models' device (see :class:`SupportTensors`).

    Images generated in this run (``fresh``) are taken as they are, already on the device; the others are read from
    the cache (PNG and raw residual, lossless: the same values).
    """
    fresh = fresh or {}
    pixels, residuals, maps = [], [], []
    for key in keys:
        if key in fresh:
            pixels.append(fresh[key].pixels.to(models.device).permute(1, 2, 0))
            residuals.append(fresh[key].residual_pixels.to(models.device).permute(1, 2, 0))
            maps.append(torch.from_numpy(fresh[key].attribution))
        else:
            image, residual, attr = load_support(cache, key)
            pixels.append(torch.from_numpy(image).to(models.device))
            residuals.append(torch.from_numpy(residual).to(models.device))
            maps.append(torch.from_numpy(attr))
    # (N, H, W, 3) viewed as (N, 3, H, W): channels-last memory, the layout the networks have always been given
    # (convolutions' last bits depend on it, and with them the cached banks).
    saved, residual = torch.stack(pixels).permute(0, 3, 1, 2), torch.stack(residuals).permute(0, 3, 1, 2)
    grid = torch.stack(maps).to(models.device)
    return SupportTensors(
        images=saved.float() / 255,
        floats=synthesis.restore_float(saved, residual),
        attribution=attribution.at_image_size(grid, saved.shape[-1]),
        grid_attribution=grid,
    )


def build_class_bank(
    cache: cachelib.Cache,
    models: Models,
    class_name: str,
    keys: list[str],
    opts: SynthOptions,
    timings: Timings | None = None,
    fresh: dict[str, synthesis.SupportImage] | None = None,
) -> prototypes.PrototypeBank:
    """Masks, features and prototypes of one class from its support images: those generated in this run
    (``fresh``, see :func:`support_tensors`) and the cached ones. ``timings`` accumulates "decode" (cache reads,
    PNG decoding, attribution upsampling), "masks", "features" and "prototypes"."""
    timings = timings or Timings()
    with timings("decode"):
        support = support_tensors(cache, models, keys, fresh)
    with timings("masks"):
        fg, bg = support_masks(cache, models, keys, support, opts)
    features = {}
    with timings("features"):
        for name in opts.extractors:
            ext = build_extractor(name, models)
            run = lambda x, ext=ext: ext(x, support=True)  # noqa: E731
            features[name] = _batched(support.images, run, batch_size(opts, models))
    with timings("prototypes"):
        return prototypes.build_bank(
            class_name,
            features,
            fg,
            bg,
            k=opts.k,
            seed=D.KMEANS_SEED,
            support_keys=keys,
            meta=bank_meta(opts, models),
        )


def synthesize(
    classes: Iterable[ClassSpec],
    opts: SynthOptions,
    models: Models,
    cache: cachelib.Cache,
    progress: Progress | None = None,
) -> list[ClassResult]:
    """Support sets and prototype banks for ``classes``, computing only what the cache lacks.

    A cached bank is enough: its support images are not needed (nor regenerated) unless the bank is rebuilt,
    so banks imported from another machine work without Stable Diffusion.
    """
    progress = progress or _Silent()
    sync = torch.cuda.synchronize if models.device.type == "cuda" else None
    results = []
    for spec in classes:
        t0 = time.perf_counter()
        loads_before = sum(models.load_seconds.values())
        stages = Timings(sync)
        result = ClassResult(spec.name, spec.stuff)
        keys, result.bank_key = class_keys(models, spec.name, opts)
        payload = cache.get("bank", result.bank_key)
        if payload is not None:
            bank = prototypes.PrototypeBank.from_bytes(payload)
            result.bank_cached = True
            result.images_cached = sum(cache.contains("support", k) for k in keys)
        else:
            # The writer stays open while the bank is built: the last batch's PNGs are encoded meanwhile.
            with SupportWriter(cache, spec.name, stages) as writer:
                support = ensure_support(cache, models, spec.name, opts, progress, stages, writer)
                result.images_generated = support.generated
                result.images_cached = opts.n - result.images_generated
                progress.start(f"{spec.name}: prototypes", 1)
                bank = build_class_bank(cache, models, spec.name, keys, opts, stages, support.fresh)
            payload = bank.to_bytes()
            cache.put("bank", result.bank_key, payload)
            progress.advance()
        result.bank = bank
        result.prototypes = bank.counts()
        result.digest = hashlib.sha256(payload).hexdigest()  # equal digests = byte-identical prototypes
        result.seconds = time.perf_counter() - t0
        result.stages = {k: round(v, 3) for k, v in stages.seconds.items()}
        # "load": networks first loaded while making this class; that time is also inside the stages that needed them.
        result.stages["load"] = round(sum(models.load_seconds.values()) - loads_before, 3)
        results.append(result)
    return results


# --- segment ------------------------------------------------------------------------------------------------------


def missing_banks(classes: Iterable[ClassSpec], opts: SynthOptions, models: Models, cache: cachelib.Cache) -> list[str]:
    """Names of the classes whose prototype bank is not cached yet (no model is loaded to find out)."""
    return [c.name for c in classes if not cache.contains("bank", class_keys(models, c.name, opts)[1])]


def bank_meta(opts: SynthOptions, models: Models) -> dict:
    """The settings a bank records about how it was made (``ovdiff cache ls`` shows them). Batch size and SD
    precision are among them because they are in the support keys: a bank made with others has other keys."""
    return {
        "model_set": models.spec.name,
        "masker": effective_masker(opts, models),
        "n": opts.n,
        "seed": opts.seed,
        "steps": opts.steps,
        "scheduler": opts.scheduler,
        "guidance": opts.guidance,
        "k": opts.k,
        "batch_size": batch_size(opts, models),
        "precision": dtype_name(models.dtype("sd")),
    }


@dataclass
class CachedBank:
    """One cached prototype bank, as ``ovdiff cache ls`` lists it: its class, the settings that made it (the
    bank's ``meta``: model set, n, steps, seed, masker...), its extractors, when it was stored and its size."""

    class_name: str
    key: str
    stored_at: float
    bytes: int
    extractors: list[str]
    meta: dict

    def settings(self) -> str:
        """``"sd15, n 4, steps 30, seed 42, masker maskcut, sd+dino+clip"`` (fields older banks lack are left out)."""
        m = self.meta
        parts = [str(m["model_set"])] if "model_set" in m else []
        parts += [
            f"{name} {m[name]}" for name in ("n", "steps", "seed", "masker", "batch_size", "precision") if name in m
        ]
        return ", ".join([*parts, "+".join(sorted(self.extractors))])


def cached_banks(cache: cachelib.Cache, class_name: str | None = None) -> list[CachedBank]:
    """Every readable bank in the cache (only ``class_name``'s when given), oldest first. Reads each bank's header,
    not its tensors; an entry that is not a readable bank is left out."""
    out = []
    for key, stored_at, size in cache.listing("bank"):
        payload = cache.get("bank", key)
        try:
            info = prototypes.read_bank_info(payload) if payload is not None else None
        except ValueError:
            info = None
        if info is None or (class_name is not None and info["class_name"] != class_name):
            continue
        out.append(CachedBank(info["class_name"], key, stored_at, size, list(info["extractors"]), dict(info["meta"])))
    return out


def support_size_note(opts: SynthOptions, models: Models) -> str | None:
    """A warning, before any work, when --n is large (above D.N_WARN): the cache it fills per class and the memory
    its prototypes need. None otherwise."""
    if opts.n <= D.N_WARN:
        return None
    per_class = opts.n * models.spec.image_size**2 * D.SUPPORT_BYTES_PER_PIXEL
    size = f"{per_class / 1e9:.1f} GB" if per_class >= 1e9 else f"{per_class / 1e6:.0f} MB"
    return (
        f"--n {opts.n:,}: about {size} of cache per class not yet cached, and all {opts.n:,}"
        f" images' masked features held in memory to build its prototypes ({D.N_SUPPORT} is the paper's);"
        " the progress line gives the time left once the first batch is done"
    )


def synthesis_notes(missing: list[str], opts: SynthOptions, models: Models, cache: cachelib.Cache) -> list[str]:
    """What a segment, explain or eval run says before it synthesises classes itself: which ones, why (no bank for
    these settings), and the settings of the banks the cache does hold for them (so a mismatch is visible)."""
    if not missing:
        return []
    wanted = CachedBank("", "", 0.0, 0, list(opts.extractors), bank_meta(opts, models)).settings()
    notes = [
        f"synthesising {len(missing)} {'class' if len(missing) == 1 else 'classes'} first"
        f" ({opts.n} images each; no cached prototypes for {wanted}): {', '.join(missing)}"
    ]
    held: dict[str, list[str]] = {}
    for bank in cached_banks(cache):
        if bank.class_name in missing:
            held.setdefault(bank.class_name, []).append(bank.settings())
    for name in missing:
        if held.get(name):
            shown = "; ".join(dict.fromkeys(held[name]))
            notes.append(f"cached for {name} with other settings: {shown} (pass those options to use them)")
    return notes


def segment_roles(
    classes: list[ClassSpec], synth_opts: SynthOptions, seg_opts: SegmentOptions, models: Models, cache: cachelib.Cache
) -> list[str]:
    """The networks a segment run needs: its extractors, CLIP for the pre-filter, and everything synth needs
    when some class's prototypes are not cached yet."""
    roles = {build_extractor(name, models).role for name in synth_opts.extractors}
    if seg_opts.prefilter and len(classes) > 1:
        roles.add("clip")
    if missing_banks(classes, synth_opts, models, cache):
        roles |= {"sd", "dino", "clip"}
        if effective_masker(synth_opts, models) == "cutler":
            roles.add("cutler")
    return sorted(roles)


def prefilter_clip(models: Models) -> torch.nn.Module:
    """The CLIP network the pre-filter runs: the dense extractor's own, or a copy of it in the pre-filter's dtype
    when the two differ (``--precision auto`` on CUDA: fp16 pre-filter, fp32 dense features, as the reference)."""
    clip = models.get("clip")
    dtype = models.dtype("prefilter")
    if next(clip.parameters()).dtype == dtype:
        return clip
    return copy.deepcopy(clip).to(dtype)


def build_segmenter(
    classes: list[ClassSpec],
    synth_opts: SynthOptions,
    seg_opts: SegmentOptions,
    models: Models,
    cache: cachelib.Cache,
    progress: Progress | None = None,
    compile: bool = False,
) -> Segmenter:
    """The classes' prototype banks (synthesised where missing, exactly as ``synth`` does) made into a
    :class:`Segmenter` on the models' device (``compile``: see Segmenter)."""
    from .filters import ClipPrefilter

    banks = [r.bank for r in synthesize(classes, synth_opts, models, cache, progress)]
    protoset = build_prototype_set(banks, classes, seg_opts.background, seg_opts.stuff_threshold)
    extractors = {name: build_extractor(name, models) for name in synth_opts.extractors}
    prefilter = None
    if seg_opts.prefilter and len(classes) > 1:
        names, stuff = [c.name for c in classes], [c.stuff for c in classes]
        prefilter = ClipPrefilter(prefilter_clip(models), names, seg_opts.eta, stuff)
    sync = torch.cuda.synchronize if models.device.type == "cuda" else None
    sim_dtype = models.dtype("match")
    if seg_opts.batch_size is None and models.device.type == "cpu":
        seg_opts = replace(seg_opts, batch_size=models.spec.cpu_batch_size)  # the set knows its networks' size
    return Segmenter(protoset, extractors, seg_opts, prefilter, models.device, Timings(sync), compile, sim_dtype)


@dataclass
class OutputPlan:
    """Which images still need outputs: ``todo`` pairs each with its files (kind -> path, see
    outputs.output_paths); ``skipped`` counts the images whose outputs are all there already."""

    todo: list[tuple[InputImage, dict[str, Path]]]
    skipped: int


def plan_outputs(
    items: list[InputImage], out_dir: Path, *, overlay: bool = True, scores: bool = False, overwrite: bool = False
) -> OutputPlan:
    """Decide what to segment: images with a missing output (all of them with ``overwrite``). Temp files a
    killed run left for these outputs are deleted on the way."""
    todo, skipped = [], 0
    for item in items:
        paths = outputs.output_paths(out_dir, item.rel, overlay, scores)
        for path in paths.values():
            outputs.remove_stale_temps(path)
        if not overwrite and all(p.exists() for p in paths.values()):
            skipped += 1
        else:
            todo.append((item, paths))
    return OutputPlan(todo, skipped)


@dataclass
class SegmentRun:
    """What ``segment_files`` did. ``interrupted``: Ctrl-C stopped it; what was written is complete."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    timings: Timings = field(default_factory=Timings)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def iter_segmentations(
    todo: Iterable[tuple[InputImage, T]],
    segmenter: Segmenter,
    on_failure: Callable[[InputImage, T, str], None],
) -> Iterator[tuple[InputImage, T, np.ndarray, Segmentation]]:
    """Decode and segment ``todo`` in order: yield (item, its payload, (H, W, 3) uint8 image, segmentation).

    Images are decoded one by one and segmented in groups (their windows go through each network together, in
    fixed-shape batches, so a window's result does not depend on its group; on the CPU with MKL, given the CLI's
    MKL_CBWR strict mode, see cli._environment). A group ends once its windows fill
    whole batches in every stream (Segmenter.batch_counts), so no batch slot is padding, or at ``batch_size``
    images, or once its score maps reach D.GROUP_SCORE_BYTES (large vocabularies on large images). 512x512 inputs
    have one 448 window each, and groups of two, as before, ran six padding slots in every batch of 448 windows. A
    file that cannot be read goes to ``on_failure(item, payload, reason)`` instead, and the others go on.
    """
    group: list[tuple[InputImage, T, np.ndarray]] = []
    size = segmenter.options.batch_size
    counts: list[int] = []
    held = 0

    def flush() -> Iterator[tuple[InputImage, T, np.ndarray, Segmentation]]:
        results = segmenter([torch.from_numpy(img).permute(2, 0, 1) for _, _, img in group])
        for (item, payload, img), seg in zip(group, results, strict=True):
            yield item, payload, img, seg

    for item, payload in todo:
        try:
            with segmenter.timings("decode"):
                img = load_image(item.path, segmenter.options.max_pixels)
        except ImageError as exc:
            on_failure(item, payload, str(exc))
            continue
        group.append((item, payload, img))
        added = segmenter.batch_counts(*img.shape[:2])
        counts = [c + n for c, n in zip(counts or [0] * len(added), added, strict=True)]
        held += segmenter.score_bytes(*img.shape[:2])
        if len(group) >= size or all(c % size == 0 for c in counts) or held >= D.GROUP_SCORE_BYTES:
            yield from flush()
            group, counts, held = [], [], 0
    if group:
        yield from flush()


def writes_in_background(segmenter: Segmenter) -> bool:
    """Whether segment_files writes outputs on a worker thread: when the segmenter runs on an accelerator."""
    return segmenter.device.type != "cpu"


def segment_files(
    plan: OutputPlan,
    segmenter: Segmenter | None,
    legend: dict[str, dict],
    *,
    progress: Progress | None = None,
    on_failure: Callable[[Path, str], None] | None = None,
) -> SegmentRun:
    """Segment the planned images and write their outputs (label PNG, then overlay and scores if planned).

    Outputs are written on a worker thread while the next images are segmented (see
    :func:`outputs.write_image_outputs`). A file that cannot be read or written is reported through
    ``on_failure(path, reason)`` and the others go on. Ctrl-C stops at the next image and returns with
    ``interrupted`` set, once the images already segmented are written; what was written is complete.
    ``segmenter`` may be None only when there is nothing to do.
    """
    progress = progress or _Silent()
    run = SegmentRun(total=len(plan.todo) + plan.skipped, skipped=plan.skipped)
    if segmenter is None:
        if plan.todo:
            raise ValueError("segment_files needs a segmenter when there are images to segment")
        return run
    run.timings = timings = segmenter.timings
    t0 = time.perf_counter()
    ids = list(map(int, legend))
    channels = segmenter.protoset.num_channels

    def failed(item: InputImage, _paths: dict[str, Path], reason: str) -> None:
        run.failed.append((item.path, reason))
        if on_failure is not None:
            on_failure(item.path, reason)
        progress.advance()

    # On an accelerator, outputs are written on a worker thread (overlay drawing, PNG and JPEG encoding) while the
    # device segments the next images; at most WRITE_QUEUE images wait for it, and "write" is the time the run
    # waits for it. On the CPU every core is busy segmenting already: a writer thread would only compete with
    # them (measured: fewer images per second), so outputs are written in line there.
    writes = InOrder(timings, "write", background=writes_in_background(segmenter))

    def settle(limit: int) -> None:
        for (item, paths), future in writes.finished(keep=limit):
            error = future.exception()
            if isinstance(error, OSError):
                failed(item, paths, f"cannot write outputs ({error.strerror or error})")
            elif error is not None:
                raise error
            else:
                run.done += 1
                progress.advance()

    progress.start("segment", len(plan.todo))
    with writes:
        try:
            for item, paths, img, seg in iter_segmentations(plan.todo, segmenter, failed):
                with timings("upsample"):
                    labels = seg.labels()
                    maps = seg.input_scores() if "scores" in paths else None
                kept = np.array([i == 0 or i in seg.kept for i in ids]) if maps is not None else None
                args = (paths, img, labels, legend, channels, maps, kept)
                writes.submit((item, paths), outputs.write_image_outputs, *args)
                settle(WRITE_QUEUE)
            settle(0)
        except KeyboardInterrupt:
            run.interrupted = True
            settle(0)  # the images already segmented are written whole (a few at most)
    run.seconds = time.perf_counter() - t0
    return run


# --- eval ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """What an evaluation pass did: the (C, C) confusion matrix of the scored images, and what failed."""

    confusion: np.ndarray
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)
    interrupted: bool = False
    seconds: float = 0.0
    timings: Timings = field(default_factory=Timings)


class _Scorer:
    """Accumulates confusion matrices sample by sample; a sample that cannot be scored is recorded instead."""

    def __init__(self, spec: DatasetSpec, progress: Progress, on_failure: Callable[[str, str], None] | None):
        self.spec, self.progress, self.on_failure = spec, progress, on_failure
        self.run = EvalRun(np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64))

    def fail(self, sample: Sample, reason: str) -> None:
        self.run.failed.append((sample.id, reason))
        if self.on_failure is not None:
            self.on_failure(sample.id, reason)
        self.progress.advance()

    def score(self, sample: Sample, pred: np.ndarray) -> bool:
        try:
            gt = self.spec.read_labels(sample.label)
            self.run.confusion += evaluation.confusion(pred, gt, self.spec.num_classes)
        except (OSError, ValueError) as exc:
            self.fail(sample, str(exc))
            return False
        self.run.done += 1
        self.progress.advance()
        return True


def evaluate(
    samples: list[Sample],
    spec: DatasetSpec,
    segmenter: Segmenter,
    *,
    save_pred: Path | None = None,
    progress: Progress | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> EvalRun:
    """Segment every sample as ``segment`` does and score it against its ground truth.

    Predictions are mapped to the dataset's ids (see DatasetSpec.to_dataset_ids); with ``save_pred`` they are
    also written as palette PNGs ``<save_pred>/<id>.png``. Ctrl-C stops at the next image with
    ``interrupted`` set.
    """
    scorer = _Scorer(spec, progress or _Silent(), on_failure)
    scorer.progress.start(f"{spec.name}: images", len(samples))
    scorer.run.timings = segmenter.timings
    t0 = time.perf_counter()
    todo = [(InputImage(s.image, PurePosixPath(s.id)), s) for s in samples]
    try:
        for _, sample, _, seg in iter_segmentations(todo, segmenter, lambda _i, s, why: scorer.fail(s, why)):
            with segmenter.timings("upsample"):
                pred = spec.to_dataset_ids(seg.labels())
            if scorer.score(sample, pred) and save_pred is not None:
                path = save_pred / f"{sample.id}.png"
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    outputs.write_labels(path, pred, spec.num_classes)
                except OSError as exc:
                    raise ValueError(f"--save-pred {save_pred}: cannot write {path} ({exc.strerror or exc})") from None
    except KeyboardInterrupt:
        scorer.run.interrupted = True
    scorer.run.seconds = time.perf_counter() - t0
    return scorer.run


def prediction_files(pred_dir: Path) -> dict[str, Path]:
    """Label PNGs under ``pred_dir`` by file stem; ValueError if the folder is missing or a stem repeats."""
    if not pred_dir.is_dir():
        raise ValueError(f"--pred-dir {pred_dir}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.rglob("*.png")):
        if path.stem in found:
            raise ValueError(f"--pred-dir {pred_dir}: {found[path.stem]} and {path} have the same name")
        found[path.stem] = path
    return found


def score_predictions(
    samples: list[Sample],
    spec: DatasetSpec,
    pred_dir: Path,
    *,
    progress: Progress | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> EvalRun:
    """Score existing label PNGs (values = the dataset's ids) against the ground truth; no model is loaded.

    A prediction is matched by file stem: the image id (``2007_000033``) or the image file's stem
    (``frankfurt_000000_000294_leftImg8bit``), so ``segment``'s outputs match too.
    """
    from PIL import Image

    files = prediction_files(pred_dir)
    matched = [s for s in samples if PurePosixPath(s.id).name in files or s.image.stem in files]
    if samples and not matched:  # the wrong folder: one line, not one error per image
        first = PurePosixPath(samples[0].id).name
        raise ValueError(
            f"--pred-dir {pred_dir}: no prediction for any of the {len(samples)} images"
            f" ({len(files)} PNG files there; expected names such as {first}.png)"
        )
    scorer = _Scorer(spec, progress or _Silent(), on_failure)
    scorer.progress.start(f"{spec.name}: predictions", len(samples))
    t0 = time.perf_counter()
    for sample in samples:
        path = files.get(PurePosixPath(sample.id).name) or files.get(sample.image.stem)
        if path is None:
            scorer.fail(sample, f"no prediction {PurePosixPath(sample.id).name}.png in {pred_dir}")
            continue
        try:
            with Image.open(path) as img:
                pred = np.array(img).astype(np.int64)
        except OSError as exc:
            scorer.fail(sample, f"cannot read prediction {path} ({exc})")
            continue
        scorer.score(sample, pred)
    scorer.run.seconds = time.perf_counter() - t0
    return scorer.run


def prediction_folder(save_pred: Path, seed: int, seeds: list[int]) -> Path:
    """Where ``--save-pred`` puts one seed's predictions: the folder itself (one seed) or ``seed-S`` in it."""
    return save_pred if len(seeds) == 1 else save_pred / f"seed-{seed}"


def check_save_pred(save_pred: Path, samples: list[Sample], seeds: list[int]) -> None:
    """Refuse, before any work, a ``--save-pred`` folder that cannot be written or where a prediction
    ``<id>.png`` would replace one of the dataset's own files (its labels folder given by mistake).

    Raises:
        ValueError: one line naming the folder and the first file it would replace.
    """
    what = f"--save-pred {save_pred}"
    outputs.check_writable(save_pred, what, folder=True)
    dataset_files = {Path(os.path.realpath(f)): f for s in samples for f in (s.image, s.label)}
    for seed in seeds:
        where = prediction_folder(save_pred, seed, seeds)
        for sample in samples:
            theirs = dataset_files.get(Path(os.path.realpath(where / f"{sample.id}.png")))
            if theirs is not None:
                raise ValueError(f"{what}: a prediction would replace the dataset's {theirs}; choose another folder")


def evaluate_seeds(
    samples: list[Sample],
    spec: DatasetSpec,
    classes: list[ClassSpec],
    synth: SynthOptions,
    seg: SegmentOptions,
    models: Models,
    cache: cachelib.Cache,
    seeds: list[int],
    *,
    save_pred: Path | None = None,
    progress: Progress | None = None,
    on_failure: Callable[[str, str], None] | None = None,
    on_seed: Callable[[int, EvalRun], None] | None = None,
    compile: bool = False,
) -> tuple[dict[int, np.ndarray], list[tuple[str, str]], bool]:
    """:func:`evaluate` once per seed, each with the support sets (and prototypes) of that seed.

    Predictions go to ``save_pred`` (one seed) or ``save_pred/seed-S`` (several).

    Returns:
        (seed -> confusion matrix, failed (image id, reason) pairs, whether Ctrl-C stopped it).
    """
    confusions: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    for seed in seeds:
        segmenter = build_segmenter(classes, replace(synth, seed=seed), seg, models, cache, progress, compile)
        where = prediction_folder(save_pred, seed, seeds) if save_pred is not None else None
        result = evaluate(samples, spec, segmenter, save_pred=where, progress=progress, on_failure=on_failure)
        confusions[seed] = result.confusion
        failed += [(f"{i} (seed {seed})" if len(seeds) > 1 else i, why) for i, why in result.failed]
        if on_seed is not None:
            on_seed(seed, result)
        if result.interrupted:
            return confusions, failed, True
    return confusions, failed, False


def eval_context(models: Models, synth: SynthOptions, seg: SegmentOptions, classes: list[ClassSpec]) -> dict:
    """What an eval result records about how it was made (and what shards must share to be merged): the models
    and their precision, every option, and the prompts and thing/stuff types the classes were segmented with."""
    return {
        "models": {
            "name": models.spec.name,
            "hashes": models.hashes,
            "meaningful": models.spec.meaningful,
            "precision": models.precision,
        },
        "options": {
            "synth": {k: v for k, v in asdict(synth).items() if k != "seed"},
            "segment": asdict(seg),
            "prompts": [{"name": c.name, "stuff": c.stuff, "type_from": c.stuff_from} for c in classes],
        },
    }
