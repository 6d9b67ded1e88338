"""Paper section 4 as numbers: confusion matrices, per-class IoU and mIoU the way mmsegmentation computes them,
and partial results from shards that sum to exactly the unsharded result.

Light module (numpy only): scoring saved predictions (``--pred-dir``) and merging shards load no model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = 255
RESULT_FORMAT = "ovdiff-eval/1"


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixel counts of (ground truth, prediction) pairs.

    Args:
        pred: (H, W) integer predicted ids in [0, num_classes).
        gt: (H, W) integer ground-truth ids in [0, num_classes), or ``ignore_index`` for pixels not scored.
        num_classes: C.

    Returns:
        (C, C) int64, ``m[g, p]`` = number of scored pixels with ground truth g predicted as p.

    Raises:
        ValueError: shapes differ, or an id outside its range (the message names the value).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction is {pred.shape[1]} x {pred.shape[0]}, ground truth {gt.shape[1]} x {gt.shape[0]}")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    for what, ids in (("ground truth", gt), ("prediction", pred)):
        bad = ids[(ids < 0) | (ids >= num_classes)]
        if bad.size:
            raise ValueError(f"{what} holds label {int(bad[0])}; expected 0..{num_classes - 1} (or {ignore_index})")
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(C,) float64 IoU = TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def metrics(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU (mean over classes present in ground truth or prediction, as mmseg's nanmean), per-class IoU (None
    for absent classes) and pixel accuracy, from a (C, C) confusion matrix."""
    iou = iou_per_class(conf)
    total = int(conf.sum())
    present = ~np.isnan(iou)
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class": {name: (None if math.isnan(v) else float(v)) for name, v in zip(class_names, iou, strict=True)},
        "pixel_acc": float(np.trace(conf) / total) if total else float("nan"),
        "pixels": total,
    }


def summarise_seeds(mious: Sequence[float]) -> dict[str, float]:
    """Mean and (population) standard deviation of mIoU over seeds, as the paper's "mean +- std"."""
    arr = np.asarray(mious, dtype=np.float64)
    return {"miou": float(arr.mean()), "miou_std": float(arr.std())}


# --- result files -------------------------------------------------------------------------------------------------


def result_doc(
    *,
    dataset: str,
    split: str,
    class_names: Sequence[str],
    confusions: dict[int | None, np.ndarray],
    n_images: int,
    shard: tuple[int, int],
    context: dict[str, Any],
    failed: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """The JSON document ``eval`` writes, complete or partial (a shard's). It holds no timings, so a merged
    result is identical to the unsharded one.

    Args:
        confusions: seed -> (C, C) confusion matrix (seed None when predictions were scored from files).
        shard: (index, count); (0, 1) for a complete run.
        context: models, hashes, options and anything else that must match for shards to be merged.
        failed: {"id", "reason"} per image that could not be scored (not in the matrices).
    """
    per_seed = []
    for seed, conf in confusions.items():
        per_seed.append({"seed": seed, **metrics(conf, class_names), "confusion": conf.astype(np.int64).tolist()})
    doc: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "dataset": dataset,
        "split": split,
        "n_images": n_images,
        "classes": list(class_names),
        "shard": {"index": shard[0], "count": shard[1], "partial": shard[1] > 1},
        **context,
        "failed": sorted(failed, key=lambda f: f["id"]),
    }
    first = per_seed[0]
    doc.update(
        {
            "miou": first["miou"],
            "per_class": first["per_class"],
            "pixel_acc": first["pixel_acc"],
            "seeds": per_seed,
        }
    )
    if len(per_seed) > 1:
        doc.update(summarise_seeds([s["miou"] for s in per_seed]))
    else:
        doc["confusion"] = first["confusion"]  # rows: ground truth, columns: prediction
    return doc


def _json_safe(obj: Any) -> Any:
    # JSON has no NaN: an mIoU over no pixels is written as null.
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(_json_safe(doc), indent=2) + "\n"


def load_result(path: Path) -> dict[str, Any]:
    """Read an eval result file; ValueError (one line) if it is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; expected an eval result file (--save FILE)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON eval result ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
        raise ValueError(f"{path}: not an ovdiff eval result (format {RESULT_FORMAT!r} expected)")
    return doc


# Fields that must agree between the parts of one run for their sum to mean anything.
_MUST_MATCH = ("dataset", "split", "classes", "models", "options", "limit")


def merge(parts: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Sum the confusion matrices of a run's shards into the complete result.

    Args:
        parts: (name for messages, parsed result document) per shard file.

    Raises:
        ValueError: parts of different runs, a shard given twice or missing, or malformed matrices.
    """
    if not parts:
        raise ValueError("no result files to merge")
    name0, first = parts[0]
    count = first["shard"]["count"]
    seen: dict[int, str] = {}
    for name, doc in parts:
        for key in _MUST_MATCH:
            if doc.get(key) != first.get(key):
                raise ValueError(f"{name} and {name0} are from different runs: their {key!r} differ")
        if [s["seed"] for s in doc["seeds"]] != [s["seed"] for s in first["seeds"]]:
            raise ValueError(f"{name} and {name0} are from different runs: their seeds differ")
        index = doc["shard"]["index"]
        if doc["shard"]["count"] != count:
            raise ValueError(f"{name} is shard {index}/{doc['shard']['count']}, {name0} one of {count}")
        if index in seen:
            raise ValueError(f"{name} and {seen[index]} are both shard {index}/{count}")
        seen[index] = name
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise ValueError(f"shard {missing[0]}/{count} is missing: merge needs all {count} parts")
    c = len(first["classes"])
    confusions: dict[int | None, np.ndarray] = {}
    for i, seed_doc in enumerate(first["seeds"]):
        total = np.zeros((c, c), dtype=np.int64)
        for name, doc in parts:
            m = np.asarray(doc["seeds"][i]["confusion"], dtype=np.int64)
            if m.shape != (c, c):
                raise ValueError(f"{name}: confusion matrix is {m.shape}, expected ({c}, {c})")
            total += m
        confusions[seed_doc["seed"]] = total
    context = {k: first[k] for k in first if k not in _RESULT_FIELDS}
    return result_doc(
        dataset=first["dataset"],
        split=first["split"],
        class_names=first["classes"],
        confusions=confusions,
        n_images=sum(doc["n_images"] for _, doc in parts),
        shard=(0, 1),
        context=context,
        failed=[f for _, doc in parts for f in doc.get("failed", [])],
    )


# What result_doc computes itself; everything else in a document is context carried through a merge.
_RESULT_FIELDS = {
    "confusion",
    "failed",
    "format",
    "dataset",
    "split",
    "n_images",
    "classes",
    "shard",
    "miou",
    "miou_std",
    "per_class",
    "pixel_acc",
    "seeds",
}
