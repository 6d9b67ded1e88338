"""``ovdiff cache info|clear|export|import``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import CacheDirOpt, JsonOpt, open_cache, out, user_errors

app = typer.Typer(help="Inspect, clear, export or import the cache.", no_args_is_help=True)


@app.command("info")
def info(cache_dir: CacheDirOpt = None, as_json: JsonOpt = False) -> None:
    """Entries and bytes per stage."""
    with user_errors(), open_cache(cache_dir) as cache:
        stages = cache.info()
        where = str(cache.directory)
    total = {
        "entries": sum(s["entries"] for s in stages.values()),
        "bytes": sum(s["bytes"] for s in stages.values()),
    }
    if as_json:
        typer.echo(json.dumps({"directory": where, "stages": stages, "total": total}, indent=2))
        return
    from rich.table import Table

    table = Table("stage", "entries", "size", title=where)
    for stage, s in sorted(stages.items()):
        table.add_row(stage, str(s["entries"]), _human(s["bytes"]))
    table.add_row("total", str(total["entries"]), _human(total["bytes"]), style="bold")
    out.print(table)


@app.command("clear")
def clear(
    cache_dir: CacheDirOpt = None,
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage (see `cache info`).")] = None,
) -> None:
    """Delete cached entries (all, or one stage's)."""
    with user_errors(), open_cache(cache_dir) as cache:
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

    with user_errors(), open_cache(cache_dir) as cache:
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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
