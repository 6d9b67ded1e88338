"""Write a small dataset in PASCAL VOC 2012's layout, for trying ``ovdiff eval`` offline.

Each image shows a few filled shapes on a textured background; its label map gives each shape a VOC class id,
the rest background 0, and a 255 ("void") border around every shape, as VOC's own annotations have.

    python examples/synthetic_voc.py OUT_DIR [--count 20] [--seed 0]
    ovdiff eval voc --root OUT_DIR --models tiny ...      # OUT_DIR/VOCdevkit/VOC2012 is what gets written
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ovdiff_cli import outputs


def draw_sample(width: int, height: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """One (RGB image, palette label map) pair with 1 to 3 shapes of random VOC classes 1..20."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    base = np.array([rnd.randint(60, 200) for _ in range(3)], dtype=np.float32)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))
    labels = Image.new("L", (width, height), 0)
    draw_img, draw_lab = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for _ in range(rnd.randint(1, 3)):
        cls = rnd.randint(1, 20)
        w, h = rnd.randint(width // 6, width // 2), rnd.randint(height // 6, height // 2)
        x, y = rnd.randint(0, width - w), rnd.randint(0, height - h)
        box = [x, y, x + w, y + h]
        fill = tuple(rnd.randint(0, 255) for _ in range(3))
        shape = rnd.choice(["ellipse", "rectangle"])
        getattr(draw_img, shape)(box, fill=fill)
        getattr(draw_lab, shape)(box, fill=255)  # void border first, then the class inside it
        getattr(draw_lab, shape)([x + 2, y + 2, x + w - 2, y + h - 2], fill=cls)
    return image, labels


SIZES = [(500, 375), (375, 500), (500, 333), (500, 400)]  # VOC-like: 500 on the long side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.out / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(args.count):
        image_id = f"2007_{i:06d}"
        image, labels = draw_sample(*SIZES[i % len(SIZES)], args.seed * 10000 + i)
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        # VOC stores labels as palette PNGs: the pixel values are the class ids, the palette only colours them
        outputs.write_labels(root / "SegmentationClass" / f"{image_id}.png", np.array(labels), num_ids=256)
        ids.append(image_id)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    print(root)


if __name__ == "__main__":
    main()
