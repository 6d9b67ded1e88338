"""The benchmark datasets of paper section 4, as mmsegmentation lays them out: where the files are, the class
lists, and how ground-truth ids are read. Data, plus one loader and the pick of training images that
``eval --support-from train`` uses as support sets; light (Pillow and numpy only).

With background (paper Table 1): ``voc`` (21 classes), ``context`` (60), ``object`` (81; COCO-Object, made from
COCO-Stuff-164k by ``ovdiff eval prepare object``). Without background (paper 4.4, Table 4; no bg prototypes,
the background label is ignored): ``voc20``, ``context59``, ``ade`` (150), ``stuff`` (171), ``cityscapes`` (19).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import defaults as D
from .evaluation import IGNORE_INDEX

VOC = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
CONTEXT = [
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
]  # fmt: skip
COCO_THINGS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
COCO_STUFF_ONLY = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]  # fmt: skip
ADE = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
CITYSCAPES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip

# The reference's prompt names (REFERENCE 8): per benchmark family, then overrides for ambiguous words that hold
# in every benchmark.
PAPER_PROMPTS: dict[str, dict[str, str]] = {
    "voc": {"aeroplane": "airplane", "diningtable": "table", "tvmonitor": "monitor", "pottedplant": "potted plant"},
    "context": {"aeroplane": "airplane", "diningtable": "table", "tvmonitor": "monitor", "pottedplant": "plant"},
}
AMBIGUOUS = {
    "tank": "liquid tank",
    "blind": "window blinds",
    "hood": "cooker hood",
    "ashcan": "wastebin",
    "case": "shop case",
    "keyboard": "computer keyboard",
    "apparel": "clothing",
}
PROMPT_NAMES = ("paper", "plain")

# Benchmark spellings that make poor prompts.
_READABLE = {
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "window-blind": "window blind",
    "playingfield": "playing field",
}


def readable(name: str) -> str:
    """The prompt for a benchmark class name: ``pottedplant`` -> ``potted plant``; COCO-Stuff's ``sky-other`` ->
    ``sky``, ``desk-stuff`` -> ``desk``, ``wall-brick`` -> ``brick wall``."""
    name = name.strip()
    if name in _READABLE:
        return _READABLE[name]
    for tail in ("-other", "-stuff"):
        if name.endswith(tail):
            return name.removesuffix(tail)
    if "-" in name:
        head, _, kind = name.partition("-")
        return f"{kind} {head}"
    return name


@dataclass(frozen=True)
class DatasetSpec:
    """Where a benchmark's files are and what its labels mean.

    Attributes:
        name: the DATASET argument.
        folder: the dataset folder as mmseg's docs name it, relative to its usual parent (e.g.
            ``VOCdevkit/VOC2012``); ``--root`` may point at it or at the folder above it.
        images, labels: folders relative to the dataset folder; ``{split}`` is replaced by the split's folder name.
        list_file: a split file of image ids (``{split}`` replaced), or None to take every image under ``images``.
        image_suffix, label_suffix: file name endings after the image id.
        classes: the label names in id order, as the benchmark spells them.
        background: whether label 0 is a background class that eq. 4 predicts (else the no-background protocol).
        reduce_zero_label: ground truth 0 is ignored and k becomes k - 1 (mmseg's reduce_zero_label).
        split_folders: split name -> folder name where they differ (ADE's ``validation``, COCO's ``val2017``).
        val_images: the benchmark's number of val images (for messages).
        prepare: the command that creates the labels, when the dataset does not ship them.
    """

    name: str
    folder: str
    images: str
    labels: str
    list_file: str | None
    image_suffix: str
    label_suffix: str
    classes: tuple[str, ...]
    background: bool
    reduce_zero_label: bool = False
    split_folders: tuple[tuple[str, str], ...] = ()
    val_images: int = 0
    prepare: str = ""
    family: str = ""  # "voc" or "context": which of the reference's prompt-name tables applies

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def vocabulary(self, prompt_names: str = "paper") -> list[str]:
        """The prompts segment uses, in label order (background excluded: it comes from bg prototypes).

        ``paper``: the reference's prompt names for VOC and Context and its overrides of ambiguous words (ADE's
        "tank" is "liquid tank"), else the readable form. ``plain``: the readable form of every benchmark name
        (``pottedplant`` -> "potted plant", COCO-Stuff's ``wall-brick`` -> "brick wall"), no overrides.
        """
        if prompt_names not in PROMPT_NAMES:
            raise ValueError(f"--prompt-names {prompt_names!r}: expected one of {', '.join(PROMPT_NAMES)}")
        names = self.classes[1:] if self.background else self.classes
        if prompt_names == "plain":
            return [readable(c) for c in names]
        table = {**PAPER_PROMPTS.get(self.family, {}), **AMBIGUOUS}
        return [table.get(c, readable(c)) for c in names]

    def split_folder(self, split: str) -> str:
        return dict(self.split_folders).get(split, split)

    def to_dataset_ids(self, labels: np.ndarray) -> np.ndarray:
        """segment's label ids (0 = background, i = i-th class) -> this dataset's ids."""
        return labels if self.background else labels - 1

    def read_labels(self, path: Path) -> np.ndarray:
        """(H, W) int64 ground-truth ids in [0, C) or IGNORE_INDEX, read as mmseg reads them (Pillow indices)."""
        from PIL import Image

        with Image.open(path) as img:
            gt = np.array(img).astype(np.int64)
        if gt.ndim != 2:
            raise ValueError(f"{path}: a label map must have one channel, this one has shape {gt.shape}")
        if self.reduce_zero_label:
            gt = np.where(gt == 0, IGNORE_INDEX, gt - 1)
            gt[gt == IGNORE_INDEX - 1] = IGNORE_INDEX
        return gt


DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


_VOC = {
    "folder": "VOCdevkit/VOC2012",
    "images": "JPEGImages",
    "labels": "SegmentationClass",
    "list_file": "ImageSets/Segmentation/{split}.txt",
    "image_suffix": ".jpg",
    "label_suffix": ".png",
    "val_images": 1449,
}
_CONTEXT = {
    "folder": "VOCdevkit/VOC2010",
    "images": "JPEGImages",
    "labels": "SegmentationClassContext",
    "list_file": "ImageSets/SegmentationContext/{split}.txt",
    "image_suffix": ".jpg",
    "label_suffix": ".png",
    "val_images": 5105,
}
_COCO = {
    "folder": "coco_stuff164k",
    "images": "images/{split}",
    "labels": "annotations/{split}",
    "list_file": None,
    "image_suffix": ".jpg",
    "split_folders": (("val", "val2017"), ("train", "train2017")),
    "val_images": 5000,
}
_register(DatasetSpec("voc", classes=tuple(VOC), background=True, family="voc", **_VOC))
_register(DatasetSpec("voc20", classes=tuple(VOC[1:]), background=False, reduce_zero_label=True, family="voc", **_VOC))
_register(DatasetSpec("context", classes=tuple(CONTEXT), background=True, family="context", **_CONTEXT))
_register(
    DatasetSpec(
        "context59", classes=tuple(CONTEXT[1:]), background=False, reduce_zero_label=True, family="context", **_CONTEXT
    )
)
_register(
    DatasetSpec(
        "object",
        classes=("background", *COCO_THINGS),
        background=True,
        label_suffix="_instanceTrainIds.png",
        prepare="ovdiff eval prepare object --coco-stuff-root ROOT",
        **_COCO,
    )
)
_register(
    DatasetSpec(
        "stuff",
        classes=(*COCO_THINGS, *COCO_STUFF_ONLY),
        background=False,
        label_suffix="_labelTrainIds.png",
        prepare="mmsegmentation's tools/dataset_converters/coco_stuff164k.py",
        **_COCO,
    )
)
_register(
    DatasetSpec(
        "ade",
        folder="ade/ADEChallengeData2016",
        images="images/{split}",
        labels="annotations/{split}",
        list_file=None,
        image_suffix=".jpg",
        label_suffix=".png",
        classes=tuple(ADE),
        background=False,
        reduce_zero_label=True,
        split_folders=(("val", "validation"), ("train", "training")),
        val_images=2000,
    )
)
_register(
    DatasetSpec(
        "cityscapes",
        folder="cityscapes",
        images="leftImg8bit/{split}",
        labels="gtFine/{split}",
        list_file=None,
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
        classes=tuple(CITYSCAPES),
        background=False,
        val_images=500,
        prepare="mmsegmentation's tools/dataset_converters/cityscapes.py",
    )
)


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"DATASET {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark: its id (relative path without suffix), image and label files."""

    id: str
    image: Path
    label: Path


def dataset_root(spec: DatasetSpec, root: Path, split: str) -> Path:
    """The dataset folder: ``root`` itself, its subfolder of the dataset's name (``root`` = VOCdevkit), or the
    whole mmseg path below it (``root`` = mmseg's data/ folder).

    Raises:
        ValueError: none holds the image folder (one line saying which folder was expected).
    """
    if not root.is_dir():
        raise ValueError(f"--root {root}: no such folder")
    images = spec.images.format(split=spec.split_folder(split))
    for candidate in (root, root / spec.folder.split("/")[-1], root / spec.folder):
        if (candidate / images).is_dir():
            return candidate
    raise ValueError(
        f"--root {root}: expected the {spec.name} folder {spec.folder} (or its parent), with {images}/ inside;"
        f" {root / images} is missing"
    )


def list_samples(spec: DatasetSpec, root: Path, split: str = "val") -> list[Sample]:
    """Every (image, label) pair of a split, sorted by id.

    Raises:
        ValueError: the root, the split file, an image or a label file is missing (one line naming it).
    """
    base = dataset_root(spec, root, split)
    folder = spec.split_folder(split)
    images = base / spec.images.format(split=folder)
    labels = base / spec.labels.format(split=folder)
    if not labels.is_dir():
        hint = f"; create it with {spec.prepare}" if spec.prepare else ""
        raise ValueError(f"--root {root}: the label folder {labels} is missing{hint}")
    if spec.list_file is not None:
        listing = base / spec.list_file.format(split=split)
        if not listing.is_file():
            raise ValueError(f"--root {root}: the split file {listing} is missing (is --split {split} right?)")
        ids = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        ids = []
        for dirpath, dirnames, filenames in os.walk(images):
            dirnames.sort()
            rel = Path(dirpath).relative_to(images)
            ids += [
                (rel / f).as_posix().removesuffix(spec.image_suffix) for f in filenames if f.endswith(spec.image_suffix)
            ]
    samples = [Sample(i, images / f"{i}{spec.image_suffix}", labels / f"{i}{spec.label_suffix}") for i in sorted(ids)]
    if not samples:
        raise ValueError(f"--root {root}: no images ending in {spec.image_suffix} in {images}")
    for s in samples:
        if not s.image.is_file():
            raise ValueError(f"--root {root}: image {s.image} (listed for id {s.id}) is missing")
        if not s.label.is_file():
            hint = f" (create the labels with {spec.prepare})" if spec.prepare else ""
            raise ValueError(f"--root {root}: label file {s.label} is missing{hint}")
    return samples


# --- COCO-Object from COCO-Stuff-164k -----------------------------------------------------------------------------

# Raw COCO-Stuff label values are COCO category ids - 1: things 0..89 with ten unused ids, stuff 91..181, and 255
# for unlabeled. COCO-Object keeps the 80 things as 1..80 and makes everything else background 0 (GroupViT's
# convert_coco_object: stuff and unlabeled alike), so its label maps hold no ignore pixels.
COCO_THING_RAW_IDS = tuple(i for i in range(90) if i not in {11, 25, 28, 29, 44, 65, 67, 68, 70, 82})
OBJECT_SUFFIX = "_instanceTrainIds.png"


def coco_object_lut() -> np.ndarray:
    """(256,) uint8 lookup table: raw COCO-Stuff value -> COCO-Object id (0 background, 1..80 things)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(COCO_THING_RAW_IDS)] = np.arange(1, len(COCO_THING_RAW_IDS) + 1)
    return lut


def prepare_coco_object(root: Path, split: str = "val", overwrite: bool = False, progress=None) -> tuple[int, int]:
    """Write COCO-Object label maps next to COCO-Stuff-164k's raw ones.

    Reads ``annotations/<split>2017/<id>.png`` (the raw stuffthingmaps) under ``root`` (the coco_stuff164k
    folder or its parent) and writes ``<id>_instanceTrainIds.png`` beside each, atomically.

    Returns:
        (written, skipped) file counts; existing outputs are skipped unless ``overwrite``.

    Raises:
        ValueError: the folder has no raw label maps (one line saying what was expected).
    """
    from PIL import Image

    from .outputs import atomic_path

    spec = DATASETS["object"]
    folder = spec.split_folder(split)
    base = next((c for c in (root, root / "coco_stuff164k") if (c / "annotations" / folder).is_dir()), None)
    if base is None:
        raise ValueError(
            f"--coco-stuff-root {root}: expected COCO-Stuff-164k with annotations/{folder}/ holding the raw"
            " stuffthingmaps PNGs (as mmsegmentation's docs lay it out)"
        )
    raw = sorted(p for p in (base / "annotations" / folder).glob("*.png") if "TrainIds" not in p.name)
    if not raw:
        raise ValueError(f"--coco-stuff-root {root}: no raw label maps (<id>.png) in {base / 'annotations' / folder}")
    lut = coco_object_lut()
    written = skipped = 0
    if progress is not None:
        progress.start("COCO-Object labels", len(raw))
    for path in raw:
        out = path.with_name(path.stem + OBJECT_SUFFIX)
        if out.exists() and not overwrite:
            skipped += 1
        else:
            with Image.open(path) as img:
                labels = lut[np.array(img)]
            with atomic_path(out) as tmp:
                Image.fromarray(labels).save(tmp, format="PNG")
            written += 1
        if progress is not None:
            progress.advance()
    return written, skipped


# --- support sets from the training split (eval --support-from train) ----------------------------------------------

# Where eval's support sets come from: generated (the paper's), or the benchmark's own annotated training images.
SUPPORT_FROM = ("synthetic", "train")


def vocabulary_ids(spec: DatasetSpec) -> np.ndarray:
    """(V,) int64: the dataset id of each vocabulary entry, V = len(spec.vocabulary()).

    Entry i is segment's label i + 1 (label 0 is background), mapped by :meth:`DatasetSpec.to_dataset_ids`: with
    background (voc, context, object) id i + 1, since the dataset's id 0 is its background class; without (voc20,
    ade, ...) id i, reduce-zero-label having already moved the stored ids down by one.
    """
    return spec.to_dataset_ids(np.arange(1, spec.num_classes - spec.background + 1, dtype=np.int64))


class ClassIndex:
    """Which vocabulary entries each training image's ground truth holds, read when first asked for and remembered.

    Only ids and small sets of entry indices are kept, never label arrays, so memory stays small on COCO's 118k
    training images, and several seeds' picks read each label map at most once. A label map that cannot be read
    is remembered in :attr:`unreadable` ((id, reason), in the order met) and holds no class.
    """

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        ids = vocabulary_ids(spec)
        # dataset id -> vocabulary entry; ids outside the table (the background class, 255) map to -1
        self._entry = np.full(max(int(ids.max()), IGNORE_INDEX) + 1, -1, dtype=np.int64)
        self._entry[ids] = np.arange(len(ids))
        self._known: dict[str, frozenset[int]] = {}
        self.unreadable: list[tuple[str, str]] = []
        self.reads = 0  # label maps read so far (for tests and progress)

    def classes_of(self, sample: Sample) -> frozenset[int]:
        """The vocabulary entries (indices into spec.vocabulary()) present in ``sample``'s ground truth."""
        found = self._known.get(sample.id)
        if found is None:
            self.reads += 1
            try:
                gt = self.spec.read_labels(sample.label).ravel()
            except (OSError, ValueError, SyntaxError) as exc:  # Pillow's decoding errors; ValueError: not one channel
                self.unreadable.append((sample.id, str(exc)))
                gt = np.empty(0, dtype=np.int64)
            # Only the ids the vocabulary can hold (a 16-bit or signed map's stray values are no class, like 255), then
            # a count per id: linear, where np.unique sorts.
            gt = gt[(gt >= 0) & (gt < len(self._entry))]
            values = np.flatnonzero(np.bincount(gt, minlength=len(self._entry)))
            entries = self._entry[values]
            found = frozenset(int(e) for e in entries[entries >= 0])
            self._known[sample.id] = found
        return found


