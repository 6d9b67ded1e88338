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
