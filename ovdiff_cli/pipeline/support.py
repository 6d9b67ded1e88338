"""``ovdiff synth``'s support stages (paper 3.2 support set generation, 3.3 attribution and fg/bg masks): the
"support" cache stage (each image with its flooring residual and attribution map, encoded on a worker thread) and
the "proposals" stage (a proposal-based masker's regions per image), and the support set as tensors on the models'
device for masks and features. ``explain`` reads support images back through :func:`support_image`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import attribution, masks, synthesis
from .. import cache as cachelib
from ..extractors import build_extractor
from ..models.loading import Models
from ..timing import Timings
from .common import InOrder, Progress
from .keys import (
    PROPOSALS_VERSION,
    SynthOptions,
    _masker_fields,
    batch_size,
    build_class_masker,
    sampling_batch_size,
    support_key,
)


@dataclass
class SupportSet:
    """What :func:`ensure_support` did for one class: its N support keys, how many images it generated, and those
    images themselves (key -> SupportImage, pixels still on the models' device) for the rest of the run."""

    keys: list[str]
    generated: int = 0
    fresh: dict[str, synthesis.SupportImage] = field(default_factory=dict)


class SupportWriter:
    """Stores support images in the cache, encoding them (PNG: about 0.15 s of one core each at 512x512, seconds
    for a class) on a worker thread while the device generates the next batch and then builds the bank. Entries
    are put into the cache from the calling thread, in order, as their encoding finishes. Leaving the block, also
    on Ctrl-C or an error, stores every image handed over: nothing generated is lost. ``timings`` gets "encode":
    the time the calling thread waits for encodings and writes (what the background work still costs the run)."""

    def __init__(self, cache: cachelib.Cache, class_name: str, timings: Timings) -> None:
        self.cache, self.class_name, self.timings = cache, class_name, timings
        self._jobs = InOrder(timings, "encode")

    def __enter__(self) -> SupportWriter:
        return self

    def submit(self, key: str, index: int, image: synthesis.SupportImage) -> None:
        self._jobs.submit(key, encode_support, image.image, image.residual, image.attribution, self.class_name, index)
        self._store(wait=False)

    def _store(self, wait: bool) -> None:
        for key, future in self._jobs.finished(wait=wait):
            with self.timings("encode"):
                self.cache.put("support", key, future.result())

    def __exit__(self, *exc: object) -> None:
        with self._jobs:
            self._store(wait=True)


def ensure_support(
    cache: cachelib.Cache,
    models: Models,
    class_name: str,
    opts: SynthOptions,
    progress: Progress,
    timings: Timings | None = None,
    writer: SupportWriter | None = None,
) -> SupportSet:
    """Make sure images 0..N-1 of the class are cached; return their keys and the images generated here.
    ``timings`` accumulates "sampling" (the denoising loop with capture and decoding) and "encode" (PNG + cache,
    as far as it is not hidden behind other work). With a caller's ``writer``, the last images are in the cache
    once that writer's block ends (so their encoding can overlap the caller's next stages); without one, on
    return."""
    timings = timings or Timings()
    if writer is None:
        with SupportWriter(cache, class_name, timings) as own:
            return ensure_support(cache, models, class_name, opts, progress, timings, own)
    support = SupportSet([support_key(models, class_name, i, opts) for i in range(opts.n)])
    keys = support.keys
    missing = {i for i, k in enumerate(keys) if cache.get("support", k) is None}
    progress.start(f"{class_name}: images", opts.n)
    progress.advance(opts.n - len(missing))
    b = sampling_batch_size(opts, models)
    for batch in sorted({i // b for i in missing}):
        # Every slot holds its genuine image (even past N), so the batch is the same whoever asks for it.
        slots = range(batch * b, (batch + 1) * b)
        seeds = [synthesis.image_seed(opts.seed, class_name, i) for i in slots]
        with timings("sampling"):  # the first batch also loads SD: "load" in synthesize's stages says how long
            out = synthesis.generate(
                models.get("sd"),
                class_name,
                seeds,
                steps=opts.steps,
                guidance=opts.guidance,
                negative_prompt=opts.negative_prompt,
                scheduler=opts.scheduler,
                image_size=models.spec.image_size,
            )
        for i, img in zip(slots, out, strict=True):
            if i in missing:
                writer.submit(keys[i], i, img)
                support.fresh[keys[i]] = img
                support.generated += 1
                progress.advance()
    return support


def encode_support(
    image: np.ndarray, residual: np.ndarray, attribution: np.ndarray, class_name: str, index: int
) -> bytes:
    """A support cache entry, in safetensors: the (H, W, 3) uint8 image as PNG, its (H, W, 3) uint8 flooring
    residual raw (noise: PNG would not shrink it; see :func:`synthesis.quantise`) and the (G, G) attribution as
    float32 (the thresholds 0.2 and 0.5 are applied to it after upsampling, so it is kept exact)."""
    return cachelib.encode_arrays(
        {
            "image_png": np.frombuffer(cachelib.encode_png(image), dtype=np.uint8),
            "residual": np.ascontiguousarray(residual, dtype=np.uint8),
            "attribution": attribution.astype(np.float32),
        },
        {"class": class_name, "index": index},
    )


def load_support(cache: cachelib.Cache, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image, (H, W, 3) uint8 flooring residual and (G, G) float32 attribution in [0, 1] of one
    cached support image."""
    payload = cache.get("support", key)
    if payload is None:
        raise KeyError(f"support image {key[:12]} is not in the cache")
    arrays, _ = cachelib.decode_arrays(payload)
    image = cachelib.decode_png(arrays["image_png"].tobytes())
    return image, arrays["residual"], arrays["attribution"].astype(np.float32)


def support_image(cache: cachelib.Cache, key: str) -> np.ndarray | None:
    """The (H, W, 3) uint8 support image under ``key``, or None when the cache does not hold it."""
    try:
        return load_support(cache, key)[0]
    except KeyError:
        return None


def _batched(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> torch.Tensor:
    """Run ``fn`` over fixed-shape batches (the last zero-padded) so results never depend on N. The results stay
    where ``fn`` put them (the models' device): support features go from the networks to the prototypes without a
    round trip through host memory (gigabytes for 32 images of SD features)."""
    outs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
        outs.append(fn(chunk)[:n])
    return torch.cat(outs)


def support_masks(
    cache: cachelib.Cache, models: Models, keys: list[str], support: SupportTensors, opts: SynthOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """fg, bg (N, S, S) bool masks at the support image's resolution (REFERENCE 3).

    CutLER sees the unquantised images (:meth:`SupportTensors.floats`, as the reference runs it at sampling time),
    MaskCut's DINO the saved ones. Proposals of proposal-based maskers are cached per image (bit-packed).
    """
    masker = build_class_masker(opts, models)
    attr = support.attribution
    if not masker.proposal_based:
        return masker.masks(attr, grid_attribution=support.grid_attribution)
    size = tuple(attr.shape[1:])
    fields = _masker_fields(models, masker)
    pkeys = [cachelib.make_key("proposals", PROPOSALS_VERSION, support=k, **fields) for k in keys]
    proposals: list[torch.Tensor | None] = [None] * len(keys)
    for i, k in enumerate(pkeys):
        payload = cache.get("proposals", k)
        if payload is not None:
            proposals[i] = _unpack_masks(payload, size)
    todo = [i for i in range(len(keys)) if proposals[i] is None]
    if todo:
        feats = None
        if masker.needs_features:
            # On the models' device: MaskCut's eigenproblems are milliseconds on a GPU, seconds on a CPU.
            dino = build_extractor("dino", models)
            feats = _batched(support.images[todo], dino.maskcut_keys, batch_size(opts, models))
        images = support.floats(todo) if masker.needs_images else None
        for i, props in zip(todo, masker.propose(attr[todo], feats, images), strict=True):
            proposals[i] = props.cpu()
            packed = np.packbits(props.cpu().numpy().astype(bool).reshape(-1))
            cache.put("proposals", pkeys[i], cachelib.encode_arrays({"masks": packed}, {"count": len(props)}))
    pairs = [masks.select_masks(p, a) for p, a in zip(proposals, attr, strict=True)]
    return masks.stack_masks(pairs, attr)


def _unpack_masks(payload: bytes, size: tuple[int, int]) -> torch.Tensor:
    """A cached proposals entry -> (R, *size) bool."""
    arrays, meta = cachelib.decode_arrays(payload)
    count = int(meta["count"])
    bits = np.unpackbits(arrays["masks"])[: count * size[0] * size[1]]
    return torch.from_numpy(bits.astype(bool).reshape(count, *size))


@dataclass
class SupportTensors:
    """A class's support set on the models' device, ready for masks and features (N images of side S).

    Attributes:
        images: (N, 3, S, S) float32 in [0, 1], the saved bytes / 255: what the feature extractors see.
        saved: (N, 3, S, S) uint8, the saved bytes themselves.
        residuals: (N, 3, S, S) uint8, what flooring dropped (see :meth:`floats`).
        attribution: (N, S, S) float32 in [0, 1] at the image size: what masks are chosen on.
        grid_attribution: (N, G, G) float32 in [0, 1] on the latent grid, as captured.
    """

    images: torch.Tensor
    saved: torch.Tensor
    residuals: torch.Tensor
    attribution: torch.Tensor
    grid_attribution: torch.Tensor

    def floats(self, index: list[int]) -> torch.Tensor:
        """(len(index), 3, S, S) float32 in [0, 1]: those images unquantised (to 1/512 of a grey level), what CutLER
        sees (REFERENCE 1). Made only for the images a detector runs on, not kept for the class."""
        return synthesis.restore_float(self.saved[index], self.residuals[index])


def support_tensors(
    cache: cachelib.Cache, models: Models, keys: list[str], fresh: dict[str, synthesis.SupportImage] | None = None
) -> SupportTensors:
    """A class's support images and attribution maps on the models' device (see :class:`SupportTensors`).

    Images generated in this run (``fresh``) are taken as they are, already on the device; the others are read from
    the cache (PNG and raw residual, lossless: the same values).
    """
    fresh = fresh or {}
    pixels, residuals, maps = [], [], []
    for key in keys:
        if key in fresh:
            pixels.append(fresh[key].pixels.to(models.device).permute(1, 2, 0))
            residuals.append(fresh[key].residual_pixels.to(models.device).permute(1, 2, 0))
            maps.append(torch.from_numpy(fresh[key].attribution))
        else:
            image, residual, attr = load_support(cache, key)
            pixels.append(torch.from_numpy(image).to(models.device))
            residuals.append(torch.from_numpy(residual).to(models.device))
            maps.append(torch.from_numpy(attr))
    # (N, H, W, 3) viewed as (N, 3, H, W): channels-last memory, the layout the networks have always been given
    # (convolutions' last bits depend on it, and with them the cached banks).
    saved, residual = torch.stack(pixels).permute(0, 3, 1, 2), torch.stack(residuals).permute(0, 3, 1, 2)
    grid = torch.stack(maps).to(models.device)
    return SupportTensors(
        images=saved.float() / 255,
        saved=saved,
        residuals=residual,
        attribution=attribution.at_image_size(grid, saved.shape[-1]),
        grid_attribution=grid,
    )
