"""What every command shares: options, the one-line error convention, consoles and progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .. import defaults as D

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Human output goes to stdout; progress, notes and errors to stderr so `--json` output stays clean.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelsOpt = Annotated[
    str | None,
    typer.Option("--models", help="Model set (sd15, tiny), a folder with sd/ dino/ clip/, or NAME,ROLE=PATH,..."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads [default: $OVDIFF_THREADS, else the cores this process may use]."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cache folder [default: $OVDIFF_CACHE or the XDG cache dir]."),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help=f"Run seed for support images [default: {D.SEED}].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail while working.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]
SaveOpt = Annotated[
    Path | None,
    typer.Option("--save", metavar="FILE", help="Write the same JSON object to FILE ('-': stdout)."),
]

# What determines a class's prototypes: synth, segment, explain and eval all accept these.
ClassesFileOpt = Annotated[
    Path | None, typer.Option("--classes-file", help="One class per line; optional 'stuff' or 'thing' column.")
]
StuffOpt = Annotated[
    str | None,
    typer.Option("--stuff", help="Comma list of classes that are 'stuff' (sky, water...); see the README."),
]
NOpt = Annotated[int | None, typer.Option("--n", help=f"Support images per class [default: {D.N_SUPPORT}].")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help=f"Denoising steps [default: {D.STEPS}].")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help=f"Sampler: {', '.join(D.SCHEDULERS)} [default: {D.SCHEDULER}, the paper's]."),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (fp32 on CPU; bf16 SD and CLIP on CUDA), fp32 (the reference's numerics), bf16 or fp16.",
    ),
]
StuffTableOpt = Annotated[
    str | None,
    typer.Option("--stuff-table", help="Built-in thing/stuff table: paper or extended [default: paper]."),
]
MaskerOpt = Annotated[
    str | None, typer.Option("--masker", help=f"auto, cutler, maskcut or threshold [default: {D.MASKER}].")
]
ExtractorsOpt = Annotated[
    str | None,
    typer.Option("--extractors", help=f"Comma list of sd, dino, clip [default: {','.join(D.EXTRACTORS)}]."),
]
KOpt = Annotated[int | None, typer.Option("--k", help=f"Part prototypes per class and region [default: {D.K_PARTS}].")]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help=f"Support images per network batch, at most --n [default: {D.BATCH_SIZE};"
        f" on the CPU {D.CPU_BATCH_SIZE}, tiny: {D.BATCH_SIZE}].",
    ),
]

DEFAULT_MODELS = "sd15"


class UsageError(Exception):
    """A user mistake: reported as one line, exit 2."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's "you asked for something wrong" exceptions into one line and exit 2 (a cache that
    cannot be written: one line, exit 1)."""
    from ..cache import CacheError, CacheWriteError
    from ..models.registry import ModelUnavailable

    try:
        yield
    except (ValueError, UsageError, ModelUnavailable, CacheError) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__) from None
    except CacheWriteError as exc:  # not the user's mistake, but still one line: exit 1
        raise fail(str(exc), EXIT_FAILED) from None


def given(**options: Any) -> dict[str, Any]:
    """Only the options the user set: library defaults stay canonical (None = not given)."""
    return {k: v for k, v in options.items() if v is not None}


def synth_options(**given_options: Any):
    """SynthOptions from the options the user set (None = not given: the library default applies)."""
    from ..pipeline import SynthOptions

    return SynthOptions(**given(**given_options))


def print_notes(class_names: list[str], quiet: bool = False, more: list[str | None] | None = None) -> None:
    """Tell the user about classes whose prompt is cut at the text encoder's token limit, and any ``more`` notes."""
    if quiet:
        return
    from ..synthesis import prompt_notes

    for note in [*prompt_notes(class_names), *(n for n in more or [] if n)]:
        err.print(f"note: {note}", highlight=False, markup=False)


def emit(doc: dict[str, Any], as_json: bool, save: Path | None, dumps: Callable[[Any], str] | None = None) -> bool:
    """Deliver a command's result document: to FILE with ``--save`` (atomically; a link is written through, "-",
    a device or a FIFO is written into), to stdout with ``--json``. Returns whether stdout now holds the document
    (then the human summary must not be printed)."""
    import json

    from ..outputs import STDOUT, save_atomically

    text = dumps(doc) if dumps is not None else json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if save is not None:
        with user_errors():
            save_atomically(save, lambda tmp: tmp.write_text(text, encoding="utf-8"), f"--save {save}")
    if as_json:
        typer.echo(text, nl=False)
    return as_json or (save is not None and str(save) == STDOUT)


def open_cache(cache_dir: Path | None):
    from ..cache import Cache, default_cache_dir

    return Cache(cache_dir or default_cache_dir())


class RichProgress:
    """Progress on stderr: bars with rate and time left on a terminal; off a terminal (logs, batch jobs), plain
    lines, one when a stage starts and then one per item at most every PLAIN_EVERY seconds and at its end.
    Nothing with --quiet."""

    PLAIN_EVERY = 10.0

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.terminal = sys.stderr.isatty()
        self._progress = None
        self._task = None
        self._plain: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        if self.enabled and self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task) -> Text:
                    speed = task.finished_speed or task.speed
                    if not speed:
                        return Text("")
                    return Text(f"{speed:.2f}/s" if speed >= 1 else f"{1 / speed:.1f} s each")

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                Rate(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, label: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(label, total=total)
        elif self.enabled:
            now = time.monotonic()
            self._plain = {"label": label, "total": total, "done": 0, "t0": now, "last": now}
            err.print(f"{label}: 0/{total}", highlight=False, markup=False)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)
        elif self.enabled and self._plain and n:
            plain = self._plain
            plain["done"] += n
            now = time.monotonic()
            if plain["done"] >= plain["total"] or now - plain["last"] >= self.PLAIN_EVERY:
                plain["last"] = now
                err.print(
                    f"{plain['label']}: {plain['done']}/{plain['total']} ({now - plain['t0']:.0f} s)",
                    highlight=False,
                    markup=False,
                )
