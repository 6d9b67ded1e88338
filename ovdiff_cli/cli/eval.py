"""``ovdiff eval``: benchmark mIoU (paper section 4) from the shell, shardable, with machine-readable results.

ovdiff eval DATASET --root DIR ...        (= ovdiff eval run DATASET ...)
ovdiff eval DATASET --root DIR --support-from train --shots K   (real support sets, a reference point)
ovdiff eval merge PART.json... --save FILE
ovdiff eval prepare object --coco-stuff-root DIR
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from .. import defaults as D
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    HELP_OPTIONS,
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
    out,
    photo_warnings,
    print_table,
    user_errors,
)
from .shared import SegmentArgs, prepare, segmentation_options

if TYPE_CHECKING:
    from ..classes import ClassSpec
    from ..datasets import DatasetSpec, Sample


class _RunByDefault(TyperGroup):
    """``ovdiff eval voc ...`` means ``ovdiff eval run voc ...``: a first word that is no subcommand is a DATASET."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Benchmark mIoU: `ovdiff eval DATASET --root DIR`, `ovdiff eval merge`, `ovdiff eval prepare`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
)


def _deliver(doc: dict[str, Any], as_json: bool, save: Path | None, quiet: bool, sharded: str = "") -> None:
    """The result document to --save FILE and/or stdout (--json); else the table and the summary line."""
    from ..evaluation import dumps

    if not emit(doc, as_json, save, dumps):
        _print_result(doc, quiet, sharded)


