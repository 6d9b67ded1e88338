"""What ``segment`` writes: label PNGs, overlays, score archives and the legend, each file atomically.

Every file is written to a hidden temp file next to its destination and renamed into place, so an output that
exists is complete; a killed run leaves at most a temp file, which the next run removes.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import defaults as D

LEGEND_FILE = "legend.json"
TEMP_MARK = ".tmp-"
# A palette PNG holds ids 0..255; larger vocabularies get 16-bit greyscale label maps instead.
PALETTE_IDS = 256


def voc_palette(n: int = PALETTE_IDS) -> np.ndarray:
    """(n, 3) uint8: the PASCAL VOC colour map (id 0 black, 1 dark red, 2 dark green, ...)."""
    ids = np.arange(n)
    out = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for c in range(3):
            out[:, c] |= ((ids >> (3 * shift + c)) & 1) << (7 - shift)
    return out.astype(np.uint8)


def colour(label: int) -> tuple[int, int, int]:
    """The display colour of a label id (VOC colours, repeating past 255)."""
    r, g, b = voc_palette()[label % PALETTE_IDS]
    return int(r), int(g), int(b)


def build_legend(
    names: Sequence[str], stuff: Sequence[bool], background: bool = True, type_from: Sequence[str] | None = None
) -> dict[str, dict]:
    """``legend.json``'s content: label id (as a string) -> name, colour and type (thing, stuff, background),
    and with ``type_from`` who decided each class's type ("user", or the stuff table: "paper", "extended")."""
    legend = {}
    if background:
        legend["0"] = {"name": "background", "color": list(colour(0)), "type": "background"}
    sources = list(type_from) if type_from is not None else [None] * len(names)
    for i, (name, is_stuff, src) in enumerate(zip(names, stuff, sources, strict=True), start=1):
        legend[str(i)] = {"name": name, "color": list(colour(i)), "type": "stuff" if is_stuff else "thing"}
        if src is not None:
            legend[str(i)]["type_from"] = src
    return legend


STDOUT = "-"  # a file option given as "-" writes to standard output


def is_stream(path: Path) -> bool:
    """Whether ``path`` is written in place rather than replaced: "-" (stdout), or an existing character device,
    FIFO or socket (/dev/stdout, a named pipe)."""
    if str(path) == STDOUT:
        return True
    try:
        mode = os.stat(path).st_mode  # follows links: /dev/stdout is a link to a device
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success its bytes reach ``path``, on failure they are deleted.

    A regular file is replaced atomically (the temp file sits next to it and is renamed onto it), so an output
    that exists is complete. A symlink is written through: its target is replaced atomically and the link is
    kept. "-", a character device or a FIFO is never replaced: the finished bytes are written into it.
    """
    stream = is_stream(path)
    final = Path(os.path.realpath(path))  # a link's target; the path itself otherwise
    if stream:
        fd, name = tempfile.mkstemp(prefix="ovdiff-")
        os.close(fd)
        tmp = Path(name)
    else:  # beside the final file, so the rename is atomic (same file system)
        tmp = final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if stream:
            _copy_into(tmp, path)
        else:
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_into(src: Path, dest: Path) -> None:
    """Write the bytes of ``src`` into the stream ``dest`` ("-" = standard output)."""
    data = src.read_bytes()
    if str(dest) == STDOUT:
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        if out is None:  # a text-only stdout (some test harnesses): documents are text
            sys.stdout.write(data.decode("utf-8"))
        else:
            out.write(data)
        sys.stdout.flush()
        return
    with open(dest, "wb") as f:
        f.write(data)


def save_atomically(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Create ``path``'s folder and write ``path`` atomically through ``write(temp_path)``.

    Raises:
        ValueError: the folder or file cannot be written (one line naming ``what``, e.g. "--json out.json").
    """
    try:
        if not is_stream(path):
            Path(os.path.realpath(path)).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise ValueError(f"{what}: cannot write it ({exc.strerror or exc})") from None


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed run left for ``path``."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{glob.escape(path.name)}{TEMP_MARK}*"):
            tmp.unlink(missing_ok=True)


