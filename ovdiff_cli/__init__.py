"""ovdiff: open-vocabulary segmentation with prototypes synthesised by a diffusion model (OVDiff, ECCV 2024).

Importing this package is cheap on purpose: torch, diffusers and the other heavy libraries are imported inside
the functions that need them, so ``ovdiff --help`` and ``ovdiff --version`` start fast.
"""

__version__ = "0.1.0"
