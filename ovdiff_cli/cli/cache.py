"""``ovdiff cache info|ls|clear|export|import``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import HELP_OPTIONS, CacheDirOpt, JsonOpt, check_outputs, err, open_cache, out, print_table, user_errors

app = typer.Typer(
    help="List, inspect, clear, export or import the cache.", no_args_is_help=True, context_settings=HELP_OPTIONS
)


@app.command("info")
def info(cache_dir: CacheDirOpt = None, as_json: JsonOpt = False) -> None:
    """Entries and bytes per stage."""
    with user_errors(), open_cache(cache_dir, must_exist=True) as cache:
        stages = cache.info()
        where = str(cache.directory)
    total = {
        "entries": sum(s["entries"] for s in stages.values()),
        "bytes": sum(s["bytes"] for s in stages.values()),
    }
    if as_json:
        typer.echo(json.dumps({"directory": where, "stages": stages, "total": total}, indent=2))
        return
    rows = [(stage, s["entries"], _human(s["bytes"])) for stage, s in sorted(stages.items())]
    print_table(("stage", "entries", "size"), [*rows, ("total", total["entries"], _human(total["bytes"]))], title=where)


@app.command("ls")
def ls(
    cache_dir: CacheDirOpt = None,
    class_name: Annotated[str | None, typer.Option("--class", help="Only this class's banks.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One row per cached prototype bank: its class and the settings that made it, when, and its size."""
    from datetime import datetime

    from ..pipeline.synth import cached_banks

    with user_errors(), open_cache(cache_dir, must_exist=True) as cache:
        banks = cached_banks(cache, class_name)
        where = str(cache.directory)
    fields = ("model_set", "n", "steps", "seed", "scheduler", "masker", "k", "batch_size", "precision")
    rows = [
        {
            "class": b.class_name,
            **{f: b.meta.get(f) for f in fields},
            "photos": b.photos,
            "extractors": b.extractors,
            "stored": datetime.fromtimestamp(b.stored_at).astimezone().isoformat(timespec="seconds"),
            "bytes": b.bytes,
            "key": b.key,
        }
        for b in sorted(banks, key=lambda b: (b.class_name, b.stored_at))
    ]
    if as_json:
        typer.echo(json.dumps({"directory": where, "banks": rows}, indent=2))
        return
    settings = ("model_set", "n", "photos", "steps", "seed", "masker", "batch_size", "precision")
    print_table(
        (
            "class",
            "models",
            "generated",
            "photos",
            "steps",
            "seed",
            "masker",
            "batch",
            "precision",
            "extractors",
            "stored",
            "size",
        ),
        [
            (
                r["class"],
                *("?" if r[f] is None else r[f] for f in settings),
                ",".join(r["extractors"]),
                r["stored"],
                _human(r["bytes"]),
            )
            for r in rows
        ],
        title=where,
        shown={"stored": lambda when: when.replace("T", " ")[:16]},  # the whole ISO time when piped
    )
    if not rows:  # on stderr: piped, stdout holds only the table
        err.print("no prototype banks" + (f" for {class_name!r}" if class_name else ""), markup=False)


@app.command("clear")
def clear(
    cache_dir: CacheDirOpt = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="Only this stage: support, proposals or bank (see `cache info`).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete cached entries (all, or one stage's). On a terminal it asks first; --yes skips the question."""
    from ..cache import STAGES

    with user_errors(), open_cache(cache_dir, must_exist=True) as cache:
        if stage is not None and stage not in STAGES:
            raise ValueError(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
        stages = cache.info()
        chosen = [stage] if stage is not None else list(stages)
        count = sum(stages.get(s, {}).get("entries", 0) for s in chosen)
        size = sum(stages.get(s, {}).get("bytes", 0) for s in chosen)
        what = f"{count} entries ({_human(size)})" + (f" of stage {stage}" if stage else "")
        asked = count and not yes and _on_a_terminal()
        if asked and not typer.confirm(f"delete {what} from {cache.directory}?", default=False, err=True):
            err.print("nothing deleted")
            raise typer.Exit(1)
        removed = cache.clear(stage)
        where = cache.directory
    out.print(f"removed {removed} entries from {where}")


@app.command("export")
def export(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The file to write.")],
    classes: Annotated[str | None, typer.Option("--classes", help="Only these classes (comma list).")] = None,
    with_support: Annotated[
        bool, typer.Option("--with-support", help="Include the support images too (for explain).")
    ] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Write the cached prototype banks into one file, for `ovdiff cache import` on another machine."""
    from ..classes import split_list
    from ..sharing import collect, describe, write_export

    with user_errors():
        check_outputs(("FILE", file))
    with user_errors(), open_cache(cache_dir, must_exist=True) as cache:
        entries = collect(cache, split_list(classes) if classes else None, with_support)
        if not entries:
            raise ValueError(
                f"--cache-dir {cache.directory}: no prototype banks to export" + (f" for {classes}" if classes else "")
            )
        write_export(file, entries)
    out.print(f"exported {describe(entries)} to {file}")


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A file from `ovdiff cache export`.")],
    cache_dir: CacheDirOpt = None,
) -> None:
    """Check an export file completely, then add its prototype banks to the cache (nothing if any check fails)."""
    from ..sharing import describe, import_entries, read_export

    with user_errors():
        entries = read_export(file)
        with open_cache(cache_dir) as cache:
            added, present = import_entries(cache, entries)
            where = cache.directory
    out.print(f"imported {describe(entries)} into {where}: {added} new, {present} already there")


def _on_a_terminal() -> bool:
    """Whether a person can answer a question (scripts and pipes are never asked)."""
    import sys

    return sys.stdin.isatty()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