def write_legend(out_dir: Path, legend: dict[str, dict], overwrite: bool = False) -> Path:
    """Write ``legend.json`` (left untouched when it already says the same); refuse (ValueError) if the
    folder holds results for another vocabulary, unless ``overwrite``."""
    path = out_dir / LEGEND_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old == legend:
            return path
        if not overwrite:
            names = [v.get("name") for v in old.values()] if isinstance(old, dict) else "unreadable"
            raise ValueError(
                f"--out {out_dir}: holds results for other classes ({names}); use --overwrite or another --out"
            )
    text = json.dumps(legend, indent=2, ensure_ascii=False) + "\n"
    save_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), f"--out {out_dir}")
    return path


_SUFFIXES = {"labels": ".png", "overlay": "_overlay.jpg", "scores": "_scores.npz"}


def output_paths(out_dir: Path, rel: os.PathLike | str, overlay: bool, scores: bool) -> dict[str, Path]:
    """The files ``segment`` writes for one input: kind -> path (labels always, overlay and scores on request)."""
    base = out_dir / Path(rel)
    wanted = {"labels": True, "overlay": overlay, "scores": scores}
    return {kind: base.with_name(base.name + suffix) for kind, suffix in _SUFFIXES.items() if wanted[kind]}


def unwritten_outputs(paths: dict[str, Path]) -> list[Path]:
    """The output files of the same input that a run writing ``paths`` does not write (an overlay or scores from an
    earlier run with other options or classes): they are removed when the input's outputs are rewritten, so an
    input's files always come from one run."""
    labels = paths["labels"]
    base = labels.with_name(labels.name.removesuffix(_SUFFIXES["labels"]))
    return [base.with_name(base.name + suffix) for kind, suffix in _SUFFIXES.items() if kind not in paths]