@dataclass(frozen=True)
class Shots:
    """One seed's pick of training images as support sets (``eval --support-from train``).

    Attributes:
        seed: the seed that ordered the training images.
        shots: K, the images wanted per class.
        picked: per vocabulary entry (in spec.vocabulary() order), the picked samples in pick order: K of them, or
            every image of the split holding the class when it has fewer (none: the class is not in the split).
        looked_at: training images looked at until every class had K (all of them when some class never does).
        total: training images in the split.
    """

    seed: int
    shots: int
    picked: tuple[tuple[Sample, ...], ...]
    looked_at: int
    total: int


def shot_order(samples: list[Sample], seed: int) -> list[Sample]:
    """The training images in seed ``seed``'s shuffled order: by sha256 of ``"<seed>:<id>"``. A seeded shuffle that
    depends on nothing else: no random stream (the same on every numpy), and adding or removing an image of the
    split moves no other image in the order."""
    return sorted(samples, key=lambda s: hashlib.sha256(f"{seed}:{s.id}".encode()).digest())


def pick_shots(
    spec: DatasetSpec,
    samples: list[Sample],
    shots: int = D.SHOTS,
    seed: int = D.SEED,
    *,
    index: ClassIndex | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Shots:
    """For every class of the benchmark's vocabulary (not the background label), ``shots`` training images whose
    ground truth holds it: the first ones in :func:`shot_order`, an image counting for every class it holds.

    Label maps are read in that order, and reading stops as soon as every class has ``shots`` images, so a
    benchmark whose classes are common reads a small part of its split (a class that is missing or rarer than
    ``shots`` makes it read all of them). ``index`` remembers what was read, for the next seed's pick (give the
    same one to every seed of a run). ``on_progress(looked_at, total)`` is called after each image.

    Args:
        samples: the training split, as :func:`list_samples` returns it (``split="train"``).

    Raises:
        ValueError: ``shots`` below 1.
    """
    if shots < 1:
        raise ValueError(f"--shots {shots}: must be at least 1")
    index = index or ClassIndex(spec)
    picked: list[list[Sample]] = [[] for _ in range(len(vocabulary_ids(spec)))]
    wanting = len(picked)  # classes with fewer than ``shots`` images so far
    looked_at = 0
    for sample in shot_order(samples, seed):
        looked_at += 1
        for entry in sorted(index.classes_of(sample)):
            if len(picked[entry]) < shots:
                picked[entry].append(sample)
                if len(picked[entry]) == shots:
                    wanting -= 1
        if on_progress is not None:
            on_progress(looked_at, len(samples))
        if wanting == 0:
            break
    return Shots(seed, shots, tuple(tuple(p) for p in picked), looked_at, len(samples))
