"""Dense feature extractors (paper 4.1): images in, L2-normalised features out, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

EXTRACTORS: dict[str, type[Extractor]] = {}


def register_extractor(name: str) -> Callable[[type[Extractor]], type[Extractor]]:
    """Class decorator: make an extractor available as ``--extractors NAME``."""

    def wrap(cls: type[Extractor]) -> type[Extractor]:
        cls.name = name
        EXTRACTORS[name] = cls
        return cls

    return wrap


class Extractor:
    """One feature extractor.

    Attributes:
        name: registry name.
        role: which network of the model set it reads ("sd", "dino" or "clip"); its hash enters cache keys.
        stride: input pixels per output feature cell.
    """

    name = ""
    role = ""
    stride = 1

    def __init__(self, models: Any) -> None:
        self.models = models

    def params(self) -> dict:
        """JSON-able parameters that change the features (part of cache keys)."""
        return {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) float32 RGB in [0, 1] -> (B, H/stride, W/stride, D) float32, unit norm per cell."""
        raise NotImplementedError


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x.float(), dim=dim, eps=1e-12)


def to_grid(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample (B, h, w, D) features to (B, *size, D) bilinearly and renormalise each cell."""
    if tuple(features.shape[1:3]) == tuple(size):
        return features
    x = F.interpolate(features.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return l2n(x.permute(0, 2, 3, 1))


def normalise_pixels(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def parse_extractors(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"sd,dino"`` -> ("sd", "dino"); ValueError naming the bad value and the accepted ones."""
    from . import clip, dino, sd  # noqa: F401  (registration)

    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    bad = [n for n in names if n not in EXTRACTORS]
    if bad or not names:
        raise ValueError(f"--extractors {bad[0] if bad else value!r}: expected a comma list of {', '.join(EXTRACTORS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--extractors {value!r}: an extractor is listed twice")
    return tuple(names)


def build_extractor(name: str, models: Any) -> Extractor:
    parse_extractors(name)
    return EXTRACTORS[name](models)
