"""``ovdiff eval`` end to end (paper section 4, benchmark mIoU): the same segmentation as ``segment`` over a
benchmark's images -> confusion matrices against the ground truth, per seed, with predictions saved on request; or
existing prediction files scored without any model. It writes no cache stage (each seed's banks come through
``synth``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from .. import cache as cachelib
from .. import evaluation, outputs
from ..classes import ClassSpec
from ..datasets import DatasetSpec, Sample
from ..inputs import InputImage
from ..models.loading import Models
from ..segmentation import Segmenter, SegmentOptions
from ..timing import Timings
from .common import Progress, _Silent
from .keys import SynthOptions
from .segment import build_segmenter, iter_segmentations


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
