"""``ovdiff segment``: files, folders or globs in; label maps, overlays, scores and a legend out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import defaults as D
from .common import (
    DEFAULT_MODELS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CacheDirOpt,
    ClassesFileOpt,
    DeviceOpt,
    ExtractorsOpt,
    JsonOpt,
    KOpt,
    MaskerOpt,
    ModelsOpt,
    NOpt,
    QuietOpt,
    RichProgress,
    SeedOpt,
    StepsOpt,
    StuffOpt,
    VerboseOpt,
    err,
    fail,
    given,
    open_cache,
    out,
    synth_options,
    user_errors,
)


def segment(
    inputs: Annotated[
        list[str], typer.Argument(metavar="INPUT", help="Image files, folders (searched recursively) or globs.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder; mirrors the inputs' relative paths.")],
    classes: Annotated[str | None, typer.Option("--classes", help='Comma list, e.g. "cat,dog,sky".')] = None,
    classes_file: ClassesFileOpt = None,
    stuff: StuffOpt = None,
    models: ModelsOpt = None,
    prefilter: Annotated[
        bool | None, typer.Option("--filter/--no-filter", help="CLIP category pre-filter [default: on].")
    ] = None,
    eta: Annotated[
        int | None, typer.Option("--eta", help=f"Most classes the pre-filter keeps [default: {D.ETA}].")
    ] = None,
    pamr: Annotated[
        bool | None, typer.Option("--pamr/--no-pamr", help="PAMR refinement of the scores [default: off].")
    ] = None,
    scales: Annotated[
        str | None,
        typer.Option("--scales", help=f"Window sizes [default: {','.join(map(str, D.SCALES))}]."),
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help=f"Window stride [default: {D.STRIDE}].")] = None,
    short_side: Annotated[
        int | None, typer.Option("--short-side", help=f"Resize short side to this first [default: {D.SHORT_SIDE}].")
    ] = None,
    background: Annotated[
        bool | None,
        typer.Option("--background/--no-background", help="Background class from bg prototypes [default: on]."),
    ] = None,
    stuff_threshold: Annotated[
        float | None,
        typer.Option("--stuff-threshold", help=f"Stuff filter similarity [default: {D.STUFF_THRESHOLD}]."),
    ] = None,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", help="Write NAME_overlay.jpg.")] = True,
    scores: Annotated[bool, typer.Option("--scores", help="Write NAME_scores.npz (float16 class scores).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images whose outputs exist.")] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="K/N: every N-th image from the K-th [default: SLURM array / torchrun env]."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help=f"Windows per network forward [default: {D.SEGMENT_BATCH_SIZE}]."),
    ] = None,
    n: NOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = None,
    masker: MaskerOpt = None,
    extractors: ExtractorsOpt = None,
    k: KOpt = None,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Segment INPUT images into the classes of --classes or --classes-file.

    Prototypes come from the cache; classes without them are synthesised first, as `ovdiff synth` does.
    """
    from ..classes import build_class_list, split_list
    from ..inputs import find_images, resolve_shard
    from ..outputs import build_legend, write_legend

    with user_errors():
        class_list = build_class_list(
            split_list(classes) if classes else None, classes_file, split_list(stuff) if stuff else None
        )
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir}: exists and is not a folder")
        items = find_images(inputs, exclude=out_dir)
        part = resolve_shard(shard)
        from ..models import resolve_models
        from ..models.loading import Models, resolve_device
        from ..pipeline import build_segmenter, plan_outputs, segment_files, segment_roles
        from ..segmentation import SegmentOptions

        spec = resolve_models(models or DEFAULT_MODELS)
        synth_opts = synth_options(n=n, steps=steps, seed=seed, masker=masker, extractors=extractors, k=k)
        seg_opts = SegmentOptions(
            **given(
                scales=scales,
                stride=stride,
                short_side=short_side,
                background=background,
                prefilter=prefilter,
                eta=eta,
                stuff_threshold=stuff_threshold,
                pamr=pamr,
                batch_size=batch_size,
            )
        )
        mdl = Models(spec, resolve_device(device))
        cache = open_cache(cache_dir)
        mdl.check_available(segment_roles(class_list, synth_opts, seg_opts, mdl, cache))
        legend = build_legend([c.name for c in class_list], [c.stuff for c in class_list], seg_opts.background)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {out_dir}: cannot create it ({exc.strerror or exc})") from None
        write_legend(out_dir, legend, overwrite)
    mine = part.take(items)
    if verbose:
        err.print(f"models {spec.name} on {mdl.device}; cache {cache.directory}; {seg_opts}")
        if part.count > 1:
            err.print(f"shard {part.index}/{part.count} ({part.source}): {len(mine)} of {len(items)} images")

    def report(path: Path, reason: str) -> None:
        err.print(f"[bold red]error:[/] {path}: {reason}", markup=True, highlight=False)

    plan = plan_outputs(mine, out_dir, overlay=overlay, scores=scores, overwrite=overwrite)
    try:
        with RichProgress(not quiet) as progress, user_errors():
            # Nothing to do (a finished job run again) loads no model at all.
            segmenter = build_segmenter(class_list, synth_opts, seg_opts, mdl, cache, progress) if plan.todo else None
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
    if as_json:
        doc = {
            "out": str(out_dir),
            "legend": str(out_dir / "legend.json"),
            "models": {"name": spec.name, "hashes": mdl.hashes, "meaningful": spec.meaningful},
            "shard": {"index": part.index, "count": part.count, "source": part.source},
            "images": {"total": run.total, "done": run.done, "skipped": run.skipped, "failed": len(run.failed)},
            "failed": [{"path": str(p), "reason": r} for p, r in run.failed],
            "seconds": round(run.seconds, 3),
            "images_per_second": round(run.images_per_second, 3),
            "time_fractions": fractions,
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        out.print(
            f"{run.done} segmented, {run.skipped} skipped, {len(run.failed)} failed of {run.total} images"
            f" in {run.seconds:.1f} s ({run.images_per_second:.2f} images/s); outputs in {out_dir}"
        )
        if verbose:
            err.print("time: " + ", ".join(f"{k} {v:.0%}" for k, v in fractions.items()))
    if run.failed:
        raise fail(f"{len(run.failed)} of {run.total} images failed (listed above)", EXIT_FAILED)
