"""``ovdiff cache info|clear``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import CacheDirOpt, JsonOpt, open_cache, out, user_errors

app = typer.Typer(help="Inspect or clear the cache.", no_args_is_help=True)


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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
