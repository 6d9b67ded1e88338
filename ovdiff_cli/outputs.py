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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

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


_COLOURS = [(int(r), int(g), int(b)) for r, g, b in voc_palette()]  # built once: drawing asks for many colours


def colour(label: int) -> tuple[int, int, int]:
    """The display colour of a label id (VOC colours, repeating past 255)."""
    return _COLOURS[int(label) % PALETTE_IDS]


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


def writes_to_stdout(path: Path) -> bool:
    """Whether writing ``path`` writes this process's standard output: "-", or another name of it (/dev/stdout,
    or the file stdout is redirected to)."""
    if str(path) == STDOUT:
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such file; a stdout without a descriptor (test harnesses)
        return False


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


PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # suffix -> Pillow format


def picture_format(path: Path, what: str) -> str:
    """The Pillow format of a picture written to ``path``, from its suffix: "PNG" (.png, and "-", a device or a
    FIFO) or "JPEG" (.jpg, .jpeg). Raises ValueError naming ``what`` for any other name."""
    if is_stream(path):
        return "PNG"
    fmt = PICTURE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{what}: expected a file name ending in .png, .jpg or .jpeg (or '-' for stdout)")
    return fmt


def save_with_fallback(
    path: Path, write: Callable[[Path], None], what: str, fallback_prefix: str
) -> tuple[Path, str | None]:
    """:func:`save_atomically`; should that fail (the path was checked before the work, but a disk can fill up),
    the finished bytes go to a new file in the temp folder instead, so the work is not lost.

    Returns:
        (the file written, None) or (the fallback file, the reason ``path`` could not be written).
    Raises:
        ValueError: neither could be written.
    """
    try:
        save_atomically(path, write, what)
        return path, None
    except ValueError as exc:
        fd, name = tempfile.mkstemp(prefix=f"{fallback_prefix}-", suffix=Path(path).suffix or ".png")
        os.close(fd)
        try:
            write(Path(name))
        except OSError:
            Path(name).unlink(missing_ok=True)
            raise exc from None
        return Path(name), str(exc)


def check_writable(path: Path, what: str, *, folder: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output that could not be written at the end or would replace an input.

    "-", a device or a FIFO is always accepted (written in place). Otherwise ``path`` must be a file name (a
    folder with ``folder=True``), not one of ``inputs``, and its nearest existing folder must let a file be
    created: a hidden probe file is created and removed there, so read-only folders, /proc and full quotas are
    found now rather than after the work.

    Raises:
        ValueError: one line naming ``what`` (e.g. "--save x.json") and why.
    """
    if not folder and is_stream(path):
        return
    final = Path(os.path.realpath(path))
    if final.exists() and final.is_dir() != folder:
        raise ValueError(f"{what}: is a folder; give a file name" if not folder else f"{what}: is not a folder")
    if not folder and final in {Path(os.path.realpath(p)) for p in inputs}:
        raise ValueError(f"{what}: is an input file; writing the result there would replace it")
    where = final if folder else final.parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise ValueError(f"{what}: {where} is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{final.name}{TEMP_MARK}probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {where} ({exc.strerror or exc})") from None


def _output_files(out_dir: Path) -> Iterator[Path]:
    """Every file under ``out_dir`` named like a segment output (label PNG, overlay, scores), hidden ones aside."""
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.endswith(tuple(_SUFFIXES.values())):
                yield Path(root) / name


def _listed(paths: Sequence[Path], base: Path, most: int = 3) -> str:
    shown = ", ".join(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def check_out_folder(
    out_dir: Path,
    legend: dict[str, dict],
    inputs: Sequence[str],
    input_files: Sequence[tuple[Path, PurePosixPath]],
    *,
    overlay: bool,
    scores: bool,
    overwrite: bool,
) -> None:
    """Refuse, before any work, an ``--out`` folder where ``segment`` would destroy or mix files.

    Args:
        inputs: the INPUT arguments (files, folders, globs).
        input_files: (file, output name) of every image found, in every shard (see inputs.find_images).

    Raises:
        ValueError (one line) when ``out_dir``: is not a folder or cannot be written (see :func:`check_writable`);
        is an INPUT folder (outputs would mix with the
        photos and be read as photos next time); would receive an output in place of an input file; holds a file
        at an output's path but no legend.json from ovdiff (a user's own file); holds results for another
        vocabulary without ``overwrite``; or, with ``overwrite``, holds outputs of images not in this run that
        the new legend would mislabel (a folder never mixes vocabularies).
    """
    check_writable(out_dir, f"--out {out_dir}", folder=True)
    final = Path(os.path.realpath(out_dir))
    if any(os.path.isdir(raw) and Path(os.path.realpath(raw)) == final for raw in inputs):
        raise ValueError(
            f"--out {out_dir}: is an input folder; outputs would mix with the images (and be read as images next"
            " time): choose another folder (a subfolder of it is fine: it is never searched)"
        )
    sources = {Path(os.path.realpath(f)): f for f, _ in input_files}
    planned = [p for _, rel in input_files for p in output_paths(out_dir, rel, overlay, scores).values()]
    for path in planned:
        if (source := sources.get(Path(os.path.realpath(path)))) is not None:
            raise ValueError(f"--out {out_dir}: would write {path} over the input {source}; choose another folder")
    old = read_legend(out_dir / LEGEND_FILE)
    if (out_dir / LEGEND_FILE).exists() and old is None:
        raise ValueError(f"--out {out_dir}: its {LEGEND_FILE} was not written by ovdiff; choose another folder")
    if old is None:
        if taken := [p for p in planned if p.exists()]:
            raise ValueError(
                f"--out {out_dir}: would replace {_listed(taken, out_dir)}, which ovdiff did not write (the folder"
                f" has no {LEGEND_FILE}); choose a new or empty folder"
            )
        return
    if old == legend:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out_dir}: holds results for other classes ({legend_names(old)}); use --overwrite or another --out"
        )
    ours = {p for _, rel in input_files for p in output_paths(out_dir, rel, True, True).values()}
    if stale := sorted(p for p in _output_files(out_dir) if p not in ours):
        raise ValueError(
            f"--out {out_dir}: --overwrite would leave {_listed(stale, out_dir)} of images not in this run labelled"
            f" with the old classes ({legend_names(old)}) under the new legend; remove them, add their images to"
            " this run, or use another --out"
        )


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed run left for ``path``."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{glob.escape(path.name)}{TEMP_MARK}*"):
            tmp.unlink(missing_ok=True)


def read_legend(path: Path) -> dict[str, dict] | None:
    """The legend in ``path`` if it is one ovdiff wrote (label id -> name, colour, type), else None: no file, an
    unreadable one, or another program's JSON. A folder with such a file holds ovdiff's outputs."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not doc:
        return None
    for key, entry in doc.items():
        if not (key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("name"), str)):
            return None
        if entry.get("type") not in {"thing", "stuff", "background"}:
            return None
    return doc


