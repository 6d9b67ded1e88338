"""``ovdiff segment`` end to end (paper 3.4, eq. 4): prototype banks (from the cache, synthesised first where
missing) -> eq. 4 over a list of files -> label maps, overlays and scores, written atomically, skipping what exists.

:func:`build_segmenter` also serves ``explain`` (paper 4.5) and ``eval``, and :func:`iter_segmentations`
``eval``. This module writes no cache stage; it reads banks through ``synth``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .. import cache as cachelib
from .. import defaults as D
from .. import outputs
from ..classes import ClassSpec
from ..extractors import build_extractor
from ..inputs import ImageError, InputImage, load_image
from ..models.loading import Models
from ..segmentation import Segmentation, Segmenter, SegmentOptions, build_prototype_set
from ..timing import Timings
from .common import InOrder, Progress, _Silent
from .keys import SynthOptions, effective_masker
from .synth import ClassResult, missing_banks, synthesize

T = TypeVar("T")

# Segmented images whose outputs may wait for the writer thread before the next image waits for them.
WRITE_QUEUE = 4


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
    on_synth: Callable[[list[ClassResult]], None] | None = None,
) -> Segmenter:
    """The classes' prototype banks (synthesised where missing, exactly as ``synth`` does) made into a
    :class:`Segmenter` on the models' device (``compile``: see Segmenter). ``on_synth`` gets synth's results (the
    CLI names the photos they left out)."""
    from ..filters import ClipPrefilter

    results = synthesize(classes, synth_opts, models, cache, progress)
    if on_synth is not None:
        on_synth(results)
    banks = [r.bank for r in results]
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
