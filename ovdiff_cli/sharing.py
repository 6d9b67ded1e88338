"""``ovdiff cache export`` / ``import``: prototype banks (and optionally their support images) in one file, to
pre-generate on a GPU machine and segment elsewhere.

The file is safetensors: one uint8 array per cache entry plus a JSON manifest (stage, key, class, sha256 of the
payload). Import checks everything before it writes anything: the container, the manifest's schema, every
payload's digest, and every payload's own schema (a bank must parse as a PrototypeBank with consistent shapes
and dtypes, a support entry as a PNG plus an attribution map). A file that fails any check is refused whole,
with the reason. Nothing in it is ever unpickled.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache as cachelib

EXPORT_FORMAT = "ovdiff-export/1"
STAGES = ("bank", "support")
SUPPORT_ARRAYS = frozenset({"image_png", "residual", "attribution"})  # what pipeline.encode_support writes
# What pipeline.encode_photo writes for a user's photo: with their mask, or with its attribution map.
PHOTO_ARRAYS = (frozenset({"image_png", "mask"}), frozenset({"image_png", "attribution"}))
_KEY = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Entry:
    """One cache entry in an export file."""

    stage: str
    key: str
    class_name: str
    payload: bytes


def _stage_keys(cache: cachelib.Cache, stage: str) -> list[str]:
    # Straight from the index (only str keys, which is all ovdiff writes); values are read through Cache.get.
    rows = cache._cache._sql("SELECT key FROM Cache WHERE tag = ? AND raw = 1 ORDER BY key", (stage,)).fetchall()
    prefix = f"{stage}/"
    return [k[len(prefix) :] for (k,) in rows if isinstance(k, str) and k.startswith(prefix)]


def collect(cache: cachelib.Cache, classes: list[str] | None = None, with_support: bool = False) -> list[Entry]:
    """The cache's prototype banks (of ``classes`` if given), and with ``with_support`` the support images
    they were built from (those still in the cache)."""
    from .prototypes import PrototypeBank

    wanted = set(classes) if classes else None
    entries: list[Entry] = []
    support: dict[str, str] = {}
    for key in _stage_keys(cache, "bank"):
        payload = cache.get("bank", key)
        if payload is None:
            continue  # corrupt: dropped by get, nothing to share
        try:
            bank = PrototypeBank.from_bytes(payload)
        except ValueError:
            continue  # a bank an earlier ovdiff wrote (another format): no run of this one can use it
        if wanted is not None and bank.class_name not in wanted:
            continue
        entries.append(Entry("bank", key, bank.class_name, payload))
        support.update(dict.fromkeys(bank.support_keys, bank.class_name))
    if with_support:
        for key, class_name in sorted(support.items()):
            payload = cache.get("support", key)
            if payload is not None:
                entries.append(Entry("support", key, class_name, payload))
    return entries


def write_export(path: Path, entries: list[Entry]) -> None:
    """Write ``entries`` as one export file (atomically)."""
    from .outputs import save_atomically

    manifest = [
        {"stage": e.stage, "key": e.key, "class": e.class_name, "sha256": hashlib.sha256(e.payload).hexdigest()}
        for e in entries
    ]
    arrays = {f"e{i}": np.frombuffer(e.payload, dtype=np.uint8) for i, e in enumerate(entries)}
    data = cachelib.encode_arrays(arrays, {"format": EXPORT_FORMAT, "entries": manifest})
    save_atomically(path, lambda tmp: tmp.write_bytes(data), str(path))


def _check_payload(stage: str, payload: bytes, class_name: str) -> None:
    """ValueError unless ``payload`` is a well-formed entry of ``stage`` for ``class_name``."""
    if stage == "bank":
        from .prototypes import PrototypeBank

        bank = PrototypeBank.from_bytes(payload)
        if bank.class_name != class_name:
            raise ValueError(f"the bank is for class {bank.class_name!r}, the manifest says {class_name!r}")
        return
    arrays, meta = cachelib.decode_arrays(payload)
    if "sha256" in meta:  # one of the user's photos
        _check_photo(arrays)
        return
    if set(arrays) != SUPPORT_ARRAYS:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise ValueError(f"a support entry holds {held}, expected {', '.join(sorted(SUPPORT_ARRAYS))}")
    image = cachelib.decode_png(arrays["image_png"].tobytes())
    residual, attr = arrays["residual"], arrays["attribution"]
    if (
        image.ndim != 3
        or image.shape[2] != 3
        or residual.shape != image.shape
        or residual.dtype != np.uint8
        or attr.ndim != 2
        or attr.dtype != np.float32
    ):
        raise ValueError(
            f"a support entry has image {image.shape}, residual {residual.shape} {residual.dtype} and attribution"
            f" {attr.shape} {attr.dtype}"
        )


def _check_photo(arrays: dict[str, np.ndarray]) -> None:
    """ValueError unless ``arrays`` are a photo's support entry: its PNG with the user's (S, S) uint8 mask of 0, 1
    and 2, or with a 2-D float32 attribution map."""
    if frozenset(arrays) not in PHOTO_ARRAYS:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise ValueError(f"a photo's support entry holds {held}, expected image_png with mask or attribution")
    image = cachelib.decode_png(arrays["image_png"].tobytes())
    mask, attr = arrays.get("mask"), arrays.get("attribution")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a photo's support entry has image {image.shape}")
    if mask is not None and (mask.shape != image.shape[:2] or mask.dtype != np.uint8 or int(mask.max()) > 2):
        raise ValueError(f"a photo's support entry has mask {mask.shape} {mask.dtype} for image {image.shape}")
    if attr is not None and (attr.ndim != 2 or attr.dtype != np.float32):
        raise ValueError(f"a photo's support entry has attribution {attr.shape} {attr.dtype}")


def read_export(path: Path) -> list[Entry]:
    """Parse and validate an export file completely.

    Raises:
        ValueError: one line saying what is wrong (not an export, unknown format, bad manifest, a digest that
            does not match, a payload that does not parse).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; expected a file written by `ovdiff cache export`") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        arrays, meta = cachelib.decode_arrays(data)
    except Exception:  # safetensors raises its own types; any of them means "not an export file"
        raise ValueError(f"{path}: not an ovdiff export file (not safetensors)") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not an ovdiff export file (format {meta.get('format')!r})")
    manifest = meta.get("entries")
    if not isinstance(manifest, list) or len(manifest) != len(arrays):
        raise ValueError(f"{path}: the manifest does not list the file's {len(arrays)} entries")
    entries = []
    for i, item in enumerate(manifest):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict) or set(item) != {"stage", "key", "class", "sha256"}:
            raise ValueError(f"{where}: malformed manifest record")
        if item["stage"] not in STAGES or not isinstance(item["key"], str) or not _KEY.match(item["key"]):
            raise ValueError(f"{where}: bad stage {item['stage']!r} or key")
        if not isinstance(item["class"], str):
            raise ValueError(f"{where}: bad class name")
        arr = arrays.get(f"e{i}")
        if arr is None or arr.dtype != np.uint8 or arr.ndim != 1:
            raise ValueError(f"{where}: payload missing or not bytes")
        payload = arr.tobytes()
        if hashlib.sha256(payload).hexdigest() != item["sha256"]:
            raise ValueError(f"{where} ({item['class']!r}): sha256 mismatch, the file was modified or damaged")
        try:
            _check_payload(item["stage"], payload, item["class"])
        except ValueError as exc:
            raise ValueError(f"{where} ({item['class']!r}): {exc}") from None
        entries.append(Entry(item["stage"], item["key"], item["class"], payload))
    return entries


def import_entries(cache: cachelib.Cache, entries: list[Entry]) -> tuple[int, int]:
    """Put validated entries into the cache. Returns (added, already present)."""
    added = present = 0
    for e in entries:
        if cache.get(e.stage, e.key) is not None:
            present += 1
        else:
            cache.put(e.stage, e.key, e.payload)
            added += 1
    return added, present


def describe(entries: list[Entry]) -> str:
    """``"2 prototype banks and 8 support images (cat, sky)"``, for messages."""
    banks = sum(e.stage == "bank" for e in entries)
    support = len(entries) - banks
    classes = ", ".join(sorted({e.class_name for e in entries if e.stage == "bank"})) or "no classes"
    return f"{banks} prototype banks" + (f" and {support} support images" if support else "") + f" ({classes})"