def write_labels(path: Path, labels: np.ndarray, num_ids: int) -> None:
    """Label map as a palette PNG (VOC colours) when ids fit in 0..255, else as a 16-bit greyscale PNG.

    Args:
        labels: (H, W) integer ids in [0, num_ids).
        num_ids: how many ids the vocabulary has (decides the format, the same for every image of a run).
    """
    from PIL import Image

    if num_ids <= PALETTE_IDS:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(voc_palette().flatten().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def load_font(size: int):
    """Pillow's default font at ``size`` pixels (the fixed bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another label, grown inwards to ``width`` pixels (each region's
    own rim, so a rim drawn in the region's colour stays inside it)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for _ in range(width):  # each pass adds the ring just inside: pixels with a neighbour already on the rim
        grown = edge.copy()
        differs = labels if not edge.any() else np.where(edge, -1, labels)
        grown[:, 1:] |= differs[:, 1:] != differs[:, :-1]
        grown[:, :-1] |= differs[:, :-1] != differs[:, 1:]
        grown[1:] |= differs[1:] != differs[:-1]
        grown[:-1] |= differs[:-1] != differs[1:]
        edge = grown
    return edge


def region_anchors(labels: np.ndarray, min_fraction: float = D.OVERLAY_NAME_MIN_AREA) -> list[tuple[int, int, int]]:
    """(label, y, x) for every connected region covering at least ``min_fraction`` of the image: its most interior
    pixel (farthest from the region's edge), where its name is written."""
    from scipy import ndimage

    # On a grid of at most ~160 pixels a side: a name's position needs no finer placement, and the distance
    # transforms of full-size regions cost more than the rest of writing an overlay.
    step = max(1, max(labels.shape) // 160)
    labels = labels[::step, ::step]
    out = []
    for label in np.unique(labels):
        regions, count = ndimage.label(labels == label)
        if not count:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        for i in np.flatnonzero(sizes >= min_fraction * labels.size):
            region = np.pad(regions == i + 1, 1)  # the image border counts as an edge
            depth = ndimage.distance_transform_edt(region)[1:-1, 1:-1]
            ys, xs = np.nonzero(depth == depth.max())
            cy, cx = np.argwhere(region[1:-1, 1:-1]).mean(0)
            best = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))  # of the deepest pixels, the most central
            out.append((int(label), int(ys[best]) * step, int(xs[best]) * step))
    return out


def render_overlay(image: np.ndarray, labels: np.ndarray, legend: dict[str, dict], alpha: float = D.OVERLAY_ALPHA):
    """The image with each labelled region filled with its colour at ``alpha`` and outlined in it at full strength
    (background neither filled nor outlined), the class name written on every large region, above a legend strip
    naming the classes present.

    The fill is strong enough (0.7 by default) that a region reads as its swatch's colour whatever lies under it;
    the outline in the pure colour and the name settle it where the image beneath shifts the hue.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int ids.
        legend: as built by :func:`build_legend`.

    Returns:
        A PIL RGB image of width W and height H plus the legend strip.
    """
    from PIL import Image, ImageDraw, ImageFont

    palette = np.array([colour(i) for i in range(int(labels.max()) + 1)], dtype=np.float32)
    tint = (labels != 0) if "0" in legend else np.ones(labels.shape, dtype=bool)
    blended = image.astype(np.float32)
    blended[tint] = (1 - alpha) * blended[tint] + alpha * palette[labels[tint]]
    h, w = labels.shape
    rim = boundaries(labels, width=max(1, min(h, w) // 200 + 1)) & tint
    blended[rim] = palette[labels[rim]]
    font = load_font(max(10, min(24, w // 40)))
    line = font.getbbox("Ag")[3] + 8
    entries = [(legend[str(i)]["name"], colour(int(i))) for i in np.unique(labels) if str(i) in legend]
    # Lay the entries out left to right, wrapping to new lines, before knowing the strip's height.
    placed, x, y = [], 4, 4
    for name, col in entries:
        width = line + int(font.getlength(name)) + 12
        if x > 4 and x + width > w:
            x, y = 4, y + line
        placed.append((x, y, name, col))
        x += width
    canvas = Image.new("RGB", (w, h + y + line + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(np.round(blended).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for label, ay, ax in region_anchors(np.where(tint, labels, -1)):
        if label >= 0 and str(label) in legend:
            name = legend[str(label)]["name"]
            # White with a black rim, centred on the anchor: legible on any colour (the rim needs FreeType).
            rim_px = 2 if isinstance(font, ImageFont.FreeTypeFont) else 0
            left, top, right, bottom = draw.textbbox((0, 0), name, font=font, stroke_width=rim_px)
            at = (ax - (right - left) // 2, ay - (bottom - top) // 2)
            draw.text(at, name, fill=(255, 255, 255), font=font, stroke_width=rim_px, stroke_fill=(0, 0, 0))
    for x, y, name, col in placed:
        top = h + y
        draw.rectangle([x, top + 2, x + line - 6, top + line - 4], fill=col, outline=(0, 0, 0))
        draw.text((x + line, top), name, fill=(0, 0, 0), font=font)
    return canvas


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, legend: dict[str, dict]) -> None:
    with atomic_path(path) as tmp:
        render_overlay(image, labels, legend).save(tmp, format="JPEG", quality=90)


def write_image_outputs(
    paths: dict[str, Path],
    image: np.ndarray,
    labels: np.ndarray,
    legend: dict[str, dict],
    num_ids: int,
    scores: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> None:
    """Every planned output of one input (see :func:`output_paths`): scores (when planned and given) and overlay,
    stale files of earlier runs removed, and the label map last, so its presence means the outputs are complete.

    Args:
        image: (H, W, 3) uint8 input image (for the overlay).
        labels: (H, W) integer label ids in [0, num_ids) (see :func:`write_labels`).
        scores: (K, H, W) float scores per legend id, with ``kept`` (K,) bool, for ``_scores.npz``.
    Raises:
        OSError: a file could not be written (what was written before it stays consistent).
    """
    ids = list(map(int, legend))
    paths["labels"].parent.mkdir(parents=True, exist_ok=True)
    if "scores" in paths and scores is not None and kept is not None:
        write_scores(paths["scores"], scores, ids, [legend[str(i)]["name"] for i in ids], kept)
    if "overlay" in paths:
        write_overlay(paths["overlay"], image, labels, legend)
    for stale in unwritten_outputs(paths):
        stale.unlink(missing_ok=True)
    write_labels(paths["labels"], labels, num_ids)


def write_scores(path: Path, scores: np.ndarray, ids: Sequence[int], names: Sequence[str], kept: np.ndarray) -> None:
    """``_scores.npz``: ``scores`` (K, H, W) float16, ``ids`` (K,) label ids, ``names`` (K,) str, ``kept`` (K,)
    bool (False = removed by the pre-filter for this image). Readable with ``np.load`` (no pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            scores=scores.astype(np.float16),
            ids=np.asarray(ids, dtype=np.int64),
            names=np.asarray(list(names), dtype=str),
            kept=np.asarray(kept, dtype=bool),
        )