def _print_result(doc: dict[str, Any], quiet: bool, sharded: str = "") -> None:
    """The per-class table (unless quiet) and the one summary line (``sharded``: which shard this was)."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"  # the document holds fractions and null

    if not quiet:
        print_table(("class", "IoU"), [(name, pct(iou)) for name, iou in doc["per_class"].items()])
    line = f"mIoU={pct(doc['miou'])}"
    if "miou_std" in doc:
        line = f"mIoU={pct(doc['miou'])} ± {pct(doc['miou_std'])} over {len(doc['seeds'])} seeds"
    part = f" (partial: {sharded})" if sharded else ""
    out.print(f"{line} pixel_acc={pct(doc['pixel_acc'])} {doc['dataset']} {doc['split']} n={doc['n_images']}{part}")


@app.command("run")
@segmentation_options(vocabulary=False)
def run(
    dataset: Annotated[
        str, typer.Argument(metavar="DATASET", help="voc, context, object, voc20, context59, ade, stuff, cityscapes.")
    ],
    root: Annotated[
        Path,
        typer.Option("--root", help="The dataset folder as mmseg names it (e.g. VOCdevkit/VOC2012) or its parent."),
    ],
    split: Annotated[str, typer.Option("--split", help="Which split.")] = "val",
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N images (sorted by id).")] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma list: repeat with support sets from each seed.")
    ] = None,
    as_json: JsonOpt = False,
    save: SaveOpt = None,
    save_pred: Annotated[
        Path | None, typer.Option("--save-pred", help="Write predicted label PNGs (dataset ids) here.")
    ] = None,
    pred_dir: Annotated[
        Path | None, typer.Option("--pred-dir", help="Score these label PNGs instead (no model).")
    ] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="K/N: every N-th image from the K-th; writes a partial result.")
    ] = None,
    prompt_names: Annotated[
        str,
        typer.Option(
            "--prompt-names", help="paper (the reference's prompt names and overrides) or plain (readable names)."
        ),
    ] = "paper",
    support_from: Annotated[
        str,
        typer.Option(
            "--support-from",
            help="synthetic (generated support sets, the paper's) or train (--shots annotated training images per"
            " class with their ground truth as masks).",
        ),
    ] = "synthetic",
    shots: Annotated[
        int | None,
        typer.Option("--shots", help=f"With --support-from train: training images per class [default: {D.SHOTS}]."),
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    *,
    args: SegmentArgs,
) -> None:
    """Segment every image of DATASET with its own vocabulary and report per-class IoU, mIoU and pixel accuracy."""
    from ..classes import build_class_list, split_list
    from ..datasets import get_dataset, list_samples
    from ..evaluation import result_doc
    from ..inputs import resolve_shard
    from ..segmentation import parse_int_list

    with user_errors():
        spec = get_dataset(dataset)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit {limit}: must be at least 1")
        from_train = _check_support_options(support_from, shots, pred_dir, args.n)
        samples = list_samples(spec, root, split)[:limit]
        train = _train_samples(spec, root) if from_train else []
        part = resolve_shard(shard)
        if part.count > 1 and save is None:
            raise ValueError(
                f"--shard {part.index}/{part.count}: a shard's result is partial;"
                " give --save FILE to keep it for `ovdiff eval merge`"
            )
        if args.background is not None and args.background != spec.background:
            flag = "--background" if args.background else "--no-background"
            protocol = "with" if spec.background else "without"
            raise ValueError(f"{flag}: {dataset} is always evaluated {protocol} background")
        if seeds is not None and args.seed is not None:
            raise ValueError("--seed and --seeds: give one of them")
        if pred_dir is not None and save_pred is not None:
            raise ValueError("--pred-dir scores existing predictions; --save-pred has nothing to save")
        inputs = [f for s in (*samples, *train) for f in (s.image, s.label)]
        check_outputs(("--save", save), inputs=inputs, as_json=as_json)
        classes = build_class_list(
            spec.vocabulary(prompt_names),
            stuff=split_list(args.stuff) if args.stuff else None,
            **given(stuff_table=args.stuff_table),
        )
        seed_list = (
            list(parse_int_list(seeds, "--seeds"))
            if seeds is not None
            else [args.seed if args.seed is not None else D.SEED]
        )
        if len(set(seed_list)) != len(seed_list):
            raise ValueError(f"--seeds {seeds}: a seed is listed twice")
        mine = part.take(samples)
        if save_pred is not None:
            from ..pipeline.eval import check_save_pred

            check_save_pred(save_pred, mine, seed_list)
        if not quiet and split == "val" and limit is None and spec.val_images and len(samples) != spec.val_images:
            err.print(f"note: {dataset} val has {spec.val_images} images; --root holds {len(samples)}")
        supports = None
        if from_train:
            from ..pipeline.eval import TrainSupports

            # Training images only unless --n adds generated ones: the run's N is then the classes' N, which the
            # result's options record.
            args = dataclasses.replace(args, n=args.n or 0)
            supports = TrainSupports(spec, classes, train, **given(shots=shots), n=args.n)
            # The first seed's classes now: its photos decide which banks are missing, which prepare reports.
            with RichProgress(not quiet) as progress:
                classes = supports.classes(seed_list[0], progress)
            if not quiet:
                for note in supports.notes:
                    err.print(f"note: {note}", highlight=False, markup=False)
                if split == "train":
                    err.print("note: --split train: the support images are among the images scored")
            _left_out(classes, seed_list[0], len(seed_list))
        run_on = (
            None if pred_dir is not None else prepare(dataclasses.replace(args, background=spec.background), classes)
        )
        if run_on is not None and not quiet:
            for note in run_on.notes:
                err.print(f"note: {note}", highlight=False, markup=False)

    def report(image_id: str, reason: str) -> None:
        err.print(f"[bold red]error:[/] {image_id}: {reason}", markup=True, highlight=False)

    def timing(seed: int, result) -> None:
        if verbose:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in result.timings.fractions(result.seconds).items())
            err.print(f"seed {seed}: {result.done} images in {result.seconds:.1f} s; time: {shares}")

    try:
        with RichProgress(not quiet) as progress, user_errors():
            if run_on is None:
                from ..pipeline.eval import score_predictions

                result = score_predictions(mine, spec, pred_dir, progress=progress, on_failure=report)
                confusions, failed, interrupted = {None: result.confusion}, result.failed, result.interrupted
                context = {"models": None, "options": {"pred_dir": str(pred_dir)}}
            else:
                from ..pipeline.eval import eval_context, evaluate_seeds

                def seed_classes(seed: int) -> list[ClassSpec]:
                    """That seed's classes with its own training images (the first seed's are made already)."""
                    assert supports is not None
                    built = seed in supports.picked()
                    found = supports.classes(seed, progress)
                    if not built:
                        _left_out(found, seed, len(seed_list))
                    return found

                confusions, failed, interrupted = evaluate_seeds(
                    mine,
                    spec,
                    run_on.classes,
                    run_on.synth,
                    run_on.seg,
                    run_on.models,
                    run_on.cache,
                    seed_list,
                    save_pred=save_pred,
                    progress=progress,
                    on_failure=report,
                    on_seed=timing,
                    compile=run_on.compile,
                    classes_for=seed_classes if supports is not None else None,
                    on_synth=photo_warnings,
                )
                context = eval_context(
                    run_on.models,
                    run_on.synth,
                    run_on.seg,
                    run_on.classes,
                    support_from=support_from,
                    shots=supports.shots if supports is not None else None,
                    seed_classes=supports.picked() if supports is not None else None,
                )
    finally:
        if run_on is not None:
            run_on.cache.close()
    if interrupted:
        err.print("interrupted: nothing was written; run the same command again (cached prototypes are reused)")
        raise typer.Exit(EXIT_INTERRUPTED)
    doc = result_doc(
        dataset=spec.name,
        split=split,
        class_names=spec.classes,
        confusions=confusions,
        n_images=len(mine) - len({i for i, _ in failed}),
        shard=(part.index, part.count),
        context={**context, "limit": limit, "root": str(root)},
        failed=[{"id": i, "reason": r} for i, r in failed],
    )
    _deliver(doc, as_json, save, quiet, part.describe(len(mine), len(samples)))
    if failed:
        raise fail(
            f"{len(failed)} of {len(mine)} images could not be scored (listed above); the result leaves them out",
            EXIT_FAILED,
        )


def _check_support_options(support_from: str, shots: int | None, pred_dir: Path | None, n: int | None) -> bool:
    """Whether the supports come from the training split; ValueError (one line) for a value or combination that
    does not make sense."""
    from ..datasets import SUPPORT_FROM

    if support_from not in SUPPORT_FROM:
        raise ValueError(f"--support-from {support_from!r}: expected one of {', '.join(SUPPORT_FROM)}")
    from_train = support_from == "train"
    if shots is not None and not from_train:
        raise ValueError(
            f"--shots {shots}: only with --support-from train (synthetic support sets have --n generated images)"
        )
    if from_train and pred_dir is not None:
        raise ValueError(
            "--support-from train and --pred-dir: --pred-dir scores existing predictions, it builds no support set"
        )
    if shots is not None and shots < 1:
        raise ValueError(f"--shots {shots}: must be at least 1")
    if from_train and (shots or D.SHOTS) + (n or 0) > D.N_MAX:
        raise ValueError(
            f"--shots {shots or D.SHOTS}{f' and --n {n}' if n else ''}: more than {D.N_MAX:,} support images per class"
            " (its prototypes hold every image's features in memory at once)"
        )
    return from_train


def _train_samples(spec: DatasetSpec, root: Path) -> list[Sample]:
    """The training split's samples for --support-from train; its errors say that this option needs it."""
    from ..datasets import list_samples

    try:
        return list_samples(spec, root, "train")
    except ValueError as exc:
        # list_samples' hint about --split does not apply: the training split is not chosen by --split here.
        why = str(exc).replace(" (is --split train right?)", "")
        raise ValueError(f"--support-from train needs the {spec.name} train split: {why}") from None


