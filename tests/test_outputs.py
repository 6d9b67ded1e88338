"""File outputs never replace what is at their path: regular files atomically, links written through, streams
written into (segment's label maps, overlays and scores, explain's picture, eval's and every --save document, cache
export all go through outputs.atomic_path)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ovdiff_cli import outputs


def _write(path, data: bytes) -> None:
    with outputs.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def test_regular_file_is_replaced_atomically_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    _write(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_link_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "labels.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    outputs.write_labels(link, labels, 256)  # segment's label map, through the link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert np.array_equal(np.array(Image.open(target)), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "real"]  # no temp left beside either
    assert sorted(p.name for p in target.parent.iterdir()) == ["labels.png"]


def test_dash_writes_to_stdout(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(Path("-"), b'{"a": 1}\n')
    assert capfd.readouterr().out == '{"a": 1}\n' and not (tmp_path / "-").exists()


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    _write(fifo, b"payload")
    reader.join(10)
    assert got == [b"payload"] and fifo.is_fifo()


def test_a_character_device_is_a_stream():
    # /dev/null is a character device: written into, never renamed over (a run as root once replaced /dev/stdout).
    assert outputs.is_stream(Path("/dev/null")) and outputs.is_stream(Path("-"))
    assert not outputs.is_stream(Path("/no/such/file"))
