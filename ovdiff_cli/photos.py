"""The user's own photos as a class's support set (an extension of paper 3.2 and 3.3): finding them, checking them,
fitting them to the support image size, their masks, and their attribution maps.

A photo enters the support set like a generated image. Its fg/bg masks come, best first, from
1. the user's mask (one PNG per photo by stem, non-zero = object): fg = the object, bg = the rest eroded as eq. 1
   erodes it (:func:`mask_fg_bg`);
2. attribution on the photo itself: the photo is encoded by SD's VAE, noised to each of :data:`PHOTO_TIMESTEPS` and
   passed through the UNet with the class prompt while the class tokens' cross-attention is captured exactly as
   during synthesis (all layers, all heads, bicubic per head and token, averaged over layers and timesteps): then the
   class's masker and eq. 1 run on it as on a generated image (:func:`attribute`);
3. neither (no mask given and no object proposal found): the photo is reported by name and left out.

Photos are identified by the sha256 of their bytes, never by their path, so a renamed photo keeps every cached
entry. Listing and checking is light (Pillow and numpy); :func:`attribute` needs torch and the SD networks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import defaults as D
from .inputs import ImageError, load_image, walk_images
from .models.registry import hash_file

if TYPE_CHECKING:
    import torch

    from .models.loading import Generator

# Values of a mask as ovdiff holds it: background, object, and "ignore" (neither fg nor bg: a benchmark's void label).
MASK_BG, MASK_FG, MASK_IGNORE = 0, 1, 2


@dataclass(frozen=True)
class Photo:
    """One usable photo of a class.

    Attributes:
        name: what the user calls it: its path relative to the photos folder (posix), or a benchmark image's id.
        path: the file.
        digest: sha256 of the file's bytes (hex): the photo's identity in the cache.
        size: (width, height) in pixels, after EXIF orientation.
        mask: the user's mask file, or a benchmark's label file when ``label`` is set; None: attribution decides.
        mask_digest: sha256 of the mask as ovdiff holds it (values MASK_BG / MASK_FG / MASK_IGNORE), or None.
        label: with a benchmark's label file as ``mask``: the class id whose pixels are the object (255 = ignore).
        read_labels: with ``label``: the benchmark's reader of its label files ((H, W) dataset ids, 255 ignore).
    """

    name: str
    path: Path
    digest: str
    size: tuple[int, int]
    mask: Path | None = None
    mask_digest: str | None = None
    label: int | None = None
    read_labels: Callable[[Path], np.ndarray] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PhotoSet:
    """A class's photos, in support-set order (by content, so renaming changes nothing), and the files left out.

    Attributes:
        folder: where they came from ("" for a benchmark's training images).
        photos: the usable photos, sorted by (digest, mask digest).
        skipped: (name, reason) of each file that cannot be used, in name order.
    """

    folder: str
    photos: tuple[Photo, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.photos)


def mask_digest(mask: np.ndarray) -> str:
    """sha256 (hex) of a (H, W) uint8 mask with its shape: the same object pixels give the same digest whatever
    file format or palette held them."""
    h = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}\0".encode())
    h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header (no decoding)."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in {5, 6, 7, 8} else (w, h)


def read_mask(
    path: Path, label: int | None = None, read_labels: Callable[[Path], np.ndarray] | None = None
) -> np.ndarray:
    """A mask file as ovdiff holds it: (H, W) uint8 of MASK_BG / MASK_FG / MASK_IGNORE.

    A user's mask: non-zero = object (any mode: palette, greyscale, RGB, with alpha: a pixel counts when any
    channel is non-zero). A benchmark's label file (``label`` given): that id = object, 255 = ignore, else bg;
    its values are read by ``read_labels`` when given (a benchmark's own reader), else as stored.

    Raises:
        ImageError: the file cannot be read as an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if read_labels is not None:
            arr = read_labels(path)
        else:
            with Image.open(path) as img:
                arr = np.array(img)
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None
    if label is not None:
        out = np.where(arr == label, MASK_FG, MASK_BG).astype(np.uint8)
        out[arr == 255] = MASK_IGNORE
        return out
    return (arr.reshape(*arr.shape[:2], -1) != 0).any(-1).astype(np.uint8)


def _mask_problem(photo_name: str, mask_name: str, mask: np.ndarray, size: tuple[int, int]) -> str | None:
    w, h = size
    if mask.shape != (h, w):
        return (
            f"mask {mask_name} is {mask.shape[1]} x {mask.shape[0]} but its photo {photo_name} is {w} x {h};"
            " a mask must have its photo's size"
        )
    if not (mask == MASK_FG).any():
        return f"mask {mask_name} of photo {photo_name} marks no object (every pixel is zero)"
    return None


def list_photos(
    folder: Path,
    masks: Path | None = None,
    *,
    min_side: int = 1,
    max_pixels: int = D.MAX_PIXELS,
    what: str = "--photos",
    on_progress: Callable[[int, int], None] | None = None,
) -> PhotoSet:
    """Every photo in ``folder`` (searched recursively, the same files ``segment`` would take from it), with its
    digest and size, and its mask from ``masks`` (``<stem>.png`` at the same relative path) where one exists.

    Files that are not usable are left out with a reason (``PhotoSet.skipped``): unreadable or not an image,
    more than ``max_pixels``, or a side shorter than ``min_side`` (the feature grid). Only headers are read for
    that; a file whose pixels turn out corrupt is reported when it is first decoded. ``on_progress(done, total)``
    is called as files are hashed (a folder of thousands of photos takes a while). Memory does not grow with the
    number or size of the photos.

    Raises:
        ValueError: the folder or the masks folder does not exist, holds no image file, or a mask is wrong for its
            photo (another size, or no object): one line naming the file; nothing has been computed yet.
    """
    from PIL import Image

    if not folder.is_dir():
        raise ValueError(
            f"{what} {folder}: no such folder" if not folder.exists() else f"{what} {folder}: not a folder"
        )
    if masks is not None and not masks.is_dir():
        raise ValueError(f"--photo-masks {masks}: no such folder")
    top = Path(os.path.abspath(folder))
    files = walk_images(top, Path(os.path.abspath(masks)) if masks is not None else None, lambda _folder: None)
    if not files:
        raise ValueError(f"{what} {folder}: no image files in it (expected .jpg, .png, ... photos of the class)")
    photos, skipped = [], []
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        for done, path in enumerate(files, 1):
            found = _listed(path, top, masks, min_side, max_pixels)
            if isinstance(found, Photo):
                photos.append(found)
            else:
                skipped.append((path.relative_to(top).as_posix(), found))
            if on_progress is not None:
                on_progress(done, len(files))
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    return PhotoSet(str(folder), tuple(sort_photos(photos)), tuple(skipped))


def _listed(path: Path, folder: Path, masks: Path | None, min_side: int, max_pixels: int) -> Photo | str:
    """One file of a photos folder: its Photo, or why it cannot be used (ValueError for a wrong mask)."""
    from PIL import UnidentifiedImageError

    name = path.relative_to(folder).as_posix()
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        size = displayed_size(path)
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot read it ({exc})"
    w, h = size
    if w * h > max_pixels:
        return f"{w} x {h} pixels, more than --max-pixels {max_pixels:,}"
    if min(w, h) < min_side:
        return f"{w} x {h} pixels, smaller than the {min_side} x {min_side} feature grid"
    mask_path = _mask_for(path, folder, masks)
    m_digest = None
    if mask_path is not None:
        mask_name = mask_path.relative_to(masks).as_posix()
        try:
            mask = read_mask(mask_path)
        except ImageError as exc:
            raise ValueError(f"--photo-masks {masks}: mask {mask_name}: {exc}") from None
        if problem := _mask_problem(name, mask_name, mask, size):
            raise ValueError(f"--photo-masks {masks}: {problem}")
        m_digest = mask_digest(mask)
    return Photo(name, path, hash_file(path), size, mask_path, m_digest)


def sort_photos(photos: list[Photo]) -> list[Photo]:
    """Support-set order: by content (digest, then mask digest), never by name; the same photo twice is kept once."""
    unique = {(p.digest, p.mask_digest or ""): p for p in sorted(photos, key=lambda p: p.name)}
    return [unique[k] for k in sorted(unique)]


def _mask_for(photo: Path, folder: Path, masks: Path | None) -> Path | None:
    """The user's mask of ``photo``: ``<masks>/<relative folder>/<stem>.png`` (any case of ``.png``), or None."""
    if masks is None:
        return None
    rel = photo.relative_to(folder)
    base = masks / rel.parent
    for candidate in (base / f"{rel.stem}.png", base / f"{rel.stem}.PNG"):
        if candidate.is_file():
            return candidate
    return None


def fit_photo(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 photo -> (size, size, 3) uint8 support image: the whole photo resized (Lanczos), as the
    whole-image window is, so no part of the object is cut off. A photo far from square is stretched."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 mask -> (size, size) uint8, nearest neighbour (values stay MASK_BG / MASK_FG / MASK_IGNORE)."""
    from PIL import Image

    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def load_photo(photo: Photo, size: int, max_pixels: int = D.MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """A photo as a support image and its mask at that size: ((size, size, 3) uint8, (size, size) uint8 or None).

    Raises:
        ImageError: the photo's (or mask's) pixels cannot be decoded, or its content changed since it was listed.
    """
    if hash_file(photo.path) != photo.digest:
        raise ImageError("the file changed while ovdiff was running; run the command again")
    image = load_image(photo.path, max_pixels)
    mask = None
    if photo.mask is not None:
        mask = read_mask(photo.mask, photo.label, photo.read_labels)
        if mask.shape != image.shape[:2]:
            raise ImageError(
                f"its mask is {mask.shape[1]} x {mask.shape[0]}, the photo {image.shape[1]} x {image.shape[0]}"
            )
        mask = fit_mask(mask, size)
    return fit_photo(image, size), mask


def mask_fg_bg(mask: np.ndarray, erode: int = D.BG_ERODE) -> tuple[np.ndarray, np.ndarray]:
    """Route 1: a (S, S) mask -> (fg, bg) (S, S) bool: fg = the object, bg = every other pixel that is not ignored,
    eroded ``erode`` times with eq. 1's 3x3 cross (the border counts as set). No attribution cut: the user said
    what the object is."""
    from .masks import _erode_cross

    fg = mask == MASK_FG
    bg = _erode_cross(mask == MASK_BG, erode) & ~fg
    return fg, bg


def _timestep_noise(timestep: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    # Drawn on the CPU from its own generator: the same noise whatever the device, batch or other photos.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + timestep))


def attribute(
    gen: Generator,
    class_name: str,
    images: torch.Tensor,
    timesteps: tuple[int, ...] = D.PHOTO_TIMESTEPS,
    seed: int = D.PHOTO_NOISE_SEED,
) -> torch.Tensor:
    """Route 2: attribution maps of real photos, the same signal synthesis records for generated images.

    Each photo's VAE latent (posterior mean) is noised to every timestep in ``timesteps`` (DDPM forward process,
    fixed noise per timestep) and passed through the UNet once per timestep with the class prompt, capturing the
    class tokens' cross-attention as :func:`synthesis.generate` does (all layers and heads, bicubic per head and
    token, clamped, averaged over layers and timesteps); the mean is min-max normalised. Only the conditional half
    runs: the captured maps of a guidance batch come from it alone.

    Args:
        images: (B, 3, S, S) uint8 RGB on the generator's device.
    Returns:
        (B, G, G) float32 in [0, 1] on that device, G = S / the VAE's scale factor.
    """
    import torch
    from diffusers import DDPMScheduler

    from . import attribution
    from .synthesis import prompt_for

    prompt = prompt_for(class_name)
    tokens = attribution.class_token_positions(gen.tokenizer, prompt, class_name)
    b = images.shape[0]
    with torch.no_grad():
        x = (images.float() / 255 * 2 - 1).to(gen.dtype)
        latents = gen.vae.encode(x).latent_dist.mean * gen.vae.config.scaling_factor
        g = tuple(latents.shape[-2:])
        context = gen.encode_text([prompt]).expand(b, -1, -1)
        scheduler = DDPMScheduler.from_config(gen.scheduler_config)
        tap = attribution.install(gen.unet)
        with attribution.capturing(tap, tokens, slice(0, b), g):
            for step in timesteps:
                noise = _timestep_noise(step, seed, tuple(latents.shape[1:])).to(latents)
                t = torch.full((b,), step, device=latents.device)
                noisy = scheduler.add_noise(latents, noise[None].expand(b, -1, -1, -1), t)
                gen.unet(noisy, t, encoder_hidden_states=context)
            return attribution.minmax(attribution.aggregate(tap))
