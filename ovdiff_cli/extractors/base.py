"""Dense feature extractors (paper 4.1): images in, raw features out, registered by name.

Each extractor resizes its input the way the authors' code feeds that network (REFERENCE 4) and returns the raw
features: L2 normalisation happens only where features are compared (prototype matching, MaskCut), so prototypes
are pooled and clustered from raw features as the reference does (REFERENCE 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Filled by the package's __init__ importing clip, dino and sd, which Python runs before this module can be
# imported from outside: the registry is complete whenever it is read.
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
    """

    name = ""
    role = ""

    def __init__(self, models: Any) -> None:
        self.models = models

    def params(self) -> dict:
        """JSON-able parameters that change the features (part of cache keys)."""
        return {}

    def input_size(self, height: int, width: int, support: bool) -> tuple[int, int]:
        """The (H, W) this extractor's network sees for an input of (height, width); the input is resized to it."""
        return height, width

    def window_input(self) -> tuple[int, int] | None:
        """The (H, W) every window of a target image is resized to, when it does not depend on the window; then
        windows of every size can share a batch. None (the default): the network sees each window at its own size."""
        return None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resized images (B, 3, H, W) float32 in [0, 1] -> (B, h, w, D) raw float32 features."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, support: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) float32 RGB in [0, 1] -> (B, h, w, D) float32 raw features on the extractor's grid.

        ``support``: the images are support images rather than windows of a target image (DINO and CLIP see them
        at their own size, windows by their own rules).
        """
        return self.forward(resize(images, self.input_size(*images.shape[-2:], support)))


def resize(images: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, *size) float of the same dtype, bilinear with half-pixel centres
    (``align_corners=False``); the same tensor when the sizes already match.

    Without antialiasing by default, as the reference resizes windows into its networks: torchvision 0.13's tensor
    resize, which neither antialiases nor clamps a float image (REFERENCE 4). Bilinear weights are convex, so
    [0, 1] inputs stay in [0, 1] up to rounding. ``antialias``: widen the filter when shrinking (PIL-like), for
    inputs whose resize the reference does not pin (MaskCut's).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=antialias, align_corners=False)


def patch_multiple(length: float, patch: int) -> int:
    """``length`` rounded to the nearest positive multiple of ``patch`` (ViTs need whole patches)."""
    return max(patch, round(length / patch) * patch)


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x.float(), dim=dim, eps=1e-12)


def normalise_pixels(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def parse_extractors(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"sd,dino"`` -> ("sd", "dino"); ValueError naming the bad value and the accepted ones."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    shown = value if isinstance(value, str) else ",".join(value)  # as typed, never a Python list
    bad = [n for n in names if n not in EXTRACTORS]
    if bad or not names:
        raise ValueError(f"--extractors {bad[0] if bad else shown!r}: expected a comma list of {', '.join(EXTRACTORS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--extractors {shown!r}: an extractor is listed twice")
    return tuple(names)


def build_extractor(name: str, models: Any) -> Extractor:
    parse_extractors(name)
    return EXTRACTORS[name](models)
