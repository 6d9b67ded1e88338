"""Nothing escapes: no unpickling of shared files, no file outside the cache or --out, validated imports."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import diskcache
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovdiff_cli import cache as cachelib
from ovdiff_cli import sharing
from ovdiff_cli.cache import Cache
from ovdiff_cli.cli import app

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[2] / "ovdiff_cli"
TINY = ["--models", "tiny", "--n", "2", "--steps", "2", "--k", "3", "--quiet"]


class Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_pickled_value_in_a_shared_cache_is_never_unpickled(tmp_path):
    folder = tmp_path / "cache"
    with Cache(folder):
        pass
    marker = tmp_path / "pwned"
    with diskcache.Cache(str(folder)) as raw:  # someone writes a pickle into the shared cache
        raw.set("bank/" + "0" * 64, Exploit(marker), tag="bank")
    with Cache(folder) as cache:
        assert cache.get("bank", "0" * 64) is None  # read as corrupt, dropped
        assert cache.stats["bank"]["corrupt"] == 1
    assert not marker.exists()


def test_a_file_name_leaving_the_cache_is_neither_read_nor_deleted(tmp_path):
    folder = tmp_path / "cache"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    with Cache(folder) as cache:
        cache.put("support", "1" * 64, b"x" * 100_000)  # large: stored as a file
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute("UPDATE Cache SET filename = ? WHERE key = ?", ("../victim.txt", "support/" + "1" * 64))
    with Cache(folder) as cache:
        assert cache.get("support", "1" * 64) is None
    assert victim.read_text() == "keep me"


def test_no_unsafe_deserialisation_in_the_package():
    """No pickle, no torch.load without weights_only=True, no allow_pickle=True anywhere in ovdiff_cli."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "pickle.load" not in text and "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


# --- export / import ------------------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path) -> Path:
    cache = tmp_path / "source"
    assert runner.invoke(app, ["synth", "cat", "sky", *TINY, "--cache-dir", str(cache)]).exit_code == 0
    result = runner.invoke(app, ["cache", "export", str(tmp_path / "banks.ovd"), "--cache-dir", str(cache)])
    assert result.exit_code == 0 and "exported 2 prototype banks (cat, sky)" in result.output, result.output
    return tmp_path / "banks.ovd"


def import_into(tmp_path: Path, file: Path):
    target = tmp_path / "target"
    result = runner.invoke(app, ["cache", "import", str(file), "--cache-dir", str(target)])
    with Cache(target) as cache:
        stored = {s: len(sharing._stage_keys(cache, s)) for s in ("bank", "support")}
    return result, stored


def test_export_with_support_imports_every_image_and_leaves_out_old_banks(tmp_path):
    """--with-support carries the support entries whole (image, flooring residual, attribution) and import accepts
    them; a bank an earlier ovdiff wrote (another bank format) is left out of the export instead of failing it."""
    cache = tmp_path / "source"
    assert runner.invoke(app, ["synth", "cat", *TINY, "--cache-dir", str(cache)]).exit_code == 0
    with Cache(cache) as c:
        key = sharing._stage_keys(c, "bank")[0]
        old = cachelib.encode_arrays({"x": np.zeros(1, np.uint8)}, {"ovdiff": {"version": 2}})
        c.put("bank", "0" * 64, old)
        n_support = len(sharing._stage_keys(c, "support"))
    assert n_support > 0
    file = tmp_path / "banks.ovd"
    cmd = ["cache", "export", str(file), "--with-support", "--cache-dir", str(cache)]
    result = runner.invoke(app, cmd)
    assert result.exit_code == 0 and f"1 prototype banks and {n_support} support images" in result.output, result.output
    result, stored = import_into(tmp_path, file)
    assert result.exit_code == 0, result.output
    assert stored == {"bank": 1, "support": n_support}
    with Cache(tmp_path / "target") as target, Cache(cache) as source:
        assert target.get("bank", key) == source.get("bank", key)


def test_export_then_import_then_segment_needs_no_generation(exported, tmp_path):
    result, stored = import_into(tmp_path, exported)
    assert result.exit_code == 0 and "2 new, 0 already there" in result.output, result.output
    assert stored == {"bank": 2, "support": 0}
    again = runner.invoke(app, ["synth", "cat", "sky", *TINY, "--json", "--cache-dir", str(tmp_path / "target")])
    doc = json.loads(again.stdout)
    assert [(c["images_generated"], c["images_cached"]) for c in doc["classes"]] == [(0, 0), (0, 0)]  # banks only
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    seg = [
        "segment",
        str(photo),
        "--classes",
        "cat,sky",
        *TINY,
        "--short-side",
        "64",
        "--scales",
        "64",
        "--stride",
        "32",
    ]
    result = runner.invoke(app, [*seg, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "target")])
    assert result.exit_code == 0, result.output
    with Cache(tmp_path / "target") as cache:
        assert sharing._stage_keys(cache, "support") == []  # nothing was generated to segment
    why = ["explain", str(photo), "--xy", "3,4", "--classes", "cat,sky", *TINY, "--short-side", "64", "--scales", "64"]
    result = runner.invoke(
        app, [*why, "--stride", "32", "--out", str(tmp_path / "why.png"), "--cache-dir", str(tmp_path / "target")]
    )
    assert result.exit_code == 0 and (tmp_path / "why.png").exists(), result.output  # crops: "not in this cache"


def rewrite(exported: Path, out: Path, change) -> Path:
    """A copy of the export whose manifest/payloads went through ``change(arrays, meta)``."""
    arrays, meta = cachelib.decode_arrays(exported.read_bytes())
    change(arrays, meta)
    out.write_bytes(cachelib.encode_arrays(arrays, meta))
    return out


def flip_a_byte(arrays, meta):
    arrays["e0"] = arrays["e0"].copy()
    arrays["e0"][len(arrays["e0"]) // 2] ^= 0x01


def lie_about_class(arrays, meta):
    meta["entries"][0]["class"] = "dog"


def forge_digest(arrays, meta):
    flip_a_byte(arrays, meta)  # and make the digest match the damaged bytes: the bank itself must not parse
    arrays["e0"][8:16] = 0xFF
    meta["entries"][0]["sha256"] = hashlib.sha256(arrays["e0"].tobytes()).hexdigest()


def bad_key(arrays, meta):
    meta["entries"][0]["key"] = "../../etc/passwd"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (flip_a_byte, "sha256 mismatch"),
        (lie_about_class, "the manifest says 'dog'"),
        (forge_digest, "entry 0"),
        (bad_key, "bad stage"),
    ],
)
def test_tampered_exports_are_refused_whole(exported, tmp_path, change, needle):
    result, stored = import_into(tmp_path, rewrite(exported, tmp_path / "bad.ovd", change))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert stored == {"bank": 0, "support": 0}  # nothing entered the cache, not even the good entries


def test_files_that_are_not_exports(exported, tmp_path):
    truncated = tmp_path / "t.ovd"
    truncated.write_bytes(exported.read_bytes()[:200])
    other = tmp_path / "o.ovd"
    other.write_bytes(cachelib.encode_arrays({"x": np.zeros(3, np.uint8)}, {"format": "something-else"}))
    for file, needle in [(truncated, "not an ovdiff export file"), (other, "format 'something-else'"),
                         (tmp_path / "missing.ovd", "no such file")]:  # fmt: skip
        result, _ = import_into(tmp_path, file)
        assert result.exit_code == 2 and needle in result.output, result.output
