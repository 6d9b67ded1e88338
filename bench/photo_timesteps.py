"""Which DDPM timesteps give photo attribution (``photos.attribute``) the maps synthesis itself would have recorded.

A user's photo has no denoising trajectory to watch, so ovdiff noises its VAE latent to a few fixed DDPM timesteps,
runs the UNet once per timestep with the class prompt and averages the class tokens' cross-attention
(``defaults.PHOTO_TIMESTEPS``). This measures how well each candidate set of timesteps reproduces the map synthesis
recorded for an image whose true map is known: a generated support image.

For each class, ``--images-per-class`` support images are generated with ``synthesis.generate`` (the default sampler,
``--steps`` steps, the pipeline's per-image seeds), which records each image's attribution map while denoising it.
Each generated image is then treated as a user's photo: ``photos.attribute`` computes its map from its pixels alone
for every candidate set, and that map is compared with the recorded one on the latent grid:
  * corr: Pearson correlation of the two maps (over the grid cells), mean over images (se: its standard error,
    sd / sqrt(images), '-' for one image; the JSON also has the sd);
  * fg IoU: IoU of their fg masks (map > FG_FALLBACK, 0.5), mean over images;
  * bg IoU: IoU of their bg masks (map < BG_ATTRIBUTION_MAX, 0.2), mean over images;
  * s/image: attribution's wall seconds per image (VAE encode + one UNet pass per timestep), in batches as synth
    runs them, after a warm-up call; s/image/t: the same divided by the number of timesteps.
A mask pair with an empty union counts as IoU 1 (both say "nothing"); a constant map has no correlation and is
left out of the mean (``n_corr`` in the JSON says how many images counted). The row "(another image's recorded
map)" compares each image's recorded map with the next image's of the same class: the agreement no photo-specific
signal is needed for (the networks' spatial biases), i.e. what a candidate must beat to mean anything.

The best candidate is the one with the highest mean correlation (ties: fewer timesteps). With ``tiny`` or
``sd15-random`` (random weights) the maps mean nothing semantically, so the ranking says only how attribution's
mechanics behave; re-run with ``--models sd15`` for the ranking to set PHOTO_TIMESTEPS from. The tiny run takes
about 1.5 minutes on 2 CPU cores. Full-size networks on 2 CPU cores cost about 45 s per image for one timestep and
12 s per further timestep (and a minute per generated image at 2 steps): there, narrow ``--candidates``, the classes
and the images.

    python bench/photo_timesteps.py [--models tiny] [--classes cat,house,...] [--images-per-class 8] [--steps 30]
        [--candidates "200;200,400,600"] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does before torch loads (see models.set_threads)

import numpy as np
import torch

from ovdiff_cli import defaults as D
from ovdiff_cli import synthesis
from ovdiff_cli.models import resolve_models
from ovdiff_cli.models.loading import Models, resolve_device, set_threads
from ovdiff_cli.photos import attribute

CLASSES = ("cat", "house", "tree", "sky", "dog", "car")
CANDIDATES: tuple[tuple[int, ...], ...] = (
    (100,),
    (200,),
    (400,),
    (600,),
    (800,),
    (100, 300, 500),
    (200, 400, 600),
    (300, 500, 700),
    (100, 300, 500, 700, 900),
    (200, 400, 600, 800),
)
FG = D.FG_FALLBACK  # fg mask: map above this
BG = D.BG_ATTRIBUTION_MAX  # bg mask: map below this
BASELINE = "(another image's recorded map)"


@dataclass
class Row:
    """One candidate's agreement with the recorded maps (means over every image of every class)."""

    candidate: str
    timesteps: list[int]
    corr: float
    corr_sd: float
    n_corr: int
    fg_iou: float
    bg_iou: float
    s_per_image: float | None
    per_class: dict[str, dict[str, float]]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps over their cells; NaN when either is constant."""
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare(maps: np.ndarray, recorded: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image corr, fg IoU and bg IoU of (N, G, G) maps against the (N, G, G) recorded ones."""
    return {
        "corr": np.array([pearson(m, r) for m, r in zip(maps, recorded, strict=True)]),
        "fg_iou": np.array([iou(m > FG, r > FG) for m, r in zip(maps, recorded, strict=True)]),
        "bg_iou": np.array([iou(m < BG, r < BG) for m, r in zip(maps, recorded, strict=True)]),
    }


