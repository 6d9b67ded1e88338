"""Lloyd iterations per K-means run at the sd15-random model set's prototype sizes: the reference's stopping rule
(scikit-learn 1.2: centre shift <= tol x mean per-feature variance, or unchanged labels) against stopping only on
unchanged labels (ovdiff's rule before it followed the reference, ``tol=0``).

Sizes (REFERENCE 4 and 5): N support images, k = 32 parts, fp32, per extractor and region
  * sd:   D = 7680 (the to_q widths of SD 1.5's cross-attention layers 0, 6-12 and 15: 320 + 1280 + 3 x 1280 +
          3 x 640 + 320) on a 64x64 grid;
  * dino: D = 768 on a 64x64 grid (ViT-B/8 on 512x512 support images);
  * clip: D = 768 on a 32x32 grid (ViT-B/16 on 512x512 support images);
fg masks cover 30% of each image's cells, bg masks 40%.

Data: random, as meaningless as sd15-random's features but spatially smooth like a network's. Per image, a
32-channel Gaussian field drawn at 8x8 and resized bilinear to the grid, mapped to D by one random (32, D) matrix,
plus i.i.d. N(0, 0.25) noise per cell and feature; the masks are the cells of another smooth field below its 30%
(fg) and above its 60% (bg) quantile.

Both rules follow the same Lloyd trajectory until the tolerance fires, so where the reference's rule stopped on
unchanged labels the labels-only run is the same run and is not repeated. Iterations are counted as scikit-learn's
``n_iter_`` counts them (assignment passes, the last one included); ovdiff's loop before counted one fewer for the
same work (it did not count the pass that finds no label changed). Seconds are one run on this machine; the whole
table takes about 5 minutes on 2 cores, most of it sd's.

    python bench/kmeans_iters.py [--n 32] [--extractors sd dino clip] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ovdiff_cli.defaults import K_PARTS, KMEANS_ITERS, KMEANS_TOL
from ovdiff_cli.prototypes import kmeans

# extractor -> (feature width D, grid side) of the sd15-random set's support features
SIZES = {"sd": (320 + 1280 + 3 * 1280 + 3 * 640 + 320, 64), "dino": (768, 64), "clip": (768, 32)}
REGIONS = {"fg": 0.3, "bg": 0.4}  # share of each image's cells in the mask
LATENT = 32  # channels of the smooth field the features are drawn from
NOISE = 0.5  # std of the per-cell noise


def smooth_field(n: int, channels: int, side: int, gen: torch.Generator) -> torch.Tensor:
    """(n, channels, side, side) float32: N(0, 1) drawn at 8x8, resized bilinear to side x side."""
    coarse = torch.randn(n, channels, 8, 8, generator=gen)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def masked_features(n: int, d: int, side: int, region: str, gen: torch.Generator) -> torch.Tensor:
    """(M, D) float32 features of the cells of n images' ``region`` masks (see the module docstring)."""
    score = smooth_field(n, 1, side, gen)[:, 0].flatten(1)
    share = REGIONS[region]
    cut = torch.quantile(score, share if region == "fg" else 1 - share, dim=1, keepdim=True)
    mask = score <= cut if region == "fg" else score > cut
    latent = smooth_field(n, LATENT, side, gen).flatten(2).transpose(1, 2)[mask]  # (M, LATENT)
    proj = torch.randn(LATENT, d, generator=gen)
    return latent @ proj + NOISE * torch.randn(latent.shape[0], d, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="support images per class (default 32)")
    parser.add_argument("--extractors", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    print(f"k={K_PARTS}, N={args.n}, fp32, {torch.get_num_threads()} threads, tol={KMEANS_TOL}")
    header = ("extractor", "region", "M", "D", "iters (tol, reference)", "stopped by", "iters (labels only)", "s")
    print("\t".join(header))
    for name in args.extractors:
        d, side = SIZES[name]
        for region in REGIONS:
            x = masked_features(args.n, d, side, region, gen)
            start = time.perf_counter()
            ref = kmeans(x, K_PARTS, tol=KMEANS_TOL)
            # Same trajectory until the tolerance fires: a strict stop means the labels-only run is this one.
            before = ref.n_iter if ref.strict else kmeans(x, K_PARTS, tol=0.0).n_iter
            seconds = time.perf_counter() - start
            stop = "unchanged labels" if ref.strict else ("tolerance" if ref.n_iter < KMEANS_ITERS else "max_iter")
            row = (name, region, x.shape[0], d, ref.n_iter, stop, before, f"{seconds:.1f}")
            print("\t".join(map(str, row)), flush=True)
            del x


if __name__ == "__main__":
    main()
