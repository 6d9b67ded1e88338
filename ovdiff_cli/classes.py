"""Class lists: from the command line or a classes file, normalised and validated (no heavy imports)."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .vocabularies import PAPER, is_stuff


@dataclass(frozen=True)
class ClassSpec:
    """A class to segment. ``stuff`` marks amorphous regions (sky, water) for the stuff filter (paper 3.4);
    ``stuff_from`` says who decided: ``"user"`` (--stuff or a classes file) or the stuff table's name.

    A class may have the user's own photos in its support set: ``photos`` (a folder) with ``photo_masks`` (a folder
    of masks by stem), ``n`` its own count of generated images (None: the run's --n), and ``photo_set`` the photos
    as listed and checked (a photos.PhotoSet, filled in by pipeline.photo_sets before any work).
    """

    name: str
    stuff: bool = False
    stuff_from: str = field(default="user", compare=False)
    photos: Path | None = None
    photo_masks: Path | None = None
    n: int | None = None
    photo_set: Any = field(default=None, compare=False, repr=False)


def normalise(name: str) -> str:
    """Trim and collapse internal whitespace: ``"  potted   plant "`` -> ``"potted plant"``."""
    return " ".join(name.split())


def _check_name(raw: str, where: str) -> str:
    """The normalised name; ValueError naming the class and ``where`` it came from for a control character inside
    it (a tab or line break too: only the whitespace around a name is trimmed) or an empty name."""
    bad = [ch for ch in raw.strip() if unicodedata.category(ch).startswith("C")]
    if bad:
        raise ValueError(f"class {raw!r} in {where}: contains control character {bad[0]!r}; use plain text names")
    name = normalise(raw)
    if not name:
        raise ValueError(f"class {raw!r} in {where}: empty name")
    return name


def split_list(value: str) -> list[str]:
    """``"cat, dog,sky"`` -> ["cat", "dog", "sky"] (empty items are an error, not silently dropped).

    Items are trimmed and their runs of spaces collapsed; a tab or other control character inside one is kept, for
    build_class_list to refuse.
    """
    items = [" ".join(word for word in item.strip().split(" ") if word) for item in value.split(",")]
    if not all(normalise(i) for i in items):
        raise ValueError(f"class list {value!r}: has an empty item (check for doubled or trailing commas)")
    return items


@dataclass(frozen=True)
class _Entry:
    """One class line of a classes file: its line number, raw name and columns."""

    lineno: int
    name: str
    stuff: bool | None = None
    photos: Path | None = None
    masks: Path | None = None
    n: int | None = None


def read_classes_file(path: Path) -> list[tuple[str, bool | None]]:
    """Parse a classes file: one class per line, optional columns ``stuff`` or ``thing``, ``photos:DIR``,
    ``masks:DIR`` and ``n:K`` (see :func:`build_class_list`).

    Returns (raw name, True for stuff / False for thing / None when the column is absent) per class.

    Columns are separated by tabs or commas; blank lines and lines starting with ``#`` are ignored.
    """
    return [(e.name, e.stuff) for e in _file_entries(path)]


def _column(entry: _Entry, column: str, path: Path) -> _Entry:
    """``entry`` with one more column parsed: stuff/thing, photos:DIR, masks:DIR (relative to the file's folder)
    or n:K; ValueError naming the line for anything else."""
    where = f"--classes-file {path}:{entry.lineno}"
    word = column.strip()
    low = word.lower()
    if low in {"stuff", "thing"}:
        return replace(entry, stuff=low == "stuff")
    key, sep, value = word.partition(":")
    key, value = key.strip().lower(), value.strip()
    if sep and key in {"photos", "masks"} and value:
        folder = Path(value).expanduser()
        folder = folder if folder.is_absolute() else Path(os.path.normpath(path.parent / folder))
        return replace(entry, **{key: folder})
    if sep and key == "n":
        if not value.isdigit():
            raise ValueError(f"{where}: column {word!r}: n must be a whole number of generated images (0 or more)")
        return replace(entry, n=int(value))
    raise ValueError(f"{where}: column {word!r}, expected 'stuff', 'thing', 'photos:DIR', 'masks:DIR' or 'n:K'")


def _file_entries(path: Path) -> list[_Entry]:
    """Every class line of the classes file ``path``, parsed."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM some editors write
    except FileNotFoundError:
        raise ValueError(f"--classes-file {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--classes-file {path}: is a folder; expected a text file, one class per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--classes-file {path}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # Tabs separate the columns (a name never holds one); without a tab, commas do.
        name, *columns = line.split("\t" if "\t" in line else ",")
        entry = _Entry(lineno, name)
        for column in columns:
            if column.strip():
                entry = _column(entry, column, path)
        if entry.masks is not None and entry.photos is None:
            raise ValueError(f"--classes-file {path}:{lineno}: a masks: column needs a photos: column")
        out.append(entry)
    return out


def build_class_list(
    names: list[str] | None = None,
    classes_file: Path | None = None,
    stuff: list[str] | None = None,
    stuff_table: str = PAPER,
    names_from: str = "the class list",
) -> list[ClassSpec]:
    """Validated classes in the user's order.

    A class is stuff if ``stuff`` names it or its file line says ``stuff``; a file line saying ``thing`` makes
    it a thing; otherwise the built-in table ``stuff_table`` decides (vocabularies.is_stuff). ``names_from`` is
    where ``names`` came from, for messages ("--classes", "the arguments").

    Raises ValueError (one line naming the bad value and where it came from) for: no classes, empty names, control
    characters (tabs included), duplicates after normalising case and spaces, and ``stuff`` names that are not in
    the list.
    """
    entries: list[tuple[_Entry, str]] = [(_Entry(0, n), names_from) for n in names or []]
    if classes_file is not None:
        entries += [(e, f"{classes_file} line {e.lineno}") for e in _file_entries(classes_file)]
    if not entries:
        raise ValueError("no classes given: pass class names or --classes-file FILE")
    stuff_set = {normalise(s).casefold() for s in stuff or []}
    seen: dict[str, tuple[str, str]] = {}
    out = []
    for entry, where in entries:
        raw, marker = entry.name, entry.stuff
        name = _check_name(raw, where)
        fold = name.casefold()
        if fold in seen:
            raise ValueError(_twice(name, where, *seen[fold]))
        seen[fold] = (name, where)
        if fold in stuff_set:
            marker = True
        photos = {"photos": entry.photos, "photo_masks": entry.masks, "n": entry.n}
        if marker is None:
            out.append(ClassSpec(name, is_stuff(name, stuff_table), stuff_table, **photos))
        else:
            out.append(ClassSpec(name, marker, "user", **photos))
    unknown = stuff_set - set(seen)
    if unknown:
        raise ValueError(f"--stuff {sorted(unknown)[0]!r}: not one of the classes")
    return out


def _twice(name: str, where: str, first: str, first_where: str) -> str:
    """The message for a duplicate, e.g. class 'Cat' is listed twice: in --classes as 'cat' and in c.txt line 3."""
    spelt = f" as {first!r}" if first != name else ""
    if where == first_where:
        return f"class {name!r} is listed twice in {where}" + (f" (also{spelt})" if spelt else "")
    return f"class {name!r} is listed twice: in {first_where}{spelt} and in {where}"


def attach_photos(classes: list[ClassSpec], photos: list[str], masks: list[str]) -> list[ClassSpec]:
    """``classes`` with the folders of ``--photos`` and ``--photo-masks`` attached.

    Each value is ``DIR`` when there is one class, else ``CLASS=DIR`` (the class as listed); a class gets one
    photos folder and at most one masks folder, and masks only with photos.

    Raises:
        ValueError: a value naming no listed class, a bare DIR with several classes, or a folder given twice.
    """
    by_name = {c.name.casefold(): i for i, c in enumerate(classes)}
    out = list(classes)
    for option, values, field_name in (("--photos", photos, "photos"), ("--photo-masks", masks, "photo_masks")):
        for value in values:
            name, sep, folder = value.rpartition("=")
            if not sep or (len(classes) == 1 and not name):
                if len(classes) != 1:
                    raise ValueError(f"{option} {value!r}: with several classes, say which one: {option} CLASS=DIR")
                index, folder = 0, value
            elif normalise(name).casefold() in by_name:
                index = by_name[normalise(name).casefold()]
            elif len(classes) == 1:
                index, folder = 0, value  # a folder whose name holds "="
            else:
                listed = ", ".join(c.name for c in classes)
                raise ValueError(f"{option} {value!r}: {name!r} is not one of the classes ({listed})")
            if (earlier := getattr(out[index], field_name)) is not None:
                raise ValueError(f"{option} {value!r}: class {out[index].name!r} already has {option} {earlier}")
            out[index] = replace(out[index], **{field_name: Path(folder).expanduser()})
    for spec in out:
        if spec.photo_masks is not None and spec.photos is None:
            raise ValueError(f"--photo-masks {spec.photo_masks}: class {spec.name!r} has no --photos folder")
    return out
