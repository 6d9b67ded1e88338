"""Draw simple outdoor scenes (sky, sun, hills, a house, trees, a pond) as example inputs for ``ovdiff segment``.

Offline and deterministic: the same seed draws the same pictures. Used by ``make demo`` and ``make bench``.

    python examples/draw_scenes.py OUT_DIR [--count 4] [--size 500x375] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def _lerp(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))


def draw_scene(width: int, height: int, seed: int) -> Image.Image:
    """One scene: a sky gradient with a sun, green hills, a house, a few trees and sometimes a pond."""
    rnd = random.Random(seed)
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    horizon = int(height * rnd.uniform(0.45, 0.6))
    top, low = (rnd.randint(40, 90), rnd.randint(110, 160), 230), (200, 225, 250)
    for y in range(horizon):
        d.line([(0, y), (width, y)], fill=_lerp(top, low, y / horizon))
    r = rnd.randint(height // 16, height // 9)
    sx, sy = rnd.randint(r, width - r), rnd.randint(r, horizon // 2)
    d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 220, 90))
    green = (rnd.randint(60, 90), rnd.randint(140, 170), rnd.randint(50, 80))
    d.rectangle([0, horizon, width, height], fill=green)
    for _ in range(2):
        cx, w = rnd.randint(0, width), rnd.randint(width // 3, width)
        d.ellipse(
            [cx - w // 2, horizon - height // 8, cx + w // 2, horizon + height // 8], fill=_lerp(green, (0, 0, 0), 0.15)
        )
    if rnd.random() < 0.6:
        px, pw = rnd.randint(0, width // 2), rnd.randint(width // 4, width // 2)
        d.ellipse([px, height - height // 5, px + pw, height - height // 30], fill=(60, 110, 190))
    hw = rnd.randint(width // 6, width // 4)
    hx, hy = rnd.randint(0, width - hw), horizon + rnd.randint(0, height // 10)
    d.rectangle([hx, hy - hw * 3 // 4, hx + hw, hy], fill=(rnd.randint(170, 220), 90, 70))
    d.polygon(
        [(hx - hw // 8, hy - hw * 3 // 4), (hx + hw // 2, hy - hw * 5 // 4), (hx + hw * 9 // 8, hy - hw * 3 // 4)],
        fill=(110, 50, 40),
    )
    d.rectangle([hx + hw // 2 - hw // 10, hy - hw // 3, hx + hw // 2 + hw // 10, hy], fill=(70, 40, 30))
    for _ in range(rnd.randint(1, 3)):
        tx, th = rnd.randint(0, width), rnd.randint(height // 6, height // 3)
        ty = horizon + rnd.randint(0, height // 6)
        d.rectangle([tx - th // 16, ty - th // 2, tx + th // 16, ty], fill=(100, 70, 40))
        d.ellipse([tx - th // 3, ty - th, tx + th // 3, ty - th // 3], fill=(30, rnd.randint(100, 130), 40))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        path = args.out / f"scene_{i:02d}.jpg"
        draw_scene(width, height, args.seed * 1000 + i).save(path, quality=92)
        print(path)


if __name__ == "__main__":
    main()
