"""Faults: kill -9 and Ctrl-C mid-run, concurrent processes on one cache, a full disk, half-written outputs.

Real subprocesses with the tiny models. The exhaustive variants (20 kill points, 4 processes) are marked slow and
run with `make test-slow`; the default suite runs a few of each.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovdiff_cli.cache import Cache
from ovdiff_cli.cli import app
from ovdiff_cli.sharing import _stage_keys

SYNTH = ["synth", "cat", "potted plant", "--models", "tiny", "--n", "6", "--steps", "6", "--batch-size", "2"]
SYNTH += ["--k", "3", "--masker", "maskcut", "--json", "--quiet"]
STAGES = ("support", "proposals", "bank")


def synth_cmd(cache: Path) -> list[str]:
    return [sys.executable, "-m", "ovdiff_cli", *SYNTH, "--cache-dir", str(cache)]


def run(cache: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(synth_cmd(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), time.perf_counter() - t0


def contents(cache: Path) -> dict[str, dict[str, bytes]]:
    """Every entry's payload, per stage; also checks the database is consistent."""
    with Cache(cache) as c:
        assert c._cache.check() == []  # diskcache's own consistency check: no warnings
        return {stage: {k: c.get(stage, k) for k in _stage_keys(c, stage)} for stage in STAGES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict, float]:
    """An uninterrupted run: its result, its cache contents, and how long it took."""
    cache = tmp_path_factory.mktemp("reference")
    doc, seconds = run(cache)
    return doc, contents(cache), seconds


def digests(doc: dict) -> list[str]:
    return [c["digest"] for c in doc["classes"]]


def kill_then_resume(tmp_path: Path, reference, fraction: float, sig: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start synth, send ``sig`` after ``fraction`` of a normal run's time, then run again to completion and
    compare everything with the uninterrupted run. Returns the interrupted process's outcome."""
    ref_doc, ref_contents, seconds = reference
    cache = tmp_path / f"cache-{fraction:.3f}"
    proc = subprocess.Popen(synth_cmd(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(fraction * seconds)
    sent = time.perf_counter()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    stopped_after = time.perf_counter() - sent
    doc, _ = run(cache)
    assert digests(doc) == digests(ref_doc)  # byte-identical prototype banks
    assert contents(cache) == ref_contents  # and every support image, proposal and bank, byte for byte
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), stopped_after


@pytest.mark.parametrize("fraction", [0.6])
def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path, reference, fraction):
    kill_then_resume(tmp_path, reference, fraction, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_at_20_points(tmp_path, reference):
    # Spread over the whole run: start-up, generation of both classes, masks, banks, exit.
    for i in range(20):
        kill_then_resume(tmp_path, reference, 0.05 + 0.95 * i / 19, signal.SIGKILL)


def test_ctrl_c_stops_within_a_second_says_how_to_resume(tmp_path, reference):
    interrupted, stopped_after = kill_then_resume(tmp_path, reference, 0.6, signal.SIGINT)
    if interrupted.returncode == 0:
        pytest.skip("the run finished before the signal arrived")  # timing on a loaded machine
    assert interrupted.returncode == 130, interrupted.stderr
    assert "run the same command again to resume" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert stopped_after < 1.0


def concurrent(tmp_path: Path, n: int) -> None:
    # One compute thread each: several processes each spinning up a thread per core on a small machine
    # oversubscribe it (OpenMP's busy-waiting can slow everything tenfold); that is not what is tested here.
    # The thread count changes float reduction order, so the reference runs with the same setting.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(cache: Path) -> subprocess.Popen:
        return subprocess.Popen(synth_cmd(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    alone = start(tmp_path / "alone")
    ref_doc = json.loads(alone.communicate(timeout=600)[0])
    cache = tmp_path / "shared"
    procs = [start(cache) for _ in range(n)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e for _, e in results]
    docs = [json.loads(out) for out, _ in results]
    assert all(digests(d) == digests(ref_doc) for d in docs)  # every process got the lone run's prototypes
    generated = sum(c["images_generated"] for d in docs for c in d["classes"])
    assert 12 <= generated <= 12 * n  # each image computed at least once, at most once per process
    assert contents(cache) == contents(tmp_path / "alone")  # same entries, byte for byte; check() clean


def test_two_processes_on_one_cache(tmp_path):
    concurrent(tmp_path, 2)


@pytest.mark.slow
def test_four_processes_on_one_cache(tmp_path):
    concurrent(tmp_path, 4)


def test_disk_full_while_writing_is_one_line_and_leaves_no_entry(tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"

    def full_disk(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, "wb") as f:  # half an entry reaches the disk, then the disk is full
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full_disk)
    monkeypatch.setattr(diskcache.Disk, "store", _store_as_file(diskcache.Disk.store))
    result = CliRunner().invoke(app, [*SYNTH[:-2], "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: cannot write to the cache") and "No space left on device" in lines[-1]
    assert "Traceback" not in result.output
    monkeypatch.undo()
    with Cache(cache_dir) as c:
        assert all(not _stage_keys(c, s) for s in STAGES)  # nothing half-written became an entry
        assert c._cache.check() == []
    leftovers = [p for p in cache_dir.rglob("*.val")]
    assert leftovers == []  # and no orphan partial file


def _store_as_file(store):
    """Force every value into a file (as large values are), so the full-disk write path is the file one."""

    def wrapped(self, value, read, key=diskcache.core.UNKNOWN):
        self.min_file_size = 0
        return store(self, value, read, key=key)

    return wrapped


def test_segment_completes_a_folder_with_some_outputs_and_temp_files(tmp_path):
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    args = ["segment", str(photos), "--classes", "cat,sky", "--models", "tiny", "--n", "2", "--steps", "2"]
    args += ["--k", "3", "--short-side", "64", "--scales", "64,48", "--stride", "32", "--quiet"]
    clean = tmp_path / "clean"
    assert CliRunner().invoke(app, [*args, "--out", str(clean)]).exit_code == 0
    out = tmp_path / "out"
    assert CliRunner().invoke(app, [*args, "--out", str(out)]).exit_code == 0
    # a killed earlier run: p1 lost its label map, p2 has only half-written temp files
    (out / "p1.png").unlink()
    for name in ("p2.png", "p2_overlay.jpg"):
        (out / name).unlink()
        (out / f".{name}.tmp-4242-0badc0de").write_bytes(b"half")
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert json.loads(result.stdout)["images"] == {"total": 4, "done": 2, "skipped": 2, "failed": 0}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())  # no temp files left
    for i in range(4):
        assert np.array_equal(np.array(Image.open(out / f"p{i}.png")), np.array(Image.open(clean / f"p{i}.png")))


def test_cache_folders_that_are_not_usable(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.txt").write_text("x")
    newer = tmp_path / "newer"
    with Cache(newer) as c:
        c._cache.set("__ovdiff_cache_format__", 99)
    for folder, needle in [(other, "not an ovdiff cache"), (newer, "newer than this ovdiff")]:
        result = CliRunner().invoke(app, ["synth", "cat", "--models", "tiny", "--cache-dir", str(folder)])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert os.listdir(other) == ["a.txt"]  # nothing was scattered into the foreign folder
