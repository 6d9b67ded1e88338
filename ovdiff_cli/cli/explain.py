"""``ovdiff explain``: which prototypes and support regions decided one pixel's label (paper 4.5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .. import defaults as D
from .common import (
    EXIT_FAILED,
    JsonOpt,
    QuietOpt,
    RichProgress,
    SaveOpt,
    VerboseOpt,
    check_outputs,
    emit,
    err,
    fail,
    given,
    options_text,
    out,
    photo_warnings,
    print_notes,
    user_errors,
)
from .shared import SegmentArgs, prepare, segmentation_options

if TYPE_CHECKING:
    from ..explain import Explanation


def parse_xy(value: str) -> tuple[int, int]:
    """``"120,88"`` -> (120, 88); ValueError naming the value otherwise."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--xy {value!r}: expected two whole numbers X,Y (pixels from the top-left), e.g. 120,88")
    return int(parts[0]), int(parts[1])


@segmentation_options
def explain(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image file.")],
    xy: Annotated[str, typer.Option("--xy", help="The pixel: X,Y from the top-left corner, e.g. 120,88.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the explanation picture (PNG) here.")] = None,
    top: Annotated[
        int | None,
        typer.Option("--top", help=f"Winning-class prototypes per extractor [default: {D.EXPLAIN_TOP}]."),
    ] = None,
    as_json: JsonOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    *,
    args: SegmentArgs,
) -> None:
    """Explain why pixel --xy of IMAGE got its label: the prototypes and support-image regions behind it.

    Segmentation options are those of `ovdiff segment`, and the label is the one segment writes.
    """
    from ..explain import explain as explain_pixel
    from ..explain import render
    from ..inputs import ImageError, load_image
    from ..outputs import picture_format, save_with_fallback
    from ..pipeline.segment import build_segmenter
    from ..pipeline.support import support_image

    with user_errors():
        x, y = parse_xy(xy)
        if top is not None and top < 1:
            raise ValueError(f"--top {top}: must be at least 1")
        if image.is_dir():
            raise ValueError(f"IMAGE {image}: is a folder; explain takes one image file (segment takes folders)")
        if not image.is_file():
            raise ValueError(f"IMAGE {image}: no such file")
        check_outputs(("--out", out_file), ("--save", save), inputs=[image], as_json=as_json)
        picture_kind = picture_format(out_file, f"--out {out_file}") if out_file is not None else None
        run_on = prepare(args, quiet=quiet)
        print_notes([c.name for c in run_on.classes], quiet, run_on.notes)
        try:
            img = load_image(image, run_on.seg.max_pixels)
        except ImageError as exc:
            run_on.cache.close()
            raise ValueError(f"IMAGE {image}: {exc}") from None
        h, w = img.shape[:2]
        if not (x < w and y < h):
            run_on.cache.close()
            raise ValueError(f"--xy {x},{y}: outside the image, which is {w} x {h} (X in 0..{w - 1}, Y in 0..{h - 1})")
    cache, mdl = run_on.cache, run_on.models
    written, problem = out_file, None  # where the picture went; why not to --out, if it could not
    try:
        with RichProgress(not quiet) as progress, user_errors():
            segmenter = build_segmenter(
                run_on.classes, run_on.synth, run_on.seg, mdl, cache, progress, run_on.compile, photo_warnings
            )
            expl = explain_pixel(segmenter, img, x, y, mdl.spec.image_size, **given(top=top))
            if out_file is not None:
                title = f"{image.name}; models {mdl.spec.name}" + ("" if mdl.spec.meaningful else " (random weights)")
                picture = render(expl, img, lambda key: support_image(cache, key), title)
                # Checked before the work; should the write fail anyway, the picture goes to a named file instead.
                written, problem = save_with_fallback(
                    out_file, lambda tmp: picture.save(tmp, format=picture_kind), f"--out {out_file}", "ovdiff-explain"
                )
    finally:
        cache.close()
    shown = False
    if as_json or save is not None:
        doc = {
            "image": str(image),
            "out": str(written) if written is not None else None,
            "models": {"name": mdl.spec.name, "hashes": mdl.hashes, "meaningful": mdl.spec.meaningful},
            **expl.to_json(),
        }
        shown = emit(doc, as_json, save)
    if not shown:
        _print_explanation(expl, image, x, y, out_file if problem is None else None)
    if verbose:
        err.print(
            f"models {mdl.spec.name} on {mdl.device}; cache {cache.directory}; {options_text(run_on.seg)}", markup=False
        )
    if problem is not None:
        raise fail(f"{problem}; the picture was written to {written} instead", EXIT_FAILED)


def _print_explanation(expl: Explanation, image: Path, x: int, y: int, wrote: Path | None) -> None:
    """The human summary: the label, each deciding prototype, and the picture written (if any)."""
    from ..explain import support_text
    from ..outputs import count_noun

    runner = f", runner-up {expl.runner_up[1]} ({expl.runner_up[2]:.3f})" if expl.runner_up else ""
    out.print(f"pixel ({x}, {y}) of {image}: {expl.label} ({expl.score:.3f}){runner}")
    for rank, ev in enumerate(expl.prototypes, start=1):
        where = f"part {ev.part}" if ev.part is not None else "all"
        if ev.image is not None:
            where = ev.support[0].label if ev.support else f"image {ev.image}"
        out.print(
            f"  #{rank} {ev.extractor} {ev.kind} {ev.region} prototype of '{ev.class_name}' ({where}):"
            f" similarity {ev.similarity:.3f}, from {support_text(ev.support)},"
            f" wins {count_noun(int(ev.wins.sum()), 'pixel')}"
        )
    if wrote is not None:
        out.print(f"wrote {wrote}")
