"""Weight files in their real formats for tests, without their real size on disk or in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A well-framed float32 safetensors file with these tensors, all zeros: its header is written and its data left
    as a hole (a sparse file), so a full-size network's file costs no disk and no time to write."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def cutler_shapes() -> dict[str, tuple[int, ...]]:
    """The tensors the full-size CutLER detector loads, by name (our converted .safetensors layout)."""
    from ovdiff_cli.cutler.configs import FULL
    from ovdiff_cli.cutler.model import CutlerDetector
    from ovdiff_cli.meta import without_init

    return {name: tuple(t.shape) for name, t in without_init(lambda: CutlerDetector(FULL)).state_dict().items()}


def cutler_checkpoint(path: Path) -> Path:
    """A CutLER checkpoint the full-size detector accepts, of zeros."""
    return sparse_safetensors(path, cutler_shapes())
