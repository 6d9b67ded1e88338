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


def _check_name(raw: str) -> str:
    bad = [ch for ch in raw if unicodedata.category(ch).startswith("C") and ch not in " \t"]
    if bad:
        raise ValueError(f"class {raw!r}: contains control character {bad[0]!r}; use plain text names")
    name = normalise(raw)
    if not name:
        raise ValueError(f"class {raw!r}: empty name")
    return name


def split_list(value: str) -> list[str]:
    """``"cat, dog,sky"`` -> ["cat", "dog", "sky"] (empty items are an error, not silently dropped)."""
    items = [normalise(i) for i in value.split(",")]
    if not all(items):
        raise ValueError(f"class list {value!r}: has an empty item (check for doubled or trailing commas)")
    return items


def read_classes_file(path: Path) -> list[tuple[str, bool | None]]:
    """Parse a classes file: one class per line, optional second column ``stuff`` or ``thing``.

    Returns (raw name, True for stuff / False for thing / None when the column is absent) per class.

    Columns are separated by a tab or a comma; blank lines and lines starting with ``#`` are ignored.
    """
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
        sep = "\t" if "\t" in line else ","
        name, _, marker = line.partition(sep)
        marker = marker.strip().lower()
        if marker not in {"", "stuff", "thing"}:
            raise ValueError(f"--classes-file {path}:{lineno}: second column {marker!r}, expected 'stuff' or 'thing'")
        out.append((name, {"stuff": True, "thing": False}.get(marker)))
    return out


def build_class_list(
    names: list[str] | None = None,
    classes_file: Path | None = None,
    stuff: list[str] | None = None,
    stuff_table: str = PAPER,
) -> list[ClassSpec]:
    """Validated classes in the user's order.

    A class is stuff if ``stuff`` names it or its file line says ``stuff``; a file line saying ``thing`` makes
    it a thing; otherwise the built-in table ``stuff_table`` decides (vocabularies.is_stuff).

    Raises ValueError (one line naming the bad value) for: no classes, empty names, control characters,
    duplicates after normalising case and spaces, and ``stuff`` names that are not in the list.
    """
    entries: list[tuple[str, bool | None]] = [(n, None) for n in names or []]
    if classes_file is not None:
        entries += read_classes_file(classes_file)
    if not entries:
        raise ValueError("no classes given: pass class names or --classes-file FILE")
    stuff_set = {normalise(s).casefold() for s in stuff or []}
    seen: dict[str, str] = {}
    out = []
    for raw, marker in entries:
        name = _check_name(raw)
        fold = name.casefold()
        if fold in seen:
            raise ValueError(f"class {name!r} is listed twice (as {seen[fold]!r} too)")
        seen[fold] = name
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
