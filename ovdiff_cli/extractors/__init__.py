"""Feature extractors (paper 4.1): ``sd``, ``dino``, ``clip``. Each is one small file registering itself."""

from . import clip, dino, sd  # noqa: F401  (registration)
from .base import EXTRACTORS, Extractor, build_extractor, parse_extractors, register_extractor

__all__ = ["EXTRACTORS", "Extractor", "build_extractor", "parse_extractors", "register_extractor"]
