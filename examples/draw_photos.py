"""Draw "your own photos" of a kite, with masks for some of them, and a scene with the kite flying, as example inputs
for ``ovdiff synth --photos`` (see docs/photos.md).

Offline and deterministic: the same seed draws the same pictures. Used by ``make demo``. Writes

    OUT_DIR/kite/kite_NN.jpg          the photos (every other one 4:3, the rest 3:4)
    OUT_DIR/kite-masks/kite_NN.png    masks of the first --masked photos (white = kite); the others get none,
                                      so ovdiff finds the kite in them by attribution
    OUT_DIR/scene_kite.jpg            an example scene (examples/draw_scenes.py) with the kite in its sky

    python examples/draw_photos.py OUT_DIR [--count 6] [--masked 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_scenes import _lerp, draw_scene


def kite_polygons(cx: float, cy: float, size: float, angle: float) -> list[tuple[list[tuple[float, float]], tuple]]:
    """The kite's four panels (a diamond split at its spars) and its tail bows, as (polygon, colour) pairs."""
    top, right, bottom, left = (0, -size), (size * 0.6, -size * 0.25), (0, size * 1.1), (-size * 0.6, -size * 0.25)
    centre = (0, -size * 0.25)
    panels = [
        ([top, right, centre], (220, 40, 40)),
        ([right, bottom, centre], (250, 200, 40)),
        ([bottom, left, centre], (220, 40, 40)),
        ([left, top, centre], (250, 200, 40)),
    ]
    for i in range(4):  # bows on the tail
        y = size * (1.35 + 0.35 * i)
        x = size * 0.12 * math.sin(i * 1.7)
        w = size * 0.12
        panels.append(([(x - w, y - w), (x + w, y + w), (x + w, y - w), (x - w, y + w)], (40, 90, 200)))
    c, s = math.cos(angle), math.sin(angle)

    def place(p: tuple[float, float]) -> tuple[float, float]:
        return (cx + p[0] * c - p[1] * s, cy + p[0] * s + p[1] * c)

    return [([place(p) for p in poly], colour) for poly, colour in panels]


def draw_kite(img: Image.Image, mask: Image.Image | None, cx: float, cy: float, size: float, angle: float) -> None:
    """Draw the kite (and its string) on ``img``; on ``mask`` too, in white, when given."""
    d = ImageDraw.Draw(img)
    d.line([(cx, cy + size * 1.1), (cx - size * 2.5, img.height)], fill=(60, 60, 60), width=1)
    for poly, colour in kite_polygons(cx, cy, size, angle):
        d.polygon(poly, fill=colour)
        if mask is not None:
            ImageDraw.Draw(mask).polygon(poly, fill=255)


def draw_photo(width: int, height: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """One photo of the kite against a sky with clouds, and its mask."""
    rnd = random.Random(seed)
    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    top, low = (rnd.randint(40, 90), rnd.randint(110, 160), 230), (200, 225, 250)
    for y in range(height):
        d.line([(0, y), (width, y)], fill=_lerp(top, low, y / height))
    for _ in range(rnd.randint(2, 4)):
        x, y, r = rnd.randint(0, width), rnd.randint(0, height), rnd.randint(height // 10, height // 5)
        d.ellipse([x - 2 * r, y - r, x + 2 * r, y + r], fill=(245, 245, 250))
    mask = Image.new("L", (width, height), 0)
    size = min(width, height) * rnd.uniform(0.18, 0.28)
    cx, cy = rnd.uniform(0.35, 0.65) * width, rnd.uniform(0.3, 0.45) * height
    draw_kite(img, mask, cx, cy, size, rnd.uniform(-0.5, 0.5))
    return img.filter(ImageFilter.GaussianBlur(0.6)), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--masked", type=int, default=3, help="how many of the photos get a mask")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.out / "kite").mkdir(parents=True, exist_ok=True)
    (args.out / "kite-masks").mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        size = (400, 300) if i % 2 == 0 else (300, 400)
        photo, mask = draw_photo(*size, args.seed * 1000 + i)
        path = args.out / "kite" / f"kite_{i:02d}.jpg"
        photo.save(path, quality=92)
        print(path)
        if i < args.masked:
            mask.save(args.out / "kite-masks" / f"kite_{i:02d}.png")
    scene = draw_scene(500, 375, args.seed * 1000)
    draw_kite(scene, None, 330, 70, 34, 0.3)
    scene.save(args.out / "scene_kite.jpg", quality=92)
    print(args.out / "scene_kite.jpg")


if __name__ == "__main__":
    main()
