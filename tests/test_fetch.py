"""``ovdiff models fetch`` (issue 24, items 4 and 5): one bound on the whole fetch whatever the hub client retries,
pinned weights already here used without the network, and ``--to`` keeping a file only when its content matches."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path

import pytest

from ovdiff_cli.models import resolve_models
from ovdiff_cli.models.fetching import fetch, lay_out
from ovdiff_cli.models.registry import ROLE_FILES, _digest_memo
from ovdiff_cli.models.sd15 import CLIP_REVISION


@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    """huggingface_hub with the offline flag unset (the test isolation sets it) and an empty cache; returns a
    function pointing it at an endpoint."""
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    return lambda endpoint: monkeypatch.setattr(hub, "ENDPOINT", endpoint)


class _Network(Exception):
    """Raised by the test instead of opening a connection."""


@pytest.fixture
def connections(monkeypatch):
    """Every connection the code under test tries to open, refused (with an error nobody retries) and recorded."""
    tried = []

    def refuse(sock, address):
        tried.append(address)
        raise _Network(f"tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


def _safetensors(payload: bytes) -> bytes:
    """A well-framed safetensors file holding ``payload`` as one uint8 tensor (weight files are checked against
    their own headers)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    return len(header).to_bytes(8, "little") + header + payload


def _hub_snapshot(cache: Path, repo: str, sha: str, files: dict[str, bytes]) -> Path:
    """A snapshot laid out as huggingface_hub writes it: each file a symlink to its blob, named by the sha256 of its
    content for a weight (LFS) file and by its git hash otherwise."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / sha
    for name, content in files.items():
        if name.endswith(".safetensors"):
            blob_name = hashlib.sha256(content).hexdigest()
        else:
            blob_name = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        blob = repo_dir / "blobs" / blob_name
        blob.write_bytes(content)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(blob)
    return snap


def test_a_silent_server_ends_the_whole_fetch_within_its_bound(silent_server, online_hub, monkeypatch):
    """huggingface_hub retries a timed-out request five times with back-off (about 6x the timeout plus 23 s):
    the bound covers the whole fetch, and the message states it and the real wait."""
    from typer.testing import CliRunner

    from ovdiff_cli.cli import app

    online_hub(silent_server)
    monkeypatch.setenv("OVDIFF_FETCH_TIMEOUT", "1")
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["models", "fetch", "sd15"])
    waited = time.perf_counter() - t0
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    # A deadline, not a speed: loose, yet far below the 29 s the retries took before.
    assert waited < 3, message
    said = re.search(r"no answer within 1 s \(gave up after ([\d.]+) s\)", message)
    assert said and 1 <= float(said.group(1)) <= waited, message
    assert "127.0.0.1" in message and "Traceback" not in result.output


def test_refused_connections_are_retried_only_within_the_bound_and_named(online_hub, monkeypatch):
    from ovdiff_cli.models.fetching import FetchTimeout

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every connection is refused at once, and the hub retries with back-off
    online_hub(f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OVDIFF_FETCH_TIMEOUT", "1")
    t0 = time.perf_counter()
    with pytest.raises(FetchTimeout, match=r"no answer within 1 s \(gave up after [\d.]+ s; last: ConnectError"):
        fetch(resolve_models("sd15").components["sd"])
    assert time.perf_counter() - t0 < 3  # the hub's own back-off would take 23 s


def test_a_silent_checkpoint_server_is_bounded_and_leaves_no_file(silent_server, monkeypatch, tmp_path):
    from ovdiff_cli.models.fetching import FetchTimeout
    from ovdiff_cli.models.registry import Component

    monkeypatch.setenv("OVDIFF_FETCH_TIMEOUT", "1")
    comp = Component("cutler", "detectron2", "cutler", url=silent_server + "/cutler_cascade_final.pth")
    t0 = time.perf_counter()
    with pytest.raises(FetchTimeout, match=r"no answer within 1 s \(gave up after"):
        fetch(comp)
    assert time.perf_counter() - t0 < 3
    assert not (tmp_path / "weights" / "cutler" / "cutler_cascade_final.pth").exists()


def _clip_snapshot(cache: Path, weights: bytes = b"clip weights") -> Path:
    files = {"open_clip_config.json": b'{"model_cfg": {}}', "open_clip_model.safetensors": _safetensors(weights)}
    assert set(files) == set(ROLE_FILES["clip"])
    return _hub_snapshot(cache, "timm/vit_base_patch16_clip_224.openai", CLIP_REVISION, files)


def test_a_pinned_snapshot_already_here_is_used_without_the_network(online_hub, connections, tmp_path):
    """A commit cannot move: when every file of it is here and whole, fetch never connects (it used to list the
    repo's files first, waiting out the hub client's retries when the network was down)."""
    online_hub("http://127.0.0.1:9")  # never reached: every connection is refused and recorded
    clip = resolve_models("sd15").components["clip"]
    snap = _clip_snapshot(tmp_path / "hf" / "hub")
    assert fetch(clip) == snap and connections == []
    # A file missing or cut short is no complete copy: then fetch goes to the hub.
    (snap / "open_clip_model.safetensors").unlink()
    with pytest.raises(_Network):
        fetch(clip)
    assert connections


def test_fetch_to_replaces_a_stale_file_of_the_same_size(tmp_path):
    """Weights of one architecture always have the same size: `--to` keeps a file only when its content is the
    blob's (an LFS blob is named by its sha256; a small file is compared byte for byte)."""
    clip = resolve_models("sd15").components["clip"]
    snap = _clip_snapshot(tmp_path / "hub")
    target = tmp_path / "layout" / "clip"
    weights, config = target / "open_clip_model.safetensors", target / "open_clip_config.json"
    assert lay_out(clip, snap, target) == f"{target}: 2 files (2 hard-linked)"
    # Weights and config from before the pin moved: other bytes, the same sizes, separate files (not links).
    for f in (weights, config):
        new = f.read_bytes()
        f.unlink()
        f.write_bytes(new[:-1] + bytes([new[-1] ^ 1]))
    said = lay_out(clip, snap, target)
    assert said == (
        f"{target}: 2 files (2 replaced (content differed: open_clip_config.json, open_clip_model.safetensors))"
    )
    for name in ROLE_FILES["clip"]:
        assert (target / name).read_bytes() == (snap / name).read_bytes()
    # A copy with the right content (another file system, say) is kept: hashed once, then remembered.
    copy = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(copy)
    assert lay_out(clip, snap, target) == f"{target}: 2 files (2 already there)"
    assert not weights.samefile(snap / "open_clip_model.safetensors")
    assert any(key.startswith(f"{weights.resolve()}\0") for key in _digest_memo())
