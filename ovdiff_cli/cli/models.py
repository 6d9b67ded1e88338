"""``ovdiff models list|verify|fetch|convert``: which model sets exist, what they need, what is here; check the weight
files' bytes; download for offline use; convert CutLER's checkpoint to safetensors once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from .common import EXIT_FAILED, HELP_OPTIONS, JsonOpt, err, fail, out, print_table, user_errors

app = typer.Typer(
    help="List model sets, verify and pre-download their weights, convert checkpoints.",
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Model sets, the networks each needs, and whether their weights are on this machine."""
    from ..models.registry import ROLE_TITLES, found_source, list_model_sets, presence

    rows = []
    for spec in list_model_sets():
        comps = {
            role: {"source": found_source(c), "status": presence(c), "library": c.library}
            for role, c in spec.components.items()
        }
        rows.append({"name": spec.name, "description": spec.description, "components": comps})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return

    def colour(column: str, value: str) -> str | None:
        if column != "status":
            return None
        return (
            "cyan" if value == "built-in" else {"missing": "red", "present": "green"}.get(value.split(":")[0], "yellow")
        )

    print_table(
        ("set", "network", "source", "status"),
        [
            (row["name"], ROLE_TITLES[role], c["source"], c["status"])
            for row in rows
            for role, c in row["components"].items()
        ],
        style=colour,
        group=True,
    )
    if out.is_terminal:
        out.print("Fetch missing weights with `ovdiff models fetch sd15` (needs internet), or use --models tiny.")


@app.command("verify")
def verify(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="SET", help="A model set, folder or NAME,ROLE=PATH,... as --models takes [default: every set]."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-read every byte of the weight files and check them; exit 1 if any is bad.

    Cache keys trust names, for speed: a hub file is known by the name of the blob it links to, a local file by the
    sha256 remembered for its path, size and modification time. A hub file whose bytes are not what its blob's name
    says is corrupt (delete it and fetch again); a local file whose remembered digest is of other bytes (edited
    with its size and time kept) gets the right one, so cache keys follow it from then on. Networks whose weights
    are not on this machine are listed, not checked.
    """
    from ..models.registry import ROLE_TITLES, WeightsMissing, list_model_sets, resolve_models
    from ..models.registry import verify as verify_component

    with user_errors():
        specs = [resolve_models(name)] if name is not None else list_model_sets()
    rows = []
    for spec in specs:
        for role, comp in spec.components.items():
            if comp.builtin:
                continue  # built in-process: no file to check
            try:
                checks = verify_component(comp)
            except WeightsMissing:
                rows.append({"set": spec.name, "network": role, "file": None, "state": "not here", "bad": False})
                continue
            rows += [
                {"set": spec.name, "network": role, "file": c.path and str(c.path), "state": c.state, "bad": c.bad}
                | ({"detail": c.detail} if c.detail else {})
                for c in checks
            ]
    bad = sum(r["bad"] for r in rows)
    if as_json:
        typer.echo(json.dumps({"files": rows, "bad": bad}, indent=2))
    elif not rows:
        err.print("nothing to verify: every network is built in-process")
    else:
        print_table(
            ("set", "network", "file", "status"),
            [
                (r["set"], ROLE_TITLES[r["network"]], r["file"], ": ".join(filter(None, (r["state"], r.get("detail")))))
                for r in rows
            ],
            style=lambda column, value: (
                None if column != "status" else {"ok": "green", "not here": "dim"}.get(value, "red")
            ),
            group=True,
        )
        err.print(f"{sum(r['file'] is not None for r in rows)} files re-read, {bad} bad")
    if bad:
        raise typer.Exit(EXIT_FAILED)


@app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="Model set to download, e.g. sd15.")],
    to: Annotated[
        Path | None,
        typer.Option("--to", help="Also lay the weights out in this folder (sd/, dino/, clip/) for --models PATH."),
    ] = None,
    link: Annotated[
        bool,
        typer.Option("--link", help="With --to: symlink into the download cache instead of hard-linking or copying."),
    ] = False,
) -> None:
    """Download a model set's pinned revisions into the Hugging Face cache (for offline compute nodes)."""
    from ..models.fetching import fetch as fetch_component
    from ..models.registry import MODEL_SETS, list_model_sets

    list_model_sets()
    if name not in MODEL_SETS:
        raise fail(f"model set {name!r}: expected one of {', '.join(MODEL_SETS)}")
    spec = MODEL_SETS[name]
    if not any(c.hub_id or c.url for c in spec.components.values()):
        out.print(f"{name} is built in-process: nothing to fetch")
        return
    with user_errors():
        for role, comp in spec.components.items():
            if not (comp.hub_id or comp.url):
                continue
            out.print(f"fetching {comp.source} ...")
            try:
                path = fetch_component(comp)
            except ValueError:
                raise
            except Exception as exc:  # network errors: OSError, httpx timeouts, hub HTTP errors
                raise fail(_download_failure(comp, exc), code=1) from None
            out.print(f"  {role}: {path}")
            if to is not None:
                from ..models.fetching import lay_out

                out.print(f"  {lay_out(comp, path, to / role, link)}")


def _download_failure(comp, exc: Exception) -> str:
    """One line: what could not be fetched from where, why (the bound and the real wait when the server stayed
    silent; else the first cause, which the hub wraps in its own errors), and what to do."""
    from urllib.parse import urlparse

    from ..models.fetching import FetchTimeout

    if comp.url:
        host = urlparse(comp.url).netloc
    else:
        from huggingface_hub.constants import ENDPOINT

        host = urlparse(ENDPOINT).netloc
    while exc.__cause__ is not None and not isinstance(exc, FetchTimeout):
        exc = exc.__cause__
    detail = str(exc).strip().splitlines()
    why = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
    if isinstance(exc, FetchTimeout):
        why = str(exc)
    return (
        f"could not download {comp.source} from {host}: {why}; run the command again (finished files are kept), raise"
        " OVDIFF_FETCH_TIMEOUT for a slow link, or fetch on another machine and copy HF_HOME / OVDIFF_WEIGHTS here"
    )


@app.command("convert")
def convert(
    role: Annotated[str, typer.Argument(metavar="MODEL", help="Which checkpoint: cutler.")],
    path: Annotated[Path, typer.Argument(help="CutLER's detectron2 checkpoint (cutler_cascade_final.pth).")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Where to write the safetensors [default: PATH with .safetensors].")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a CutLER checkpoint against the detector and write its weights as safetensors (no pickle at load).

    Reading the .pth never runs pickled code (torch.load with weights_only). Use the result with
    --models sd15,cutler=OUT.
    """
    if role != "cutler":
        raise fail(f"MODEL {role!r}: only cutler checkpoints are converted (the others load from safetensors)")
    from ..cutler.checkpoint import CheckpointError, convert
    from ..cutler.configs import FULL

    target = out_file or path.with_suffix(".safetensors")
    if target.resolve() == path.resolve():
        raise fail(f"--out {target}: would overwrite the checkpoint itself")
    try:
        report = convert(path, target, FULL)
    except CheckpointError as exc:
        raise fail(str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise fail(f"--out {target}: cannot write it ({exc.strerror or exc})") from None
    if as_json:
        typer.echo(json.dumps({"source": str(path), "out": str(target), **dataclasses.asdict(report)}, indent=2))
        return
    out.print(f"wrote {target}: {report}")