def legend_names(legend: dict[str, dict]) -> str:
    """ "background, cat, dog": a legend's class names in id order, for messages."""
    return ", ".join(str(legend[k].get("name")) for k in sorted(legend, key=int))


def write_legend(out_dir: Path, legend: dict[str, dict], overwrite: bool = False) -> Path:
    """Write ``legend.json`` (left untouched when it already says the same); refuse (ValueError) if the
    folder holds results for another vocabulary, unless ``overwrite``."""
    path = out_dir / LEGEND_FILE
    if path.exists():
        old = read_legend(path)
        if old == legend:
            return path
        if old is None:
            raise ValueError(f"--out {out_dir}: its {LEGEND_FILE} was not written by ovdiff; choose another --out")
        if not overwrite:
            raise ValueError(
                f"--out {out_dir}: holds results for other classes ({legend_names(old)});"
                " use --overwrite or another --out"
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
    return _rims(labels, width)[0]


def _rims(labels: np.ndarray, *widths: int) -> list[np.ndarray]:
    """:func:`boundaries` at each of ``widths`` ((H, W) bool each), from one run of the passes."""
    edge = np.zeros(labels.shape, dtype=bool)
    out = {}
    for n in range(1, max(widths) + 1):  # each pass adds the ring just inside: pixels with a neighbour on the rim
        grown = edge.copy()
        differs = labels if not edge.any() else np.where(edge, -1, labels)
        grown[:, 1:] |= differs[:, 1:] != differs[:, :-1]
        grown[:, :-1] |= differs[:, :-1] != differs[:, 1:]
        grown[1:] |= differs[1:] != differs[:-1]
        grown[:-1] |= differs[:-1] != differs[1:]
        edge = out[n] = grown
    return [out[w] if w > 0 else np.zeros(labels.shape, dtype=bool) for w in widths]


def halo_colour(col: Sequence[int]) -> tuple[int, int, int]:
    """The contrasting colour drawn beside an outline of colour ``col`` (RGB, 0..255): white beside a dark colour
    (Rec. 601 luma below 128: VOC's black, dark red, dark blue, ...), black beside a light one."""
    r, g, b = (float(c) for c in col[:3])
    return (255, 255, 255) if 0.299 * r + 0.587 * g + 0.114 * b < 128 else (0, 0, 0)


def draw_outlines(
    pixels: np.ndarray,
    labels: np.ndarray,
    width: int,
    colours: np.ndarray,
    where: np.ndarray | None = None,
    dashed: np.ndarray | None = None,
    frame: bool = False,
    dash: int = 4,
) -> np.ndarray:
    """Outline every region of ``labels`` inside itself, legibly on any picture (overlays and explain's picture).

    A solid outline is the region's rim (``width`` pixels) in its colour with a halo (``max(1, width // 2)``
    pixels, just inside the rim) in :func:`halo_colour`: white beside a dark colour, black beside a light one, so
    a dark red outline still shows on a dark photo. A dashed outline has no halo: its rim alternates ``dash``-pixel
    dashes of the colour and of its halo colour.

    Args:
        pixels: (H, W, 3) uint8 or float image, drawn on in place.
        labels: (H, W) int ids, >= 0 where drawn on (a negative id marks pixels outside ``where``).
        width: the rim's width in pixels (>= 1).
        colours: (K, 3) the colour of each label id (ids < K).
        where: (H, W) bool, the only pixels drawn on (e.g. not background); None = all.
        dashed: (K,) bool, the ids drawn dashed; None = none.
        frame: the array's border is an edge too (a region touching it is outlined along it).

    Returns:
        ``pixels``.
    """
    lab = np.asarray(labels).astype(np.int64)
    if frame:  # the border as a label of its own
        lab = np.pad(lab, 1, constant_values=-1)
    rim, inner = _rims(lab, width, width + max(1, width // 2))
    ring = inner & ~rim
    if frame:
        lab, rim, ring = lab[1:-1, 1:-1], rim[1:-1, 1:-1], ring[1:-1, 1:-1]
    if where is not None:
        rim, ring = rim & where, ring & where
    pal = np.asarray(colours, dtype=np.float32).reshape(-1, 3)
    contrast = np.array([halo_colour(c) for c in pal], dtype=np.float32).reshape(-1, 3)
    solid, halo = rim, ring
    if dashed is not None and np.asarray(dashed).any():
        is_dashed = np.asarray(dashed, dtype=bool)[lab]
        ys, xs = np.nonzero(rim & is_dashed)
        gap = np.zeros_like(rim)
        odd = ((ys + xs) // dash) % 2 == 1  # every other dash along rows, columns and diagonals
        gap[ys[odd], xs[odd]] = True
        solid, halo = rim & ~gap, (ring & ~is_dashed) | gap
    pixels[solid] = pal[lab[solid]]
    pixels[halo] = contrast[lab[halo]]
    return pixels


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
    with a contrasting halo (background neither filled nor outlined), the class name written on every large
    region, above a legend strip naming the classes present.

    The fill is strong enough (0.7 by default) that a region reads as its swatch's colour whatever lies under it;
    the outline in the pure colour and the name settle it where the image beneath shifts the hue, and the halo
    just inside the outline (white beside a dark colour, black beside a light one, see :func:`draw_outlines`)
    keeps it visible where the photo is as dark (or as light) as the colour.

    The strip shows every legend entry whole: where the image is narrower than an entry (a 16-pixel-wide image
    and "dog"), the canvas is widened with white on the right, never the names cut.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int ids.
        legend: as built by :func:`build_legend`.

    Returns:
        A PIL RGB image: the (H, W) image at the top left, the legend strip below it; max(W, widest legend
        entry + 8) wide.
    """
    from PIL import Image, ImageDraw, ImageFont

    palette = np.array([colour(i) for i in range(int(labels.max()) + 1)], dtype=np.float32)
    tint = (labels != 0) if "0" in legend else np.ones(labels.shape, dtype=bool)
    blended = image.astype(np.float32)
    blended[tint] = (1 - alpha) * blended[tint] + alpha * palette[labels[tint]]
    h, w = labels.shape
    draw_outlines(blended, labels, max(1, min(h, w) // 200 + 1), palette, where=tint)
    font = load_font(max(10, min(24, w // 40)))
    line = font.getbbox("Ag")[3] + 8
    # (label, name, swatch + name width) of each painted label present: background's pixels are left as they are,
    # with no colour to key, so it has no entry (a black swatch would claim they were painted black); unpainted
    # means background. The strip is at least as wide as its widest entry.
    entries = [
        (int(i), legend[str(i)]["name"], line + int(np.ceil(font.getlength(legend[str(i)]["name"]))))
        for i in np.unique(labels[tint])
        if str(i) in legend
    ]
    canvas_w = max([w] + [width + 8 for _, _, width in entries])
    # Lay the entries out left to right, wrapping to new lines, before knowing the strip's height.
    placed, x, y = [], 4, 4
    for label, name, width in entries:
        if x > 4 and x + width + 4 > canvas_w:
            x, y = 4, y + line
        placed.append((x, y, label, name))
        x += width + 12
    canvas = Image.new("RGB", (canvas_w, h + y + line + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(np.round(blended).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for label, ay, ax in region_anchors(np.where(tint, labels, -1)):
        if label >= 0 and str(label) in legend:
            name = legend[str(label)]["name"]
            # White with a black rim, centred on the anchor (kept on the canvas): legible on any colour (the rim
            # needs FreeType).
            rim_px = 2 if isinstance(font, ImageFont.FreeTypeFont) else 0
            left, top, right, bottom = draw.textbbox((0, 0), name, font=font, stroke_width=rim_px)
            at = (min(max(0, ax - (right - left) // 2), canvas_w - right), max(0, ay - (bottom - top) // 2))
            draw.text(at, name, fill=(255, 255, 255), font=font, stroke_width=rim_px, stroke_fill=(0, 0, 0))
    for x, y, label, name in placed:
        top = h + y
        draw.rectangle([x, top + 2, x + line - 6, top + line - 4], fill=colour(label), outline=(0, 0, 0))
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


def count_noun(n: int, noun: str) -> str:
    """``count_noun(1, 'pixel')`` -> '1 pixel', ``count_noun(3, 'pixel')`` -> '3 pixels'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
