"""Input images: finding them (files, folders, globs), naming their outputs, reading them, and sharding the list.

Light module (no torch): Pillow and numpy only, so listing inputs costs nothing before models load.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from . import defaults as D

# Files with these extensions are always treated as images (so a corrupt "x.jpg" is reported, not ignored);
# any other file in a folder counts when Pillow recognises its content.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | {".pnm", ".tga", ".jp2", ".j2k", ".ico", ".dib"}
)
_GLOB_CHARS = set("*?[")


class ImageError(Exception):
    """An input file that cannot be used as an image (the message says why, in a few words)."""


@dataclass(frozen=True)
class InputImage:
    """An input file and where its outputs go.

    Attributes:
        path: the file.
        rel: output path without extension, relative to the output folder (posix, never absolute or "..").
    """

    path: Path
    rel: PurePosixPath


def _is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def holds_outputs(folder: Path) -> bool:
    """Whether ``folder`` is an ovdiff output folder (it holds a legend.json that ovdiff wrote)."""
    from .outputs import LEGEND_FILE, read_legend

    return read_legend(folder / LEGEND_FILE) is not None


def walk_images(folder: Path, exclude: Path | None, on_skip: Callable[[Path], None]) -> list[Path]:
    """Image files under the absolute ``folder``, sorted: hidden entries, the absolute ``exclude`` folder and
    folders holding an earlier run's outputs (reported to ``on_skip``) left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if holds_outputs(here):  # label maps and overlays of an earlier run are not photos
            dirs[:] = []
            on_skip(here)
            continue
        # Hidden entries (.git, .DS_Store, our own temp files) are never inputs; nor is the output folder.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or here / d != exclude))
        found += [here / f for f in sorted(files) if not f.startswith(".")]
    return [p for p in found if _is_image_file(p)]


def _in_output_folder(
    path: Path, top: Path, on_skip: Callable[[Path], None], is_output: Callable[[Path], bool]
) -> bool:
    """Whether a file a glob matched lies in an ovdiff output folder at or below ``top`` (the glob's fixed part);
    ``is_output``: :func:`holds_outputs`, memoised by the caller (a glob's files share their folders)."""
    for folder in reversed(path.parents):
        if folder.is_relative_to(top) and is_output(folder):
            on_skip(folder)
            return True
    return False


def find_images(
    inputs: Sequence[str], exclude: Path | None = None, on_skip: Callable[[Path], None] | None = None
) -> list[InputImage]:
    """Expand INPUT arguments to image files with their output names, sorted by output name.

    Args:
        inputs: files (always taken), folders (searched recursively; a file counts if its extension is an
            image extension or Pillow recognises its content), or glob patterns (``**`` recurses).
        exclude: a folder never searched (the output folder, when it lies inside an input folder).
        on_skip: called once with each folder left out because it holds ovdiff outputs (a legend.json that
            ovdiff wrote: an earlier run's --out), whether found by a folder search or a glob.

    Output names mirror the inputs' paths relative to their deepest common folder, without the extension;
    two inputs that would share a name (``a.jpg``, ``a.png``) keep their extension in it (``a.jpg``).

    Raises:
        ValueError: a path that does not exist, a glob matching nothing, or no images at all (one line).
    """
    if not inputs:
        raise ValueError("no INPUT given: pass image files, folders or glob patterns")
    exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
    skipped: dict[Path, None] = {}  # ordered set of the output folders left out

    def skip(folder: Path) -> None:
        if folder not in skipped:
            skipped[folder] = None
            if on_skip is not None:
                on_skip(folder)

    is_output = functools.cache(holds_outputs)
    files: list[tuple[Path, Path]] = []  # (file, the folder its name is relative to)
    for raw in inputs:
        path = Path(os.path.abspath(raw))
        if path.is_dir():
            files += [(f, path) for f in walk_images(path, exclude, skip)]
        elif path.is_file():
            files.append((path, path.parent))
        elif _GLOB_CHARS & set(raw):
            fixed = raw[: min(raw.index(c) for c in _GLOB_CHARS & set(raw))]  # "photos/" of "photos/**/*.jpg"
            top = Path(os.path.abspath(fixed if fixed.endswith(os.sep) else os.path.dirname(fixed) or "."))
            matches = sorted(Path(os.path.abspath(m)) for m in glob.glob(raw, recursive=True))
            matched = [m for m in matches if m.is_file() and not m.name.startswith(".") and _is_image_file(m)]
            matched = [m for m in matched if not _in_output_folder(m, top, skip, is_output)]
            if not matched:
                raise _none_found(f"INPUT {raw!r}: the pattern matches no image files", list(skipped))
            files += [(m, m.parent) for m in matched]
        else:
            raise ValueError(f"INPUT {raw!r}: no such file or folder")
    unique = list(dict.fromkeys(f for f, _ in files))
    if not unique:
        raise _none_found(f"INPUT {' '.join(inputs)!r}: no image files found", list(skipped))
    base = Path(os.path.commonpath([str(r) for _, r in files]))
    names = [PurePosixPath(f.relative_to(base).as_posix()) for f in unique]
    stems = [n.with_suffix("") for n in names]
    clashes = {s for s in stems if stems.count(s) > 1}
    items = [InputImage(f, n if s in clashes else s) for f, n, s in zip(unique, names, stems, strict=True)]
    return sorted(items, key=lambda it: str(it.rel))


