"""``ovdiff synth``'s support stages (paper 3.2 support set generation, 3.3 attribution and fg/bg masks): the
"support" cache stage (each image with its flooring residual and attribution map, encoded on a worker thread) and
the "proposals" stage (a proposal-based masker's regions per image), and the support set as tensors on the models'
device for masks and features. ``explain`` reads support images back through :func:`support_image`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import attribution, masks, photos, synthesis
from .. import cache as cachelib
from ..extractors import build_extractor
from ..inputs import ImageError
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
    if not opts.n:  # photos only
        return support
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
    cached support image. A photo's entry (see :func:`encode_photo`) has no residual (zeros here) and, with the
    user's mask, no attribution (zeros here too: :func:`load_entry` tells them apart)."""
    entry = load_entry(cache, key)
    return entry.image, entry.residual, entry.attribution


@dataclass
class SupportEntry:
    """One cached support image as the bank builder needs it.

    Attributes:
        image: (S, S, 3) uint8 RGB.
        residual: (S, S, 3) uint8 flooring residual (zeros for a photo: its bytes are exact).
        attribution: (G, G) float32 in [0, 1] (zeros for a photo with the user's mask).
        mask: (S, S) uint8 of photos.MASK_BG / MASK_FG / MASK_IGNORE for a photo with the user's mask, else None.
        photo: whether it is a user's photo.
    """

    image: np.ndarray
    residual: np.ndarray
    attribution: np.ndarray
    mask: np.ndarray | None = None
    photo: bool = False


def load_entry(cache: cachelib.Cache, key: str) -> SupportEntry:
    """A cached support entry, generated image or photo (KeyError when the cache does not hold it)."""
    payload = cache.get("support", key)
    if payload is None:
        raise KeyError(f"support image {key[:12]} is not in the cache")
    arrays, meta = cachelib.decode_arrays(payload)
    image = cachelib.decode_png(arrays["image_png"].tobytes())
    photo = "sha256" in meta
    residual = arrays["residual"] if "residual" in arrays else np.zeros_like(image)
    mask = arrays.get("mask")
    if "attribution" in arrays:
        attr = arrays["attribution"].astype(np.float32)
    else:
        grid = int(meta["grid"])
        attr = np.zeros((grid, grid), dtype=np.float32)
    return SupportEntry(image, residual, attr, mask, photo)


def encode_photo(
    image: np.ndarray,
    photo: photos.Photo,
    class_name: str,
    attribution: np.ndarray | None,
    mask: np.ndarray | None,
    grid: int,
) -> bytes:
    """A photo's support entry: the (S, S, 3) uint8 photo fitted to the support size as PNG, and either the user's
    (S, S) uint8 mask or the (G, G) float32 attribution; its name and digest as provenance (a renamed photo keeps
    the name it was first cached under: explain shows the current one)."""
    arrays = {"image_png": np.frombuffer(cachelib.encode_png(image), dtype=np.uint8)}
    if mask is not None:
        arrays["mask"] = np.ascontiguousarray(mask, dtype=np.uint8)
    else:
        arrays["attribution"] = attribution.astype(np.float32)
    meta = {"class": class_name, "photo": photo.name, "sha256": photo.digest, "grid": grid}
    return cachelib.encode_arrays(arrays, meta)


