"""Stand-ins shared by the tests: planted extractors and prototypes with known answers, and fast CLI options."""

from __future__ import annotations

import torch

from ovdiff_cli import segmentation as S
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.extractors.base import Extractor, l2n


class PixelExtractor(Extractor):
    """A stride-1 extractor: each pixel's feature is a fixed linear map of its colour (translation-equivariant)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(None)
        self.weight = weight
        self.bias = bias if bias is not None else torch.zeros(weight.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return l2n(images.permute(0, 2, 3, 1) @ self.weight + self.bias)


class MeanColourExtractor(Extractor):
    """A 1x1-grid extractor: the one feature of a window is its mean colour (so windows see different things)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))[:, None, None, :]


def protoset(rows: dict[str, list[list[float]]], channel: list[int], source: list[int], names=("a", "b")):
    """A PrototypeSet with the same channel/source layout for every extractor in ``rows``."""
    k = len(names) + 1
    sets = {
        e: S.ExtractorSet(l2n(torch.tensor(v)), torch.tensor(channel), torch.tensor(source), torch.arange(len(v)), k)
        for e, v in rows.items()
    }
    return S.PrototypeSet([ClassSpec(n) for n in names], sets)


# The tiny models with small windows: every stage of the real pipeline, fast on a CPU.
TINY_SEGMENT = ["--models", "tiny", "--n", "2", "--steps", "2", "--k", "3", "--short-side", "64", "--scales", "64,48"]
TINY_SEGMENT += ["--stride", "32", "--quiet"]
