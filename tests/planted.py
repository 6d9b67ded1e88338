"""Stand-ins shared by the tests: a planted extractor and prototypes with known answers, and fast CLI options."""

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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return l2n(images.permute(0, 2, 3, 1) @ self.weight + self.bias)


def protoset(rows: dict[str, list[list[float]]], channel: list[int], source: list[int], names=("a", "b")):
    return S.PrototypeSet(
        [ClassSpec(n) for n in names],
        {e: l2n(torch.tensor(v)) for e, v in rows.items()},
        torch.tensor(channel),
        torch.tensor(source),
        torch.arange(len(channel)),
    )


# The tiny models with small windows: every stage of the real pipeline, fast on a CPU.
TINY_SEGMENT = ["--models", "tiny", "--n", "2", "--steps", "2", "--k", "3", "--short-side", "64", "--scales", "64,48"]
TINY_SEGMENT += ["--stride", "32", "--quiet"]