def skipped_note(folders: Sequence[Path]) -> str | None:
    """One line for the input folders left out because they hold ovdiff outputs (None when there are none)."""
    if not folders:
        return None
    more = f" and {len(folders) - 1} more folder{'s' if len(folders) > 2 else ''}" if len(folders) > 1 else ""
    return f"left out {folders[0]}{more}: holds ovdiff outputs (its legend.json); name the files to segment them"


def _none_found(what: str, skipped: Sequence[Path]) -> ValueError:
    note = skipped_note(skipped)
    return ValueError(what + (f" ({note})" if note else ""))


def _to_rgb(img) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB. Transparent pixels are composited over white; 16-bit and
    float greyscale are rescaled to 8 bits rather than clipped."""
    from PIL import Image

    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255
        elif img.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257  # 16-bit range: 65535 -> 255
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P" or img.mode in {"LA", "PA", "La"} or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "RGBa"}:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy warns otherwise)


def load_image(path: Path, max_pixels: int = D.MAX_PIXELS) -> np.ndarray:
    """Read an image file as it is meant to be seen: (H, W, 3) uint8 RGB, EXIF orientation applied.

    Greyscale, palette, RGBA, CMYK, 16-bit and float images are converted.

    Args:
        max_pixels: decompression-bomb guard: a larger image is refused from its header, before decoding.

    Raises:
        ImageError: empty, unreadable, not an image, truncated or corrupt, or more than ``max_pixels``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    # Pillow's own guard is a process-wide setting with a fixed limit; ours is explicit, so switch its off.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{w} x {h} = {w * h:,} pixels, more than --max-pixels {max_pixels:,}"
                    " (a decompression-bomb guard; raise it to accept this image)"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


# --- sharding -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Process every ``count``-th item starting at ``index`` (0-based). ``source`` says where it came from
    ("--shard", "SLURM array", "torchrun"), ``origin`` exactly how (the option or the variables' values)."""

    index: int = 0
    count: int = 1
    source: str = "none"
    origin: str = ""

    def take(self, items: Sequence) -> list:
        return list(items[self.index :: self.count])

    def describe(self, taken: int, total: int) -> str:
        """For summary lines: "shard 1/2 from SLURM array (SLURM_ARRAY_TASK_ID=1, ...): 2 of 4 images"; "" when
        there is no sharding."""
        if self.count == 1:
            return ""
        return f"shard {self.index}/{self.count} from {self.origin or self.source}: {taken} of {total} images"


def _shard_from(index: int, count: int, what: str, source: str) -> Shard:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{what}: shard {index} of {count} does not exist; expected K/N with 0 <= K < N")
    return Shard(index, count, source, what)


# (source, index variable, count variable, variable holding the first index)
_SHARD_ENV = (
    ("SLURM array", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"),
    ("torchrun", "RANK", "WORLD_SIZE", None),
)


def resolve_shard(value: str | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard to process: ``--shard K/N``, else a SLURM array task, else a torchrun rank, else everything.

    SLURM: SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN (so ``--array=1-4`` works) of SLURM_ARRAY_TASK_COUNT.
    torchrun: RANK of WORLD_SIZE.

    Raises:
        ValueError: a malformed ``--shard`` or environment value, or a shard index outside 0..N-1.
    """
    if value is not None:
        k, sep, n = value.partition("/")
        if not (sep and k.strip().isdigit() and n.strip().isdigit()):
            raise ValueError(f"--shard {value!r}: expected K/N with 0 <= K < N, e.g. 0/4")
        return _shard_from(int(k), int(n), f"--shard {value}", "--shard")
    for source, index_var, count_var, first_var in _SHARD_ENV:
        if index_var in environ and count_var in environ:
            names = [index_var, count_var] + ([first_var] if first_var and first_var in environ else [])
            shown = ", ".join(f"{v}={environ[v]}" for v in names)
            if not all(environ[v].strip().isdigit() for v in names):
                raise ValueError(f"{source} ({shown}): expected whole numbers")
            first = int(environ[first_var]) if len(names) == 3 else 0
            return _shard_from(int(environ[index_var]) - first, int(environ[count_var]), f"{source} ({shown})", source)
    return Shard()