def _left_out(classes: list[ClassSpec], seed: int, seeds: int) -> None:
    """A warning per picked training image that could not be read (it is left out of its class's support set)."""
    which = f"seed {seed}: " if seeds > 1 else ""
    for spec in classes:
        for image_id, reason in spec.photo_set.skipped if spec.photo_set is not None else ():
            err.print(
                f"warning: {which}{spec.name}: training image {image_id} left out: {reason}",
                highlight=False,
                markup=False,
            )


@app.command("merge")
def merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PART.json", help="The shards' result files, all of them.")],
    as_json: JsonOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sum the confusion matrices of a sharded run into the complete result (equal to an unsharded run's)."""
    from ..evaluation import load_result
    from ..evaluation import merge as merge_results

    with user_errors():
        check_outputs(("--save", save), inputs=parts, as_json=as_json)
        doc = merge_results([(str(p), load_result(p)) for p in parts])
    _deliver(doc, as_json, save, quiet)


@app.command("prepare")
def prepare_dataset(
    dataset: Annotated[str, typer.Argument(metavar="DATASET", help="object: COCO-Object from COCO-Stuff-164k.")],
    coco_stuff_root: Annotated[Path, typer.Option("--coco-stuff-root", help="COCO-Stuff-164k as mmseg lays it out.")],
    split: Annotated[str, typer.Option("--split", help="Which split.")] = "val",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rewrite existing label maps.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Create label maps a benchmark needs: `object` writes COCO-Object's <id>_instanceTrainIds.png files."""
    from ..datasets import prepare_coco_object

    with user_errors():
        if dataset != "object":
            raise ValueError(
                f"DATASET {dataset!r}: only 'object' is prepared here"
                " (the others ship their labels or use mmsegmentation's converters)"
            )
        with RichProgress(not quiet) as progress:
            written, skipped = prepare_coco_object(coco_stuff_root, split, overwrite, progress)
    out.print(f"COCO-Object {split}: {written} label maps written, {skipped} already there (in {coco_stuff_root})")
