"""Shared fixtures: every test gets its own cache and an offline, empty Hugging Face home."""

from __future__ import annotations

import os

import pytest

# As the CLI does before torch loads: OpenMP threads that spin while waiting made the suite 15x slower on a
# 2-core machine with one other busy process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test reads or writes the user's cache or weights, or touches the network."""
    monkeypatch.setenv("OVDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OVDIFF_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny model set on the CPU, built once per test session (a few seconds)."""
    import torch

    from ovdiff_cli.models import resolve_models
    from ovdiff_cli.models.loading import Models

    return Models(resolve_models("tiny"), torch.device("cpu"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, also patched into huggingface_hub (which reads HF_HUB_CACHE at import)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def silent_server():
    """A loopback TCP server that accepts connections and never answers; closed after the test."""
    import contextlib
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()
