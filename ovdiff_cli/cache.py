"""Content-addressed cache for every expensive stage (see DESIGN.md, section "Cache").

One ``diskcache`` index lives under the cache directory; diskcache keeps small values inline in sqlite and
writes large ones (PNG bytes, float16 arrays) to their own files. Keys come from :func:`make_key`, the sha256
of a canonical JSON of everything that determines an entry, so a changed input simply misses.

Every value is wrapped in an envelope (magic + digest + payload) and verified on read: a corrupt, truncated,
swapped or vanished entry is dropped and reported as a miss, so the caller recomputes it instead of trusting
bad bytes. Values are raw bytes (safetensors, PNG), never pickles.

This module is imported by light commands (``ovdiff cache info``): it must not import torch, and numpy,
safetensors and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import diskcache

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheError",
    "decode_arrays",
    "decode_png",
    "default_cache_dir",
    "encode_arrays",
    "encode_png",
    "make_key",
]

#: Layout version of what this module writes (envelope, key naming, marker). Bump on incompatible change.
FORMAT_VERSION = 1

# Untagged entry holding FORMAT_VERSION; stage entries are always tagged, so stats/info/clear skip it.
_MARKER_KEY = "__ovdiff_cache_format__"
_MAGIC = b"OVDC\x00\x01\r\n"  # 8 bytes; the \r\n catches text-mode mangling, like PNG's signature
_DIGEST_LEN = 32
_META_FIELD = "ovdiff"  # the one safetensors metadata string that carries our JSON meta
_STAT_NAMES = ("hits", "misses", "corrupt", "writes")
_MISSING = object()


# What the pipeline caches (ovdiff_cli/pipeline/): support images with their attribution, mask proposals,
# prototype banks.
STAGES = ("support", "proposals", "bank")


class CacheError(Exception):
    """The cache directory cannot be used (not a cache, newer format, unreadable database)."""


class CacheWriteError(Exception):
    """Writing an entry failed (disk full, permissions); nothing of that entry is left behind."""


class SafeDisk(diskcache.Disk):
    """diskcache's storage layer, made safe for a cache shared with other users.

    Stock diskcache unpickles values and keys stored in pickle mode and follows the file names its database
    holds. A crafted database could then run code, or read or delete files outside the cache folder. ovdiff
    writes only str keys and bytes values, so this refuses every pickle and every file name that leaves the
    folder. A refused value reads as corrupt (dropped and recomputed); a refused removal is skipped.
    """

    def _inside(self, name: str) -> bool:
        root = os.path.realpath(self._directory)
        return os.path.realpath(os.path.join(root, name)).startswith(root + os.sep)

    def get(self, key, raw):
        if not raw:
            raise ValueError("refusing a pickled cache key")
        return super().get(key, raw)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("refusing a pickled cache value")
        if filename is not None and not self._inside(filename):
            raise ValueError(f"refusing cache file {filename!r} outside the cache folder")
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path):
        if self._inside(file_path):
            super().remove(file_path)

    def _write(self, full_path, iterator, mode, encoding=None):
        # A write that fails half-way (disk full) must not leave an orphan partial file in the cache folder.
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            with contextlib.suppress(OSError):
                os.removedirs(os.path.dirname(full_path))  # the empty subfolders made for it (not the cache's own)
            raise


def default_cache_dir() -> Path:
    """Return ``$OVDIFF_CACHE`` if set, else ``$XDG_CACHE_HOME/ovdiff``, else ``~/.cache/ovdiff``."""
    if os.environ.get("OVDIFF_CACHE"):
        return Path(os.environ["OVDIFF_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ovdiff"
    return Path.home() / ".cache" / "ovdiff"


def _jsonable(value: Any, where: str) -> Any:
    """Return ``value`` with tuples turned into lists; raise TypeError for anything not plainly JSON.

    json.dumps alone would accept too much (int/None dict keys silently become strings) and its error for an
    array does not say which field; keys must be explicit, so we check ourselves.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"cache key field {where}: dict key {k!r} is not a str")
        return {k: _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"cache key field {where}: {type(value).__name__} is not JSON-able; pass it explicitly")


