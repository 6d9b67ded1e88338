"""``ovdiff eval`` end to end (paper section 4, benchmark mIoU): the same segmentation as ``segment`` over a
benchmark's images -> confusion matrices against the ground truth, per seed, with predictions saved on request; or
existing prediction files scored without any model. It writes no cache stage (each seed's banks come through
``synth``).

Support sets are synthetic (the paper's), or with ``--support-from train`` K of the benchmark's own annotated
training images per class with their ground-truth masks (the user's-masks route of photos.py), a reference point
for the synthetic ones (:class:`TrainSupports`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from .. import cache as cachelib
from .. import defaults as D
from .. import evaluation, outputs, photos
from ..classes import ClassSpec
from ..datasets import ClassIndex, DatasetSpec, Sample, Shots, pick_shots, vocabulary_ids
from ..inputs import InputImage
from ..models.loading import Models
from ..models.registry import hash_file
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
    classes_for: Callable[[int], list[ClassSpec]] | None = None,
    on_synth: Callable[[list], None] | None = None,
) -> tuple[dict[int, np.ndarray], list[tuple[str, str]], bool]:
    """:func:`evaluate` once per seed, each with the support sets (and prototypes) of that seed.

    Predictions go to ``save_pred`` (one seed) or ``save_pred/seed-S`` (several). ``classes_for(seed)``: the
    classes of that seed when their support sets depend on it beyond the generated images (``--support-from
    train``: each seed picks its own training images, see :class:`TrainSupports`); else ``classes`` for every seed.
    ``on_synth``: see :func:`build_segmenter`.

    Returns:
        (seed -> confusion matrix, failed (image id, reason) pairs, whether Ctrl-C stopped it).
    """
    confusions: dict[int, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    for seed in seeds:
        mine = classes_for(seed) if classes_for is not None else classes
        segmenter = build_segmenter(mine, replace(synth, seed=seed), seg, models, cache, progress, compile, on_synth)
        where = prediction_folder(save_pred, seed, seeds) if save_pred is not None else None
        result = evaluate(samples, spec, segmenter, save_pred=where, progress=progress, on_failure=on_failure)
        confusions[seed] = result.confusion
        failed += [(f"{i} (seed {seed})" if len(seeds) > 1 else i, why) for i, why in result.failed]
        if on_seed is not None:
            on_seed(seed, result)
        if result.interrupted:
            return confusions, failed, True
    return confusions, failed, False


def eval_context(
    models: Models,
    synth: SynthOptions,
    seg: SegmentOptions,
    classes: list[ClassSpec],
    *,
    support_from: str = "synthetic",
    shots: int | None = None,
    seed_classes: Mapping[int, list[ClassSpec]] | None = None,
) -> dict:
    """What an eval result records about how it was made (and what shards must share to be merged): the models
    and their precision, every option, and the prompts and thing/stuff types the classes were segmented with.

    ``options.support_from`` and ``options.shots`` (None for synthetic supports) say where the support sets came
    from, so that results of other supports are never merged together. With ``seed_classes`` (seed -> that seed's
    classes, for supports from the training split) ``options.shots_sha256`` also records, per seed, a digest of
    the training images and masks picked (see :func:`support_digest`): shards that picked from different copies
    of the split do not merge either.
    """
    options: dict = {
        "synth": {k: v for k, v in asdict(synth).items() if k != "seed"},
        "segment": asdict(seg),
        "prompts": [{"name": c.name, "stuff": c.stuff, "type_from": c.stuff_from} for c in classes],
        "support_from": support_from,
        "shots": shots,
    }
    if seed_classes is not None:
        options["shots_sha256"] = [{"seed": s, "sha256": support_digest(c)} for s, c in seed_classes.items()]
    return {
        "models": {
            "name": models.spec.name,
            "hashes": models.hashes,
            "meaningful": models.spec.meaningful,
            "precision": models.precision,
        },
        "options": options,
    }


def support_digest(classes: list[ClassSpec]) -> str:
    """sha256 (hex) of the classes' photos as support sets: each class's name with its photos' (content digest,
    mask digest) in support-set order. Names of files do not enter it, so two copies of a split at other paths
    agree."""
    h = hashlib.sha256()
    for spec in classes:
        h.update(f"{spec.name}\0".encode())
        for photo in spec.photo_set.photos if spec.photo_set is not None else ():
            h.update(f"{photo.digest}:{photo.mask_digest or ''}\0".encode())
    return h.hexdigest()


# --- supports from the training split (--support-from train) -------------------------------------------------------

# A note lists at most this many classes by name (ADE has 150: the rest are counted).
_NOTE_NAMES = 10


def shot_photos(
    spec: DatasetSpec, shots: Shots, on_progress: Callable[[int, int], None] | None = None
) -> tuple[list[tuple[photos.Photo, ...]], list[tuple[str, str]]]:
    """The picked training images as photos.Photo, with the ground truth as their masks: per vocabulary entry, its
    photos in pick order (``label`` = the entry's dataset id, so that id is the object, 255 is ignored and the rest
    background). Each image is hashed and its label map read once, whatever the number of classes it was picked
    for, and no label array is kept. ``on_progress(done, total)`` follows the images.

    Returns:
        (photos per vocabulary entry, (image id, reason) of each picked image that could not be read: left out).
    """
    ids = vocabulary_ids(spec)
    entries_of: dict[str, list[int]] = {}
    by_id: dict[str, Sample] = {}
    for entry, samples in enumerate(shots.picked):
        for sample in samples:
            entries_of.setdefault(sample.id, []).append(entry)
            by_id[sample.id] = sample
    found: dict[tuple[int, str], photos.Photo] = {}
    failed: list[tuple[str, str]] = []
    for done, (image_id, entries) in enumerate(entries_of.items(), 1):
        sample = by_id[image_id]
        try:
            gt = spec.read_labels(sample.label)
            digest, size = hash_file(sample.image), photos.displayed_size(sample.image)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's decoding errors include SyntaxError
            failed.append((image_id, str(exc)))
        else:
            for entry in entries:
                label = int(ids[entry])
                # read_mask over the array already read: the digest is exactly that of the mask load_photo reads.
                mask = photos.read_mask(sample.label, label, lambda _path, gt=gt: gt)
                found[entry, image_id] = photos.Photo(
                    name=image_id,
                    path=sample.image,
                    digest=digest,
                    size=size,
                    mask=sample.label,
                    mask_digest=photos.mask_digest(mask),
                    label=label,
                    read_labels=spec.read_labels,
                )
        if on_progress is not None:
            on_progress(done, len(entries_of))
    per_entry = [tuple(found[e, s.id] for s in samples if (e, s.id) in found) for e, samples in enumerate(shots.picked)]
    return per_entry, failed


def _named(names: list[str]) -> str:
    """``"cow (12), sheep (3)"``, the first _NOTE_NAMES of them, and how many more."""
    more = f" and {len(names) - _NOTE_NAMES} more" if len(names) > _NOTE_NAMES else ""
    return ", ".join(names[:_NOTE_NAMES]) + more


class TrainSupports:
    """``--support-from train``: per seed, the benchmark's classes with K of its annotated training images each as
    their support sets, with the ground truth as their masks (photos.py's route 1: fg = the class's pixels, bg =
    the other labelled pixels eroded; void pixels are neither). Each seed picks its own images
    (datasets.pick_shots); a seed's classes are built when first asked for and kept.

    Args:
        spec: the benchmark.
        classes: its vocabulary as ClassSpecs (prompts and thing/stuff types), in spec.vocabulary() order.
        samples: the training split (datasets.list_samples).
        shots: K, training images per class.
        n: generated images added to each class's support set (0: the training images only).
        split: the split's name, for messages.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        classes: list[ClassSpec],
        samples: list[Sample],
        shots: int = D.SHOTS,
        *,
        n: int = 0,
        split: str = "train",
    ) -> None:
        if len(classes) != spec.num_classes - spec.background:
            raise ValueError(f"{spec.name}: {len(classes)} classes given for its {spec.num_classes - spec.background}")
        if shots < 1:
            raise ValueError(f"--shots {shots}: must be at least 1")
        self.spec, self.vocabulary, self.samples = spec, classes, samples
        self.shots, self.n, self.split = shots, n, split
        # the benchmark's own spellings of the vocabulary's classes, for messages (they match the per-class table)
        self.names = list(spec.classes[1:] if spec.background else spec.classes)
        self.index = ClassIndex(spec)
        self._by_seed: dict[int, list[ClassSpec]] = {}
        self.notes: list[str] = []  # said once, after the first seed's pick (they hold for every seed)

    def classes(self, seed: int, progress: Progress | None = None) -> list[ClassSpec]:
        """The classes with seed ``seed``'s training images as their photo sets (and ``n`` generated images each).

        A class that has fewer than K images in the split gets them all, with a note (:attr:`notes`); since its
        pick then read the whole split, every seed finds the same ones and the note is said once. A picked image
        that cannot be read is left out of the class's photo set, in its ``skipped`` with the reason.

        Raises:
            ValueError: a class of which no training image holds a pixel (one line naming the classes and split).
        """
        if seed in self._by_seed:
            return self._by_seed[seed]
        progress = progress or _Silent()
        name = f"{self.spec.name} {self.split}"
        progress.start(f"{name}: {self.shots} images per class (seed {seed})", len(self.samples))
        shown = 0

        def looked(done: int, _total: int) -> None:
            nonlocal shown
            progress.advance(done - shown)
            shown = done

        shots = pick_shots(self.spec, self.samples, self.shots, seed, index=self.index, on_progress=looked)
        progress.advance(len(self.samples) - shown)  # it stops once every class has K: the stage is done
        absent = [self.names[i] for i, p in enumerate(shots.picked) if not p]
        if absent:
            raise ValueError(
                f"--support-from {self.split}: no image of the {self.split} split ({len(self.samples)} images) holds"
                f" {'class' if len(absent) == 1 else 'classes'} {_named(absent)}; such a class has no support set"
            )
        unique = len({s.id for p in shots.picked for s in p})
        progress.start(f"{name}: reading the {unique} picked images (seed {seed})", unique)
        per_entry, failed = shot_photos(self.spec, shots, lambda _done, _total: progress.advance())
        out = []
        for spec, entry, picked in zip(self.vocabulary, per_entry, shots.picked, strict=True):
            gone = tuple((s.id, why) for s in picked for i, why in failed if i == s.id)
            if not entry and not self.n:
                ids = ", ".join(i for i, _ in gone)
                raise ValueError(f"class {spec.name!r}: none of its {self.split} images ({ids}) can be read")
            found = photos.PhotoSet(folder="", photos=tuple(photos.sort_photos(list(entry))), skipped=gone)
            out.append(replace(spec, n=self.n, photo_set=found))
        if not self._by_seed:
            self.notes = self._notes(shots)
        self._by_seed[seed] = out
        return out

    def _notes(self, shots: Shots) -> list[str]:
        """What to say before the run: classes with fewer than K images, and label maps that could not be read."""
        short = [f"{self.names[i]} ({len(p)})" for i, p in enumerate(shots.picked) if len(p) < self.shots]
        notes = []
        if short:
            notes.append(
                f"--shots {self.shots}: the {self.split} split holds fewer images of {len(short)}"
                f" {'class' if len(short) == 1 else 'classes'}, which get them all: {_named(short)}"
            )
        if self.index.unreadable:
            first, why = self.index.unreadable[0]
            notes.append(
                f"{len(self.index.unreadable)} {self.split} label maps could not be read and count for no class"
                f" (first: {first}: {why})"
            )
        return notes

    def picked(self) -> dict[int, list[ClassSpec]]:
        """seed -> classes of every seed built so far (for :func:`eval_context`)."""
        return dict(self._by_seed)
