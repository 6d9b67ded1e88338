"""Commands whose capability has not landed yet: they say so and exit 2 instead of pretending."""

from __future__ import annotations

import typer

from .common import EXIT_USAGE, err

_ISSUES = {"eval": 5}
PENDING_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def pending(name: str):
    def command(ctx: typer.Context) -> None:
        err.print(f"ovdiff {name} is not yet available in this version (planned in issue {_ISSUES[name]})")
        raise typer.Exit(EXIT_USAGE)

    command.__doc__ = f"(not yet available) {name.capitalize()} images with synthesised prototypes."
    return command