def _canonical_json(obj: Any, where: str) -> str:
    """Canonical JSON: sorted keys, compact, UTF-8 kept as is, NaN/inf rejected (ValueError)."""
    return json.dumps(_jsonable(obj, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def make_key(stage: str, version: int, **fields: Any) -> str:
    """Return the sha256 hex digest of the canonical JSON of ``{"stage", "version", **fields}``.

    Fields may be str, int, float, bool, None, lists/tuples and str-keyed dicts of those (tuples hash like
    lists). Anything else (a numpy array, a Path, ...) raises TypeError; NaN or infinity raise ValueError.
    """
    text = _canonical_json({"stage": stage, "version": version, **fields}, "key")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """Serialise named arrays plus a JSON-able ``meta`` dict to safetensors bytes (no pickle).

    Deterministic: equal arrays and meta give identical bytes whatever the dict order, so callers can hash
    the result as a content digest.
    """
    import numpy as np
    from safetensors.numpy import save

    # safetensors reads raw memory from the data pointer, so a strided view must be made contiguous first
    # (asarray, not ascontiguousarray: the latter turns a 0-d array into shape (1,)).
    flat = {str(name): np.asarray(arr, order="C") for name, arr in arrays.items()}
    return save(flat, metadata={_META_FIELD: _canonical_json(meta or {}, "meta")})


def decode_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`encode_arrays`: return ``(arrays, meta)``; arrays are writable copies."""
    from safetensors.numpy import load

    # safetensors.numpy.load drops the metadata; the header is an 8-byte little-endian length plus JSON.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    meta_text = (header.get("__metadata__") or {}).get(_META_FIELD)
    meta = json.loads(meta_text) if meta_text else {}
    return {name: arr.copy() for name, arr in load(bytes(data)).items()}, meta


def encode_png(img: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) RGB image as PNG bytes; deterministic (no timestamp or text chunks)."""
    import numpy as np
    from PIL import Image

    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise ValueError(f"encode_png wants a uint8 (H, W, 3) array, got {getattr(img, 'dtype', type(img))} {shape}")
    buf = io.BytesIO()
    # Fixed compression settings: the bytes must not depend on Pillow's defaults changing.
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a writable uint8 (H, W, 3) RGB array."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


class Cache:
    """The ovdiff cache: one diskcache index under ``directory``, values checked on every read.

    ``stats[stage]`` counts hits, misses, corrupt and writes made through this object (this process only).
    """

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory).expanduser()
        self.directory = path
        self.stats: dict[str, dict[str, int]] = {}
        if path.exists() and not path.is_dir():
            raise CacheError(f"cache path {path} exists and is not a directory")
        # Refuse to scatter diskcache files into someone's unrelated folder (e.g. a mistyped --cache-dir).
        if path.is_dir() and any(path.iterdir()) and not (path / diskcache.core.DBNAME).is_file():
            raise CacheError(f"{path} is not empty and is not an ovdiff cache; pick an empty or cache folder")
        try:
            # We never evict silently: with eviction off a full disk is an error the user sees, not lost work.
            self._cache = diskcache.Cache(
                str(path),
                disk=SafeDisk,
                size_limit=2**62,
                eviction_policy="none",
                statistics=False,
                tag_index=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(f"cannot open cache {path}: {exc}") from exc
        try:
            # add() is atomic, so two processes opening a fresh cache agree on the marker.
            self._cache.add(_MARKER_KEY, FORMAT_VERSION, retry=True)
            found = self._cache.get(_MARKER_KEY, retry=True)
        except sqlite3.Error as exc:
            self._cache.close()
            raise CacheError(f"cannot read cache {path}: {exc}") from exc
        if type(found) is not int:
            self._cache.close()
            raise CacheError(f"cache {path} has an unrecognised format marker {found!r}")
        if found > FORMAT_VERSION:
            self._cache.close()
            raise CacheError(
                f"cache {path} has format version {found!r}, newer than this ovdiff's {FORMAT_VERSION};"
                " upgrade ovdiff or use another cache folder"
            )

    # -- envelope ---------------------------------------------------------------------------------------

    @staticmethod
    def _db_key(stage: str, key: str) -> str:
        return f"{stage}/{key}"

    @staticmethod
    def _digest(db_key: str, payload: bytes) -> bytes:
        # The digest covers the key too, so a file swapped in from another (valid) entry is also caught.
        h = hashlib.sha256(db_key.encode("utf-8"))
        h.update(b"\0")
        h.update(payload)
        return h.digest()

    def _count(self, stage: str, what: str) -> None:
        self.stats.setdefault(stage, dict.fromkeys(_STAT_NAMES, 0))[what] += 1

    # -- public API -------------------------------------------------------------------------------------

    def get(self, stage: str, key: str) -> bytes | None:
        """Return the payload stored under ``(stage, key)``, or None on a miss or a corrupt entry.

        A corrupt entry (bad magic or digest, vanished or unreadable file) is deleted and counted both as
        ``corrupt`` and as a miss, so ``misses`` is always the number of values the caller must recompute.
        """
        db_key = self._db_key(stage, key)
        value = self._fetch(db_key)
        if value is _MISSING and db_key in self._cache:
            # diskcache answers "missing" when the row exists but its file vanished or cannot be read.
            # Look once more in case another process rewrote the entry between our two reads.
            value = self._fetch(db_key)
            if value is _MISSING and db_key in self._cache:
                value = None  # row without readable value: corrupt
        if value is _MISSING:
            self._count(stage, "misses")
            return None
        payload = self._unwrap(db_key, value)
        if payload is None:
            # Drop it so the next put starts clean; another process would recompute identical bytes.
            self._cache.delete(db_key, retry=True)
            self._count(stage, "corrupt")
            self._count(stage, "misses")
            return None
        self._count(stage, "hits")
        return payload

    def _fetch(self, db_key: str) -> Any:
        try:
            return self._cache.get(db_key, default=_MISSING, retry=True)
        except (sqlite3.Error, diskcache.Timeout):
            raise  # a locked or broken database is not a bad entry; let the caller see it
        except Exception:
            return None  # e.g. an unpicklable value written by someone else: treat as corrupt

    def _unwrap(self, db_key: str, value: Any) -> bytes | None:
        head = len(_MAGIC) + _DIGEST_LEN
        if type(value) is not bytes or len(value) < head or not value.startswith(_MAGIC):
            return None
        payload = value[head:]
        if value[len(_MAGIC) : head] != self._digest(db_key, payload):
            return None
        return payload

    def contains(self, stage: str, key: str) -> bool:
        """Whether an entry exists, without reading or verifying it (``get`` still may find it corrupt)."""
        return self._db_key(stage, key) in self._cache

    def put(self, stage: str, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``(stage, key)`` (tagged with ``stage``); the last writer wins."""
        db_key = self._db_key(stage, key)
        payload = bytes(payload)
        try:
            self._cache.set(db_key, _MAGIC + self._digest(db_key, payload) + payload, tag=stage, retry=True)
        except (OSError, sqlite3.OperationalError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CacheWriteError(
                f"cannot write to the cache {self.directory} ({reason}); free some space or use another --cache-dir"
            ) from exc
        self._count(stage, "writes")

    def info(self) -> dict[str, dict[str, int]]:
        """Return ``{stage: {"entries": n, "bytes": stored bytes incl. envelopes}}`` for the whole cache."""
        # diskcache has no public per-tag summary; its table keeps inline values in `value` (size 0) and
        # file-backed ones' length in `size`. One aggregate query beats reading every entry back.
        rows = self._cache._sql(
            "SELECT tag, COUNT(*), SUM(CASE WHEN filename IS NULL THEN COALESCE(LENGTH(value), 0)"
            " ELSE size END) FROM Cache WHERE tag IS NOT NULL GROUP BY tag ORDER BY tag"
        ).fetchall()
        return {str(tag): {"entries": int(n), "bytes": int(size or 0)} for tag, n, size in rows}

    def listing(self, stage: str) -> list[tuple[str, float, int]]:
        """``(key, stored at (Unix time), stored bytes)`` of every entry of ``stage``, oldest first."""
        rows = self._cache._sql(
            "SELECT key, store_time, CASE WHEN filename IS NULL THEN COALESCE(LENGTH(value), 0) ELSE size END"
            " FROM Cache WHERE tag = ? ORDER BY store_time",
            (stage,),
        ).fetchall()
        prefix = stage + "/"
        return [(str(k).removeprefix(prefix), float(t), int(n or 0)) for k, t, n in rows]

    def clear(self, stage: str | None = None) -> int:
        """Remove every entry of ``stage`` (all stages if None) and return how many; the marker stays."""
        stages = [stage] if stage is not None else list(self.info())
        return sum(self._cache.evict(s, retry=True) for s in stages)

    def close(self) -> None:
        """Close the sqlite connection (the object can still be reopened by diskcache on next use)."""
        self._cache.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
