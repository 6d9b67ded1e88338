"""Class lists: from the command line or a classes file, normalised and validated (no heavy imports)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .vocabularies import PAPER, is_stuff


@dataclass(frozen=True)
class ClassSpec:
    """A class to segment. ``stuff`` marks amorphous regions (sky, water) for the stuff filter (paper 3.4);
    ``stuff_from`` says who decided: ``"user"`` (--stuff or a classes file) or the stuff table's name."""

    name: str
    stuff: bool = False
    stuff_from: str = field(default="user", compare=False)


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


def read_classes_file(path: Path) -> list[tuple[str, bool | None]]:
    """Parse a classes file: one class per line, optional second column ``stuff`` or ``thing``.

    Returns (raw name, True for stuff / False for thing / None when the column is absent) per class.

    Columns are separated by a tab or a comma; blank lines and lines starting with ``#`` are ignored.
    """
    return [(name, marker) for _, name, marker in _file_entries(path)]


def _file_entries(path: Path) -> list[tuple[int, str, bool | None]]:
    """(line number, raw name, stuff marker) per class line of the classes file ``path``."""
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
        # The first tab separates the columns (a name never holds one); without a tab, the first comma does.
        sep = "\t" if "\t" in line else ","
        name, _, marker = line.partition(sep)
        marker = marker.strip().lower()
        if marker not in {"", "stuff", "thing"}:
            raise ValueError(f"--classes-file {path}:{lineno}: second column {marker!r}, expected 'stuff' or 'thing'")
        out.append((lineno, name, {"stuff": True, "thing": False}.get(marker)))
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
    entries: list[tuple[str, bool | None, str]] = [(n, None, names_from) for n in names or []]
    if classes_file is not None:
        entries += [(raw, marker, f"{classes_file} line {n}") for n, raw, marker in _file_entries(classes_file)]
    if not entries:
        raise ValueError("no classes given: pass class names or --classes-file FILE")
    stuff_set = {normalise(s).casefold() for s in stuff or []}
    seen: dict[str, tuple[str, str]] = {}
    out = []
    for raw, marker, where in entries:
        name = _check_name(raw, where)
        fold = name.casefold()
        if fold in seen:
            raise ValueError(_twice(name, where, *seen[fold]))
        seen[fold] = (name, where)
        if fold in stuff_set:
            marker = True
        if marker is None:
            out.append(ClassSpec(name, is_stuff(name, stuff_table), stuff_table))
        else:
            out.append(ClassSpec(name, marker, "user"))
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
