"""Networks built on the meta device, for the loaders of ``models`` and ``cutler`` alike.

It imports nothing of ours, so both packages can use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def without_init(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device: no memory and no random initialisation (seconds of CPU
    for a ViT-B) for weights that are about to be read from a file. Buffers are built for real, since the
    non-persistent ones (CLIP's causal mask) are in no checkpoint."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()
