"""``ovdiff synth``: pre-generate support sets and prototype banks for a class list (cached)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import defaults as D
from .common import (
    DEFAULT_MODELS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    BatchSizeOpt,
    CacheDirOpt,
    ClassesFileOpt,
    DeviceOpt,
    ExtractorsOpt,
    JsonOpt,
    KOpt,
    MaskerOpt,
    ModelsOpt,
    NOpt,
    PhotoMasksOpt,
    PhotosOpt,
    PrecisionOpt,
    QuietOpt,
    RichProgress,
    SaveOpt,
    SchedulerOpt,
    SeedOpt,
    StepsOpt,
    StuffOpt,
    StuffTableOpt,
    ThreadsOpt,
    VerboseOpt,
    check_outputs,
    emit,
    err,
    fail,
    given,
    open_cache,
    options_text,
    photo_warnings,
    print_notes,
    print_table,
    synth_options,
    user_errors,
    with_photos,
)


def synth(
    classes: Annotated[list[str] | None, typer.Argument(help='Class names, e.g. cat "potted plant".')] = None,
    classes_file: ClassesFileOpt = None,
    photos: PhotosOpt = None,
    photo_masks: PhotoMasksOpt = None,
    models: ModelsOpt = None,
    n: NOpt = None,
    steps: StepsOpt = None,
    scheduler: SchedulerOpt = None,
    seed: SeedOpt = None,
    masker: MaskerOpt = None,
    extractors: ExtractorsOpt = None,
    k: KOpt = None,
    batch_size: BatchSizeOpt = None,
    stuff: StuffOpt = None,
    stuff_table: StuffTableOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    precision: PrecisionOpt = D.PRECISION,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate support images and prototypes for CLASSES, reusing everything already cached."""
    from ..classes import build_class_list, split_list

    with user_errors():
        check_outputs(("--save", save), as_json=as_json)
        class_list = build_class_list(
            classes,
            classes_file,
            split_list(stuff) if stuff else None,
            **given(stuff_table=stuff_table),
            names_from="the arguments",
        )
        from ..models import resolve_models
        from ..models.loading import Models, resolve_device, set_threads
        from ..pipeline.keys import effective_masker, masker_note
        from ..pipeline.synth import support_size_note, synthesize

        spec = resolve_models(models or DEFAULT_MODELS)
        opts = synth_options(
            n=n,
            steps=steps,
            scheduler=scheduler,
            seed=seed,
            masker=masker,
            extractors=extractors,
            k=k,
            batch_size=batch_size,
        )
        set_threads(threads)
        mdl = Models(spec, resolve_device(device), precision)
        class_list = with_photos(class_list, photos, photo_masks, opts, mdl, quiet)
        mdl.check_available(["sd", "dino", "clip"])
        masker_name = effective_masker(opts, mdl)
        mdl.check_available(["cutler"] if masker_name == "cutler" else [])
        cache = open_cache(cache_dir)
    print_notes([c.name for c in class_list], quiet, [masker_note(opts, mdl), support_size_note(opts, mdl, class_list)])
    if verbose:
        err.print(f"models {spec.name} on {mdl.device}; cache {cache.directory}; {options_text(opts)}", markup=False)
    try:
        with RichProgress(not quiet) as progress, user_errors():
            results = synthesize(class_list, opts, mdl, cache, progress)
    except KeyboardInterrupt:
        done = cache.stats.get("support", {}).get("writes", 0)
        err.print(f"interrupted: {done} new images were saved; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        cache.close()
    listed = {c.name: list(c.photo_set.skipped) for c in class_list if c.photo_set is not None}
    if as_json or save is not None:
        doc = {
            "models": {"name": spec.name, "hashes": mdl.hashes, "meaningful": spec.meaningful},
            "masker": masker_name,
            "scheduler": opts.scheduler,
            "classes": [
                {
                    "name": r.name,
                    "stuff": r.stuff,
                    "images_generated": r.images_generated,
                    "images_cached": r.images_cached,
                    "support": {"generated": r.generated, "photos": r.photos},
                    "photos_computed": r.photos_computed,
                    "photos_skipped": [
                        {"file": f, "reason": why} for f, why in [*listed.get(r.name, []), *r.photos_skipped]
                    ],
                    "prototypes": r.prototypes,
                    "digest": r.digest,
                    "seconds": round(r.seconds, 3),
                    "stages": r.stages,
                }
                for r in results
            ],
        }
        if emit(doc, as_json, save):
            return _photo_failures(results, class_list)
    print_table(
        ("class", "images new", "images cached", "photos", "prototypes class/instance/part", "digest", "seconds"),
        [
            (
                f"{r.name} (stuff)" if r.stuff else r.name,
                r.images_generated,
                r.images_cached,
                r.photos,
                ", ".join(f"{e} " + "/".join(map(str, counts.values())) for e, counts in r.prototypes.items()),
                r.digest,
                f"{r.seconds:.1f}",
            )
            for r in results
        ],
        shown={"digest": lambda digest: digest[:12]},  # the whole digest when piped
    )
    if verbose:
        for r in results:
            if r.stages:
                shown = ", ".join(f"{k} {v:.1f} s" for k, v in r.stages.items() if k != "load")
                err.print(f"{r.name}: {shown} (loading networks {r.stages.get('load', 0):.1f} s, inside those)")
    _photo_failures(results, class_list)


def _photo_failures(results: list, classes: list) -> None:
    """Exit 1 if any photo was left out of a support set (each was named on stderr: when listing, before the work,
    or by :func:`photo_warnings`): the banks are complete without them, but a script should notice."""
    from ..outputs import count_noun

    photo_warnings(results)
    count = sum(len(r.photos_skipped) for r in results)
    count += sum(len(c.photo_set.skipped) for c in classes if c.photo_set is not None)
    if count:
        were = "was" if count == 1 else "were"
        raise fail(f"{count_noun(count, 'photo')} {were} left out of the support sets (listed above)", EXIT_FAILED)