def summarise(name: str, timesteps: tuple[int, ...], scores: dict[str, dict[str, np.ndarray]], s: float | None) -> Row:
    """A Row from per-class per-image scores (class -> metric -> (N,))."""
    every = {k: np.concatenate([c[k] for c in scores.values()]) for k in ("corr", "fg_iou", "bg_iou")}
    corr = every["corr"][~np.isnan(every["corr"])]
    per_class = {
        cls: {k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for k, v in c.items()}
        for cls, c in scores.items()
    }
    return Row(
        candidate=name,
        timesteps=list(timesteps),
        corr=float(corr.mean()) if corr.size else float("nan"),
        corr_sd=float(corr.std()) if corr.size else float("nan"),
        n_corr=int(corr.size),
        fg_iou=float(every["fg_iou"].mean()),
        bg_iou=float(every["bg_iou"].mean()),
        s_per_image=s,
        per_class=per_class,
    )


def finite(value: object) -> object:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return None if np.isnan(value) else value
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_support(
    models: Models, classes: list[str], n: int, steps: int, seed: int, batch: int, log
) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """class -> ((N, 3, S, S) uint8 pixels on the device, (N, G, G) recorded attribution maps)."""
    gen = models.get("sd")
    out = {}
    for cls in classes:
        seeds = [synthesis.image_seed(seed, cls, i) for i in range(n)]
        t0 = time.perf_counter()
        images = []
        for start in range(0, n, batch):
            images += synthesis.generate(
                gen, cls, seeds[start : start + batch], steps=steps, image_size=models.spec.image_size
            )
        sync(models.device)
        log(f"generated {n} {cls} images in {time.perf_counter() - t0:.1f} s")
        out[cls] = (torch.stack([im.pixels for im in images]), np.stack([im.attribution for im in images]))
    return out


def attribute_all(
    models: Models, support: dict[str, tuple[torch.Tensor, np.ndarray]], timesteps: tuple[int, ...], batch: int
) -> tuple[dict[str, np.ndarray], float]:
    """class -> (N, G, G) maps from ``photos.attribute`` with ``timesteps``, and the wall seconds per image."""
    gen = models.get("sd")
    maps, images, seconds = {}, 0, 0.0
    for cls, (pixels, _) in support.items():
        parts = []
        sync(models.device)
        t0 = time.perf_counter()
        for start in range(0, pixels.shape[0], batch):
            parts.append(attribute(gen, cls, pixels[start : start + batch], timesteps, D.PHOTO_NOISE_SEED))
        sync(models.device)
        seconds += time.perf_counter() - t0
        images += pixels.shape[0]
        maps[cls] = torch.cat(parts).float().cpu().numpy()
    return maps, seconds / images