@dataclass
class PhotoRun:
    """What :func:`ensure_photos` did for one class: photos computed here, found cached, and left out
    ((name, reason): their pixels could not be decoded)."""

    computed: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def ensure_photos(
    cache: cachelib.Cache,
    models: Models,
    class_name: str,
    items: list[tuple[str, photos.Photo]],
    opts: SynthOptions,
    progress: Progress,
    timings: Timings | None = None,
) -> PhotoRun:
    """Make sure every photo's support entry is cached: the photo fitted to the support size with its mask (the
    user's), or with its attribution map (:func:`photos.attribute`, one photo at a time). Photos are read in
    batches of the class's batch size and stored as each batch finishes, so memory holds one batch and an
    interrupted run keeps what it did. ``items``: (key, photo) pairs. ``timings`` accumulates "photos" (decoding,
    fitting, attribution and cache writes)."""
    timings = timings or Timings()
    run = PhotoRun()
    todo = [(k, p) for k, p in items if not cache.contains("support", k)]
    run.cached = len(items) - len(todo)
    progress.start(f"{class_name}: photos", len(items))
    progress.advance(run.cached)
    size, grid = models.spec.image_size, models.spec.grid
    b = batch_size(opts, models, len(items))
    for start in range(0, len(todo), b):
        loaded = []
        with timings("photos"):
            for key, photo in todo[start : start + b]:
                try:
                    image, mask = photos.load_photo(photo, size)
                except ImageError as exc:
                    run.failed.append((photo.name, str(exc)))
                    progress.advance()
                    continue
                loaded.append((key, photo, image, mask))
            need = [item for item in loaded if item[3] is None]
            maps = {}
            if need:
                gen = models.get("sd", decoder=False)
                pixels = torch.from_numpy(np.stack([item[2] for item in need])).permute(0, 3, 1, 2).to(gen.device)
                # One photo at a time: in a batch a map's last bits can depend on its slot (1.7e-6 on this project's
                # CPU without MKL's strict mode, which only the CLI sets; no device promises otherwise), and a photo's
                # slot would change as photos come and go. Alone, its map is a function of the photo everywhere.
                run_one = functools.partial(photos.attribute, gen, class_name)
                found = _batched(pixels, run_one, 1).float().cpu().numpy()
                maps = {item[0]: m for item, m in zip(need, found, strict=True)}
            for key, photo, image, mask in loaded:
                cache.put("support", key, encode_photo(image, photo, class_name, maps.get(key), mask, grid))
                run.computed += 1
                progress.advance()
    return run


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

    Photos: one with the user's mask takes it (:func:`photos.mask_fg_bg`) and is not shown to the masker; the
    others go through the masker with the generated images, except that a photo without any object proposal gets
    empty masks (eq. 1's threshold fallback assumes the class is in the picture, as it is in a generated image):
    the caller reports it as a photo where no mask was found.
    """
    n = len(keys)
    batch = batch_size(opts, models, n - opts.n)
    if not support.user_masks:  # every class without photos: the masker sees the support set as it is
        return _masker_masks(cache, models, keys, support, opts, batch)
    size = tuple(support.attribution.shape[1:])
    fg = torch.zeros((n, *size), dtype=torch.bool, device=support.attribution.device)
    bg = torch.zeros_like(fg)
    for i, mask in support.user_masks.items():
        f, b = photos.mask_fg_bg(mask)
        fg[i], bg[i] = torch.from_numpy(f), torch.from_numpy(b)
    rest = [i for i in range(n) if i not in support.user_masks]
    if rest:
        fg[rest], bg[rest] = _masker_masks(cache, models, [keys[i] for i in rest], support.subset(rest), opts, batch)
    return fg, bg


def _masker_masks(
    cache: cachelib.Cache, models: Models, keys: list[str], support: SupportTensors, opts: SynthOptions, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masker's fg, bg (N, S, S) bool for these support images (none of them with a user's mask); ``b``: the
    class's network batch size."""
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
            feats = _batched(support.images[todo], dino.maskcut_keys, b)
        images = support.floats(todo) if masker.needs_images else None
        for i, props in zip(todo, masker.propose(attr[todo], feats, images), strict=True):
            proposals[i] = props.cpu()
            packed = np.packbits(props.cpu().numpy().astype(bool).reshape(-1))
            cache.put("proposals", pkeys[i], cachelib.encode_arrays({"masks": packed}, {"count": len(props)}))
    pairs = [masks.select_masks(p, a) for p, a in zip(proposals, attr, strict=True)]
    for i, props in enumerate(proposals):
        if bool(support.photo[i]) and not bool(props.any()):  # no object proposal on a photo: no mask found
            pairs[i] = (torch.zeros_like(pairs[i][0]), torch.zeros_like(pairs[i][1]))
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
        photo: (N,) bool on the CPU, which images are the user's photos.
        user_masks: index -> (S, S) uint8 mask (photos.MASK_*) of each photo that came with the user's mask.
    """

    images: torch.Tensor
    saved: torch.Tensor
    residuals: torch.Tensor
    attribution: torch.Tensor
    grid_attribution: torch.Tensor
    photo: torch.Tensor
    user_masks: dict[int, np.ndarray] = field(default_factory=dict)

    def floats(self, index: list[int]) -> torch.Tensor:
        """(len(index), 3, S, S) float32 in [0, 1]: those images unquantised (to 1/512 of a grey level), what CutLER
        sees (REFERENCE 1); a photo's bytes / 255 (they are exact). Made only for the images a detector runs on,
        not kept for the class."""
        restored = synthesis.restore_float(self.saved[index], self.residuals[index])
        photo = self.photo[index]
        if not bool(photo.any()):
            return restored
        exact = self.saved[index].float() / 255
        return torch.where(photo.to(restored.device)[:, None, None, None], exact, restored)

    def subset(self, index: list[int]) -> SupportTensors:
        """These images only (no user masks among them)."""
        return SupportTensors(
            self.images[index],
            self.saved[index],
            self.residuals[index],
            self.attribution[index],
            self.grid_attribution[index],
            self.photo[index],
        )


def support_tensors(
    cache: cachelib.Cache, models: Models, keys: list[str], fresh: dict[str, synthesis.SupportImage] | None = None
) -> SupportTensors:
    """A class's support images and attribution maps on the models' device (see :class:`SupportTensors`).

    Images generated in this run (``fresh``) are taken as they are, already on the device; the others are read from
    the cache (PNG and raw residual, lossless: the same values).
    """
    fresh = fresh or {}
    pixels, residuals, maps, photo, user_masks = [], [], [], [], {}
    for i, key in enumerate(keys):
        if key in fresh:
            pixels.append(fresh[key].pixels.to(models.device).permute(1, 2, 0))
            residuals.append(fresh[key].residual_pixels.to(models.device).permute(1, 2, 0))
            maps.append(torch.from_numpy(fresh[key].attribution))
            photo.append(False)
        else:
            entry = load_entry(cache, key)
            pixels.append(torch.from_numpy(entry.image).to(models.device))
            residuals.append(torch.from_numpy(entry.residual).to(models.device))
            maps.append(torch.from_numpy(entry.attribution))
            photo.append(entry.photo)
            if entry.mask is not None:
                user_masks[i] = entry.mask
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
        photo=torch.tensor(photo, dtype=torch.bool),
        user_masks=user_masks,
    )
