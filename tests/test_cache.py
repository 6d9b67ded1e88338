"""Tests for ovdiff_cli.cache: keys, codecs, envelope checks, corruption, concurrency, info/clear."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import diskcache
import numpy as np
import pytest

from ovdiff_cli import cache as cache_mod
from ovdiff_cli.cache import (
    FORMAT_VERSION,
    Cache,
    CacheError,
    decode_arrays,
    decode_png,
    default_cache_dir,
    encode_arrays,
    encode_png,
    make_key,
)

BIG = 70 * 1024  # above diskcache's 32 KiB min_file_size, so the value lives in its own .val file
ENVELOPE = 8 + 32


def big_payload(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, BIG, dtype=np.uint8).tobytes()


def value_file(c: Cache, stage: str, key: str) -> Path:
    """Path of the .val file diskcache wrote for a large entry."""
    with c._cache.get(Cache._db_key(stage, key), read=True) as fh:
        return Path(fh.name)


# -- default_cache_dir -----------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OVDIFF_CACHE", str(tmp_path / "x"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("OVDIFF_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "ovdiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ovdiff"


# -- make_key --------------------------------------------------------------------------------------


def test_make_key_order_independent_and_sensitive() -> None:
    a = make_key("feat", 1, prompt="a cat", seed=3, cfg={"x": 1, "y": [1.5, None, True]})
    b = make_key("feat", 1, cfg={"y": [1.5, None, True], "x": 1}, seed=3, prompt="a cat")
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0
    assert make_key("feat", 1, prompt="a cat", seed=4, cfg={"x": 1, "y": [1.5, None, True]}) != a
    assert make_key("feat", 2, prompt="a cat", seed=3, cfg={"x": 1, "y": [1.5, None, True]}) != a
    assert make_key("mask", 1, prompt="a cat", seed=3, cfg={"x": 1, "y": [1.5, None, True]}) != a


def test_make_key_canonical_form() -> None:
    # Pin the canonical JSON so an accidental change (which would orphan every user's cache) fails loudly.
    expected = '{"a":[1,2],"name":"café","stage":"s","version":1}'
    assert make_key("s", 1, name="café", a=(1, 2)) == hashlib.sha256(expected.encode()).hexdigest()
    assert make_key("s", 1, a=(1, (2, 3))) == make_key("s", 1, a=[1, [2, 3]])


@pytest.mark.parametrize(
    "bad", [np.zeros(3), np.int64(3), Path("x"), {1: "int key"}, {"s": {1, 2}}, b"bytes", object()]
)
def test_make_key_rejects_non_json(bad: object) -> None:
    with pytest.raises(TypeError):
        make_key("s", 1, field=bad)


def test_make_key_rejects_nan() -> None:
    with pytest.raises(ValueError):
        make_key("s", 1, x=float("nan"))


# -- codecs ----------------------------------------------------------------------------------------


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "feat": rng.standard_normal((4, 5, 3)).astype(np.float16),
        "img": rng.integers(0, 256, (6, 7, 3), dtype=np.uint8),
        "idx": rng.integers(-300, 300, (9,), dtype=np.int16),
        "mask": rng.random((3, 4)) > 0.5,
        "strided": np.arange(20, dtype=np.int16)[::3],  # non-contiguous view
        "scalar": np.array(2.5, dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.uint8),
    }


def test_arrays_round_trip() -> None:
    arrays = sample_arrays()
    meta = {"class": "cat", "n": 3, "sizes": [1, 2]}
    out, got_meta = decode_arrays(encode_arrays(arrays, meta))
    assert got_meta == meta
    assert set(out) == set(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype, name
        assert out[name].shape == arr.shape, name
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].flags.writeable
    assert decode_arrays(encode_arrays({"a": np.zeros(2, np.uint8)}))[1] == {}


def test_arrays_deterministic() -> None:
    arrays = sample_arrays()
    data = encode_arrays(arrays, {"b": 1, "a": 2})
    reordered = dict(reversed(list(arrays.items())))
    copies = {k: v.copy() for k, v in reordered.items()}
    assert encode_arrays(copies, {"a": 2, "b": 1}) == data
    assert b"pickle" not in data and not data.startswith(b"\x80")


def test_arrays_deterministic_across_processes() -> None:
    # Digests are compared across runs, so hash-seed or allocator differences must not leak into the bytes.
    code = (
        "import hashlib, numpy as np; from ovdiff_cli.cache import encode_arrays;"
        "a={'z': np.arange(12, dtype=np.float16).reshape(3, 4), 'b': np.ones(5, bool),"
        " 'm': np.arange(3, dtype=np.int16)};"
        "print(hashlib.sha256(encode_arrays(a, {'k': [1, 'x'], 'a': None})).hexdigest())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_png_round_trip_and_deterministic() -> None:
    img = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = encode_png(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert encode_png(img.copy()) == data
    assert b"tIME" not in data and b"tEXt" not in data
    out = decode_png(data)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8)]
)
def test_png_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_png(bad)


# -- Cache basics --------------------------------------------------------------------------------------------


def test_round_trip_and_stats(tmp_path: Path) -> None:
    with Cache(tmp_path / "c") as c:
        assert c.get("feat", "k1") is None
        c.put("feat", "k1", b"hello")
        c.put("feat", "big", big_payload(0))
        assert c.get("feat", "k1") == b"hello"
        assert c.get("feat", "big") == big_payload(0)
        assert c.get("feat", "k1") == b"hello"
        assert c.get("mask", "k1") is None  # stages are separate namespaces
        c.put("feat", "k1", b"")  # overwrite, empty payload is a valid value
        assert c.get("feat", "k1") == b""
        assert c.stats == {
            "feat": {"hits": 4, "misses": 1, "corrupt": 0, "writes": 3},
            "mask": {"hits": 0, "misses": 1, "corrupt": 0, "writes": 0},
        }
    # A second process-lifetime (new object) sees the data and starts with fresh counters.
    with Cache(tmp_path / "c") as c:
        assert c.get("feat", "big") == big_payload(0)
        assert c.stats == {"feat": {"hits": 1, "misses": 0, "corrupt": 0, "writes": 0}}


def test_large_value_is_a_file(tmp_path: Path) -> None:
    with Cache(tmp_path) as c:
        c.put("s", "k", big_payload(1))
        path = value_file(c, "s", "k")
        assert path.suffix == ".val" and path.stat().st_size == BIG + ENVELOPE


# -- corruption ------------------------------------------------------------------------------------


def _truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: BIG // 2])


def _zero(path: Path, other: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _swap(path: Path, other: Path) -> None:
    path.write_bytes(other.read_bytes())  # a perfectly valid envelope, but for another key


def _delete(path: Path, other: Path) -> None:
    path.unlink()


def _flip_one_byte(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _zero, _swap, _delete, _flip_one_byte])
def test_corrupt_file_entry_is_dropped(tmp_path: Path, damage) -> None:
    with Cache(tmp_path) as c:
        c.put("feat", "a", big_payload(1))
        c.put("feat", "b", big_payload(2))
        damage(value_file(c, "feat", "a"), value_file(c, "feat", "b"))

        assert c.get("feat", "a") is None
        assert c.stats["feat"]["corrupt"] == 1
        assert Cache._db_key("feat", "a") not in c._cache  # the entry is gone
        assert c.info()["feat"]["entries"] == 1
        assert c.get("feat", "a") is None  # now a plain miss
        assert c.stats["feat"]["corrupt"] == 1

        assert c.get("feat", "b") == big_payload(2)  # the neighbour is untouched
        c.put("feat", "a", big_payload(1))
        assert c.get("feat", "a") == big_payload(1)
        assert c.stats["feat"] == {"hits": 2, "misses": 2, "corrupt": 1, "writes": 3}
    with diskcache.Cache(str(tmp_path)) as dc:
        assert dc.check() == []


def test_unreadable_file_is_corrupt(tmp_path: Path) -> None:
    # A directory where the file should be makes open() fail even for root (chmod 000 would not).
    with Cache(tmp_path) as c:
        c.put("feat", "a", big_payload(1))
        path = value_file(c, "feat", "a")
        path.unlink()
        path.mkdir()
        assert c.get("feat", "a") is None
        assert c.stats["feat"]["corrupt"] == 1
        assert Cache._db_key("feat", "a") not in c._cache
        c.put("feat", "a", big_payload(1))
        assert c.get("feat", "a") == big_payload(1)


@pytest.mark.parametrize(
    "raw",
    [b"garbage", b"", 12345, "text", cache_mod._MAGIC + bytes(32) + b"payload"],
    ids=["garbage", "empty", "int", "str", "bad-digest"],
)
def test_corrupt_inline_entry_is_dropped(tmp_path: Path, raw: object) -> None:
    with Cache(tmp_path) as c:
        c.put("mask", "k", b"small value")
        c._cache.set(Cache._db_key("mask", "k"), raw, tag="mask")
        assert c.get("mask", "k") is None
        assert c.stats["mask"]["corrupt"] == 1
        assert Cache._db_key("mask", "k") not in c._cache
        c.put("mask", "k", b"small value")
        assert c.get("mask", "k") == b"small value"


def test_inline_swap_between_keys_is_detected(tmp_path: Path) -> None:
    with Cache(tmp_path) as c:
        c.put("s", "a", b"AAA")
        c.put("s", "b", b"BBB")
        raw_b = c._cache.get(Cache._db_key("s", "b"))
        c._cache.set(Cache._db_key("s", "a"), raw_b, tag="s")
        assert c.get("s", "a") is None
        assert c.get("s", "b") == b"BBB"


# -- concurrency -----------------------------------------------------------------------------------


def _payload_for(i: int) -> bytes:
    # Mix inline (sqlite) and file-backed values; identical in both writers, as real stages are.
    return big_payload(i) if i % 3 == 0 else f"value-{i}".encode() * (i + 1)


def _writer(directory: str, start: mp.synchronize.Event, n: int) -> None:
    start.wait(30)
    with Cache(directory) as c:
        for i in range(n):
            c.put("feat", f"k{i}", _payload_for(i))
            if i % 5 == 0:
                c.put("proto", f"k{i}", _payload_for(i + 1))
        for i in range(n):
            assert c.get("feat", f"k{i}") == _payload_for(i), i
        assert c.stats["feat"]["corrupt"] == 0


def test_two_processes_fill_same_cache(tmp_path: Path) -> None:
    directory = str(tmp_path / "shared")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    n = 40
    procs = [ctx.Process(target=_writer, args=(directory, start, n)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with Cache(directory) as c:
        for i in range(n):
            assert c.get("feat", f"k{i}") == _payload_for(i)
        assert c.stats["feat"] == {"hits": n, "misses": 0, "corrupt": 0, "writes": 0}
        assert c.info()["feat"]["entries"] == n
    with diskcache.Cache(directory) as dc:
        assert dc.check() == []


# -- opening ---------------------------------------------------------------------------------------


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my_photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not a cache")
    with pytest.raises(CacheError, match="my_photos") as exc:
        Cache(folder)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]  # nothing was written there


def test_refuses_file_path(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(CacheError, match="afile"):
        Cache(path)


def test_refuses_broken_database(tmp_path: Path) -> None:
    (tmp_path / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CacheError, match=str(tmp_path.name)):
        Cache(tmp_path)


def test_accepts_empty_and_new_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    Cache(tmp_path / "empty").close()
    Cache(tmp_path / "deep" / "new").close()
    with diskcache.Cache(str(tmp_path / "deep" / "new")) as dc:
        assert dc.get(cache_mod._MARKER_KEY) == FORMAT_VERSION


def test_refuses_newer_format(tmp_path: Path) -> None:
    Cache(tmp_path).close()
    with diskcache.Cache(str(tmp_path)) as dc:
        dc.set(cache_mod._MARKER_KEY, FORMAT_VERSION + 1)
    with pytest.raises(CacheError, match="newer"):
        Cache(tmp_path)


def test_settings_never_evict(tmp_path: Path) -> None:
    with Cache(tmp_path) as c:
        assert c._cache.eviction_policy == "none"
        assert c._cache.size_limit >= 2**60


# -- info / clear ----------------------------------------------------------------------------------


def test_info_and_clear(tmp_path: Path) -> None:
    with Cache(tmp_path) as c:
        assert c.info() == {}
        c.put("feat", "a", big_payload(1))
        c.put("feat", "b", b"12345")
        c.put("proto", "a", b"xy")
        assert c.info() == {
            "feat": {"entries": 2, "bytes": BIG + 5 + 2 * ENVELOPE},
            "proto": {"entries": 1, "bytes": 2 + ENVELOPE},
        }
        assert c.clear("feat") == 2
        assert c.get("feat", "a") is None and c.get("proto", "a") == b"xy"
        assert c.info() == {"proto": {"entries": 1, "bytes": 2 + ENVELOPE}}
        assert c.clear("nothing") == 0
        c.put("mask", "m", b"m")
        assert c.clear() == 2
        assert c.info() == {}
        assert cache_mod._MARKER_KEY in c._cache  # the format marker survives a full clear
    Cache(tmp_path).close()
    assert not [p for p in tmp_path.rglob("*.val")]  # cleared file-backed values are removed from disk
