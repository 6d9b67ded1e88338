"""The ``ovdiff`` command line: a thin layer that parses, calls the library and prints.

Nothing heavy is imported here: each command imports torch and friends inside its own function.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated

import typer

from .. import __version__
from . import cache, models
from . import eval as eval_cli
from .common import EXIT_INTERRUPTED, HELP_OPTIONS
from .explain import explain
from .segment import segment
from .synth import synth

app = typer.Typer(
    name="ovdiff",
    help="Segment any image into any classes you can name, without training (OVDiff, ECCV 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ovdiff {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """ovdiff: open-vocabulary segmentation with prototypes synthesised by Stable Diffusion."""


app.command("synth")(synth)
app.command("segment")(segment)
app.command("explain")(explain)
app.add_typer(eval_cli.app, name="eval")
app.add_typer(models.app, name="models")
app.add_typer(cache.app, name="cache")


def _environment(argv: list[str]) -> None:
    """Settings the libraries read at import time, so set before any command imports them.

    Outside ``ovdiff models fetch`` nothing may touch the network (weights are never downloaded implicitly), so
    the Hugging Face libraries run offline and fail at once when something is not cached. Their logging, advice
    and progress bars stay silent unless the command runs with ``-v``; progress bars also when stderr is no
    terminal.
    """
    if argv[1:3] != ["models", "fetch"]:
        os.environ["HF_HUB_OFFLINE"] = "1"
    # OpenMP threads that spin while waiting turn a busy machine into a stalled one (see loading.set_threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # An image's result must not depend on its batch slot. torch's fused CPU attention gives each thread a scratch
    # buffer at its own memory alignment, and MKL's default small matrix products round by alignment: the same
    # window got scores 1e-7 apart in slots 0-3 and 4-7 of a batch. MKL's strict reproducible mode rounds the same
    # whatever the alignment (no measurable cost); it must be set before MKL's first call.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    verbose, quiet = bool({"-v", "--verbose"} & set(argv)), bool({"-q", "--quiet"} & set(argv))
    # ovdiff's own messages: notes (random weights...) by default, detail such as load times with -v, only errors
    # with -q. They go to stderr so that --json output stays clean.
    ours = logging.getLogger("ovdiff")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    ours.propagate = False
    if not verbose:
        for name, value in (
            ("TRANSFORMERS_VERBOSITY", "error"),
            ("DIFFUSERS_VERBOSITY", "error"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ("HF_HUB_VERBOSITY", "error"),
            ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ):
            os.environ.setdefault(name, value)
        logging.getLogger().setLevel(logging.ERROR)  # timm and open_clip log through the root logger
    elif not sys.stderr.isatty():
        # A progress bar redraws itself with carriage returns: in a log file (`-v 2> run.log`) that is one unreadable
        # line. transformers follows huggingface_hub's switch (read at import); loading.py passes it on to diffusers.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    interrupted = False
    _environment(sys.argv)

    def on_sigint(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        app()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED or interrupted:
            if exc.code != EXIT_INTERRUPTED:  # stopped before the command could report it (click: "Aborted!")
                print("interrupted: nothing half-done was kept; run the same command again", file=sys.stderr)
            # The work is saved and the user told. Skip the interpreter's teardown of torch and friends (a
            # second or more) so the process ends at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        # The command finished and reported: a Ctrl-C during the interpreter's teardown has nothing left to stop
        # and must not turn a finished run into a killed one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