def parse_candidates(text: str | None) -> list[tuple[int, ...]]:
    """``"200;200,400,600"`` -> [(200,), (200, 400, 600)]; None -> CANDIDATES."""
    if text is None:
        return list(CANDIDATES)
    try:
        out = [tuple(int(t) for t in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        raise SystemExit(f"--candidates {text!r}: expected sets of whole timesteps, e.g. '200;200,400,600'") from None
    if not out or any(not 0 <= t < 1000 for c in out for t in c):
        raise SystemExit(f"--candidates {text!r}: timesteps must be in 0..999")
    return out


def table(rows: list[Row], best: Row) -> str:
    header = ("candidate", "corr", "se", "fg IoU", "bg IoU", "s/image", "s/image/t")
    lines = ["\t".join(header)]
    for r in rows:
        mark = (" <- best" if r is best else "") + (" (default)" if tuple(r.timesteps) == D.PHOTO_TIMESTEPS else "")
        per_t = f"{r.s_per_image / len(r.timesteps):.4f}" if r.s_per_image is not None and r.timesteps else "-"
        s = f"{r.s_per_image:.4f}" if r.s_per_image is not None else "-"
        se = f"{r.corr_sd / np.sqrt(r.n_corr):.3f}" if r.n_corr > 1 else "-"
        cells = (r.candidate, f"{r.corr:.3f}", se, f"{r.fg_iou:.3f}", f"{r.bg_iou:.3f}", s, per_t)
        lines.append("\t".join(cells) + mark)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny", help="model set (default tiny: random weights, built in-process)")
    parser.add_argument("--classes", default=",".join(CLASSES), help="comma-separated (default %(default)s)")
    parser.add_argument("--images-per-class", type=int, default=8, help="support images per class (default 8)")
    parser.add_argument("--steps", type=int, default=D.STEPS, help=f"denoising steps (default {D.STEPS})")
    parser.add_argument("--seed", type=int, default=D.SEED, help=f"synthesis seed (default {D.SEED})")
    parser.add_argument("--candidates", help="timestep sets, ';' between sets, ',' within (default: the built-in 10)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: as synth runs on this device)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--precision", default="auto", choices=D.PRECISIONS, help="as the CLI's (default auto)")
    parser.add_argument("--json", action="store_true", help="a JSON document on stdout (the table goes to stderr)")
    args = parser.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes or args.images_per_class < 1 or args.steps < 1:
        raise SystemExit("need at least one class, one image per class and one step")
    candidates = parse_candidates(args.candidates)
    out = sys.stderr if args.json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = set_threads()
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    models = Models(resolve_models(args.models), device, args.precision)
    gen = models.get("sd")
    log(f"built/loaded {args.models} sd in {time.perf_counter() - t0:.1f} s")
    spec = models.spec
    batch = args.batch_size or (spec.cpu_batch_size if device.type == "cpu" else D.BATCH_SIZE)

    support = generate_support(models, classes, args.images_per_class, args.steps, args.seed, batch, log)
    recorded = {cls: rec for cls, (_, rec) in support.items()}
    # Warm-up: a process's first UNet calls at a new batch shape pay one-off allocation costs.
    first = support[classes[0]][0][:batch]
    attribute(gen, classes[0], first, candidates[0], D.PHOTO_NOISE_SEED)

    rows = []
    n = args.images_per_class
    if n > 1:  # chance level: image i's recorded map against image i+1's (same class)
        shifted = {cls: compare(np.roll(rec, 1, axis=0), rec) for cls, rec in recorded.items()}
        rows.append(summarise(BASELINE, (), shifted, None))
    for cand in candidates:
        maps, s = attribute_all(models, support, cand, batch)
        scores = {cls: compare(maps[cls], recorded[cls]) for cls in classes}
        row = summarise(",".join(map(str, cand)), cand, scores, s)
        log(f"{row.candidate}: corr {row.corr:.3f}, {s:.3f} s/image")
        rows.append(row)

    scored = [r for r in rows if r.timesteps and not np.isnan(r.corr)]
    best = max(scored, key=lambda r: (r.corr, -len(r.timesteps))) if scored else None
    g = spec.image_size // gen.vae_scale
    print(
        f"models {spec.name} ({spec.image_size}x{spec.image_size} images, {g}x{g} maps), {device}, "
        f"{threads} threads, batch {batch}; {len(classes)} classes x {n} images, {args.steps} steps; "
        f"fg > {FG}, bg < {BG}; noise seed {D.PHOTO_NOISE_SEED}",
        file=out,
    )
    print(table(rows, best), file=out)
    if best is not None:
        print(f"best by mean correlation: {best.candidate} (corr {best.corr:.3f})", file=out)
    if not spec.meaningful:
        print(f"note: {spec.name} has random weights: the maps are semantically meaningless", file=out)
    if args.json:
        doc = {
            "models": spec.name,
            "meaningful": spec.meaningful,
            "device": str(device),
            "threads": threads,
            "image_size": spec.image_size,
            "grid": g,
            "classes": classes,
            "images_per_class": n,
            "steps": args.steps,
            "seed": args.seed,
            "batch_size": batch,
            "noise_seed": D.PHOTO_NOISE_SEED,
            "fg_above": FG,
            "bg_below": BG,
            "default": list(D.PHOTO_TIMESTEPS),
            "best": best.timesteps if best is not None else None,
            "rows": [asdict(r) for r in rows],
        }
        json.dump(finite(doc), sys.stdout, indent=2, allow_nan=False)
        print()


if __name__ == "__main__":
    main()
