"""``ovdiff segment``: files, folders or globs in; label maps, overlays, scores and a legend out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    JsonOpt,
    QuietOpt,
    RichProgress,
    SaveOpt,
    VerboseOpt,
    check_outputs,
    emit,
    err,
    fail,
    options_text,
    out,
    photo_warnings,
    print_notes,
    user_errors,
)
from .shared import SegmentArgs, prepare, segmentation_options


@segmentation_options
def segment(
    inputs: Annotated[
        list[str], typer.Argument(metavar="INPUT", help="Image files, folders (searched recursively) or globs.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder; mirrors the inputs' relative paths.")],
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", help="Write NAME_overlay.jpg.")] = True,
    scores: Annotated[bool, typer.Option("--scores", help="Write NAME_scores.npz (float16 class scores).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images whose outputs exist.")] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="K/N: every N-th image from the K-th [default: SLURM array / torchrun env]."),
    ] = None,
    as_json: JsonOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    *,
    args: SegmentArgs,
) -> None:
    """Segment INPUT images into the classes of --classes or --classes-file.

    Prototypes come from the cache; classes without them are synthesised first, as `ovdiff synth` does.
    """
    from ..inputs import find_images, resolve_shard, skipped_note
    from ..outputs import build_legend, check_out_folder, write_legend
    from ..pipeline.segment import build_segmenter, plan_outputs, segment_files

    with user_errors():
        skipped: list[Path] = []
        items = find_images(inputs, exclude=out_dir, on_skip=skipped.append)
        check_outputs(("--save", save), inputs=[i.path for i in items], as_json=as_json)
        part = resolve_shard(shard)
        run_on = prepare(args, quiet=quiet)
        class_list, mdl, cache, seg_opts = run_on.classes, run_on.models, run_on.cache, run_on.seg
        legend = build_legend(
            [c.name for c in class_list],
            [c.stuff for c in class_list],
            seg_opts.background,
            [c.stuff_from for c in class_list],
        )
        found = [(i.path, i.rel) for i in items]
        check_out_folder(out_dir, legend, inputs, found, overlay=overlay, scores=scores, overwrite=overwrite)
        print_notes([c.name for c in class_list], quiet, [*run_on.notes, skipped_note(skipped)])
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {out_dir}: cannot create it ({exc.strerror or exc})") from None
        write_legend(out_dir, legend, overwrite)
    mine = part.take(items)
    if verbose:
        shown = f"models {mdl.spec.name} on {mdl.device}; cache {cache.directory}; {options_text(seg_opts)}"
        err.print(shown, markup=False, highlight=False)

    def report(path: Path, reason: str) -> None:
        err.print(f"[bold red]error:[/] {path}: {reason}", markup=True, highlight=False)

    plan = plan_outputs(mine, out_dir, overlay=overlay, scores=scores, overwrite=overwrite)
    prepared = 0.0  # seconds spent on prototypes (synthesising missing classes) and models before segmenting
    try:
        with RichProgress(not quiet) as progress, user_errors():
            # Nothing to do (a finished job run again) loads no model at all.
            t0 = time.perf_counter()
            segmenter = (
                build_segmenter(
                    class_list, run_on.synth, seg_opts, mdl, cache, progress, run_on.compile, photo_warnings
                )
                if plan.todo
                else None
            )
            prepared = time.perf_counter() - t0
            run = segment_files(plan, segmenter, legend, progress=progress, on_failure=report)
    except KeyboardInterrupt:
        run = None
    finally:
        cache.close()
    if run is None or run.interrupted:
        done = f"{run.done} images written to {out_dir}; " if run else ""
        err.print(f"interrupted: {done}run the same command again to finish (finished images are skipped)")
        raise typer.Exit(EXIT_INTERRUPTED)
    fractions = run.timings.fractions(run.seconds)
    synthesised = run_on.missing if plan.todo else []  # classes whose prototypes this run made first
    shown = False
    if as_json or save is not None:
        doc = {
            "out": str(out_dir),
            "legend": str(out_dir / "legend.json"),
            "models": {"name": mdl.spec.name, "hashes": mdl.hashes, "meaningful": mdl.spec.meaningful},
            "shard": {"index": part.index, "count": part.count, "source": part.source, "origin": part.origin},
            "images": {"total": run.total, "done": run.done, "skipped": run.skipped, "failed": len(run.failed)},
            "failed": [{"path": str(p), "reason": r} for p, r in run.failed],
            "seconds": round(run.seconds, 3),
            "prepare_seconds": round(prepared, 3),
            "synthesised": synthesised,
            "images_per_second": round(run.images_per_second, 3),
            "time_fractions": fractions,
        }
        shown = emit(doc, as_json, save)
    if not shown:
        out.print(
            f"{run.done} segmented, {run.skipped} skipped, {len(run.failed)} failed of {run.total} images"
            f" in {run.seconds:.1f} s ({run.images_per_second:.2f} images/s); outputs in {out_dir}"
            + (f"; {sharded}" if (sharded := part.describe(len(mine), len(items))) else "")
            + (f"; before that, synthesised {', '.join(synthesised)} in {prepared:.1f} s" if synthesised else "")
        )
        if verbose:
            err.print("time: " + ", ".join(f"{k} {v:.0%}" for k, v in fractions.items()))
    if run.failed:
        raise fail(f"{len(run.failed)} of {run.total} images failed (listed above)", EXIT_FAILED)
