"""What every command shares: options, the one-line error convention, consoles and progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _quiet_or_verbose(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> bool:
    """-q and -v contradict each other: one line, exit 2 (whichever comes second on the command line sees the
    other already set)."""
    other = "verbose" if param.name == "quiet" else "quiet"
    if value and ctx.params.get(other) and not ctx.resilient_parsing:
        raise fail("-q/--quiet and -v/--verbose: give one of them (quiet: errors only; verbose: more detail)")
    return value


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.", callback=_quiet_or_verbose)]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="More detail while working.", callback=_quiet_or_verbose)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]
SaveOpt = Annotated[
    Path | None,
    typer.Option("--save", metavar="FILE", help="Write the same JSON object to FILE ('-': stdout)."),
]

# What determines a class's prototypes: synth, segment, explain and eval all accept these.
ClassesFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--classes-file", help="One class per line; optional columns stuff or thing, photos:DIR, masks:DIR, n:K."
    ),
]
PhotosOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--photos",
        metavar="[CLASS=]DIR",
        help="Your own photos of a class, added to its support set (--n 0: photos only). CLASS= with several classes.",
    ),
]
PhotoMasksOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--photo-masks",
        metavar="[CLASS=]DIR",
        help="Masks of those photos, one PNG per photo by stem (non-zero = object); photos without one are attributed.",
    ),
]
StuffOpt = Annotated[
    str | None,
    typer.Option("--stuff", help="Comma list of classes that are 'stuff' (sky, water...); see the README."),
]
NOpt = Annotated[
    int | None,
    typer.Option(
        "--n", help=f"Generated support images per class; 0 with --photos: photos only [default: {D.N_SUPPORT}]."
    ),
]
StepsOpt = Annotated[int | None, typer.Option("--steps", help=f"Denoising steps [default: {D.STEPS}].")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help=f"Sampler: {', '.join(D.SCHEDULERS)} [default: {D.SCHEDULER}, the paper's]."),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (the reference's numerics: fp32 on CPU; fp16 SD on CUDA), fast (bf16 SD and CLIP, fp16 matching"
        " on CUDA), fp32, bf16 or fp16.",
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

# Every command and subcommand takes -h as well as --help (subcommands inherit it from the app's context).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


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
    from ..pipeline.keys import SynthOptions

    return SynthOptions(**given(**given_options))


# Folders with at least this many files get a progress line while they are listed and hashed.
LISTING_PROGRESS_FROM = 100


def with_photos(classes: list, photos: list[str] | None, masks: list[str] | None, opts: Any, models: Any, quiet: bool):
    """``classes`` with their photos (``--photos`` / ``--photo-masks`` or a classes file's columns) listed and
    checked before any work, with a progress line while a large folder is hashed; each photo left out is named on
    stderr. Raises ValueError for the caller's ``user_errors()``."""
    from ..classes import attach_photos
    from ..pipeline.synth import photo_sets

    classes = attach_photos(classes, photos or [], masks or [])
    if not any(c.photos is not None for c in classes):
        return photo_sets(classes, opts, models)
    with RichProgress(not quiet) as progress:

        def listing(folder: str, done: int, total: int) -> None:
            if total < LISTING_PROGRESS_FROM:  # a few photos list in a blink: an error stays one line
                return
            if done == 1:
                progress.start(f"photos in {folder}", total)
            progress.advance()

        classes = photo_sets(classes, opts, models, listing)
    for spec in classes:
        _left_out(spec.name, spec.photo_set.skipped if spec.photo_set is not None else ())
    return classes


def photo_warnings(results: Iterable[Any]) -> None:
    """Name on stderr each photo a run left out of its class's bank (synth's ClassResult.photos_skipped)."""
    for r in results:
        _left_out(r.name, r.photos_skipped)


def _left_out(class_name: str, photos: Iterable[tuple[str, str]]) -> None:
    for file, why in photos:
        err.print(f"warning: {class_name}: photo {file} left out: {why}", highlight=False, markup=False)


def print_notes(class_names: list[str], quiet: bool = False, more: list[str | None] | None = None) -> None:
    """Tell the user about classes whose prompt is cut at the text encoder's token limit, and any ``more`` notes."""
    if quiet:
        return
    from ..synthesis import prompt_notes

    for note in [*prompt_notes(class_names), *(n for n in more or [] if n)]:
        err.print(f"note: {note}", highlight=False, markup=False)


def emit(doc: dict[str, Any], as_json: bool, save: Path | None, dumps: Callable[[Any], str] | None = None) -> bool:
    """Deliver a command's result document: to FILE with ``--save`` (atomically; a link is written through, "-",
    a device or a FIFO is written into), to stdout with ``--json``, and to stdout once only when both name it.
    Returns whether stdout now holds the document (then the human summary must not be printed).

    The path was checked before the work (outputs.check_writable); if writing it fails anyway (a full disk), the
    finished result is not lost: it goes to stdout, the error to stderr, and the command exits 1.
    """
    import json

    from ..outputs import save_atomically, writes_to_stdout

    text = dumps(doc) if dumps is not None else json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    save_to_stdout = save is not None and writes_to_stdout(save)
    to_stdout = as_json or save_to_stdout
    if save is not None and not save_to_stdout:
        try:
            save_atomically(save, lambda tmp: tmp.write_text(text, encoding="utf-8"), f"--save {save}")
        except ValueError as exc:
            err.print(f"error: {exc}; the result follows on stdout", highlight=False, markup=False)
            typer.echo(text, nl=False)
            raise typer.Exit(EXIT_FAILED) from None
    if to_stdout:
        typer.echo(text, nl=False)
    return to_stdout


def check_outputs(*files: tuple[str, Path | None], inputs: Sequence[Path] = (), as_json: bool = False) -> None:
    """Check a command's output files before any work: each (option, path) given must be writable and not an input
    (see outputs.check_writable), and at most one thing may go to stdout ("-" or --json).

    Raises:
        ValueError: one line naming the option.
    """
    from ..outputs import check_writable, writes_to_stdout

    named = [(option, path) for option, path in files if path is not None]
    streams = [option for option, path in named if writes_to_stdout(path)]
    if len(streams) > 1 or (streams and as_json and streams != ["--save"]):
        raise ValueError(
            f"{' and '.join(f'{o} -' for o in streams)}{' and --json' if as_json else ''}: only one of them can"
            " write to stdout; give the others a file name"
        )
    for option, path in named:
        check_writable(path, f"{option} {path}", inputs=inputs)


def open_cache(cache_dir: Path | None, must_exist: bool = False):
    """The cache in ``--cache-dir``, else $OVDIFF_CACHE or the XDG cache dir. Commands that write create the folder;
    with ``must_exist`` (commands that only read or delete) a missing folder is the user's mistake (a mistyped
    --cache-dir must not be created and reported empty): UsageError naming it."""
    import os

    from ..cache import Cache, default_cache_dir

    directory = cache_dir or default_cache_dir()
    if must_exist and not directory.expanduser().exists():
        if cache_dir is not None:
            raise UsageError(f"--cache-dir {cache_dir}: no such folder; give the folder ovdiff synth or segment used")
        if os.environ.get("OVDIFF_CACHE"):
            raise UsageError(f"$OVDIFF_CACHE {directory}: no such folder; give the folder ovdiff synth or segment used")
        raise UsageError(f"cache folder {directory}: no such folder; nothing is cached yet (ovdiff synth creates it)")
    return Cache(directory)


_FLAT = str.maketrans("\t\r\n", "   ")


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    shown: Mapping[str, Callable[[str], str]] | None = None,
    style: Callable[[str, str], str | None] | None = None,
    group: bool = False,
) -> None:
    """A command's table on stdout, the one place that decides how tables look.

    On a terminal: a rich table under ``title``; ``shown`` abbreviates a column's values there (by column name),
    ``style`` gives a cell's colour from its column and value, ``group`` shows the first column once per run of
    equal values. Piped or logged: a header line, then one line per row of tab-separated whole values (never cut
    or wrapped; a tab or line break inside a value becomes a space), for grep, cut and awk; no title.
    """
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not out.is_terminal:
        for line in [list(columns), *cells]:
            typer.echo("\t".join(v.translate(_FLAT) for v in line))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(*columns, title=Text(title) if title else None)
    previous: str | None = None
    for row in cells:
        if group and previous is not None and row[0] != previous:
            table.add_section()
        texts = [
            Text((shown or {}).get(col, str)(v), style=(style(col, v) if style else None) or "")
            for col, v in zip(columns, row, strict=True)
        ]
        if group and row[0] == previous:
            texts[0] = Text("")
        previous = row[0]
        table.add_row(*texts)
    out.print(table)


def options_text(options: Any) -> str:
    """A library options object as -v shows it: ``n=32, steps=30, extractors=sd,dino,clip, batch-size=auto``.

    Each field is named as the command line spells its option (the class's ``option_names`` where they differ,
    e.g. SegmentOptions.batch_size is --window-batch); lists are comma-joined, None is auto (decided by the device),
    booleans are on/off, and a text with commas or spaces is quoted.
    """
    import dataclasses

    names = getattr(type(options), "option_names", {})

    def value(v: Any) -> str:
        if v is None:
            return "auto"
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, str) and (not v or any(c in v for c in ", ")):
            return repr(v)
        return str(v)

    return ", ".join(
        f"{names.get(f.name, '--' + f.name.replace('_', '-')).removeprefix('--')}={value(getattr(options, f.name))}"
        for f in dataclasses.fields(options)
        if f.repr
    )


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
                spent, done, total = now - plain["t0"], plain["done"], plain["total"]
                left = f", about {spent / done * (total - done):.0f} s left" if done < total else ""
                err.print(f"{plain['label']}: {done}/{total} ({spent:.0f} s{left})", highlight=False, markup=False)
