"""The option block that segment, explain and eval share: the vocabulary, the models, synth's options (missing
prototypes are synthesised) and segmentation's options.

``@segmentation_options`` adds these options to a command's signature and hands them to it as one
:class:`SegmentArgs`; :func:`prepare` turns that into the library objects. Each option is declared once here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import defaults as D
from .common import (
    DEFAULT_MODELS,
    BatchSizeOpt,
    CacheDirOpt,
    ClassesFileOpt,
    DeviceOpt,
    ExtractorsOpt,
    KOpt,
    MaskerOpt,
    ModelsOpt,
    NOpt,
    PhotoMasksOpt,
    PhotosOpt,
    PrecisionOpt,
    SchedulerOpt,
    SeedOpt,
    StepsOpt,
    StuffOpt,
    StuffTableOpt,
    ThreadsOpt,
    given,
    open_cache,
    synth_options,
    with_photos,
)

if TYPE_CHECKING:
    from ..cache import Cache
    from ..classes import ClassSpec
    from ..models.loading import Models
    from ..pipeline.keys import SynthOptions
    from ..segmentation import SegmentOptions


@dataclass(frozen=True)
class SegmentArgs:
    """What the user typed for the shared options (None = not given, so the library default applies)."""

    classes: str | None = None
    classes_file: Path | None = None
    photos: list[str] | None = None
    photo_masks: list[str] | None = None
    stuff: str | None = None
    stuff_table: str | None = None
    models: str | None = None
    prefilter: bool | None = None
    eta: int | None = None
    pamr: bool | None = None
    scales: str | None = None
    stride: int | None = None
    whole_image: bool | None = None
    short_side: int | None = None
    background: bool | None = None
    stuff_threshold: float | None = None
    window_batch: int | None = None
    max_pixels: int | None = None
    n: int | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int | None = None
    masker: str | None = None
    extractors: str | None = None
    k: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    threads: int | None = None
    precision: str = D.PRECISION
    compile: bool = False
    cache_dir: Path | None = None


_OPTIONS: dict[str, Any] = {
    "classes": Annotated[str | None, typer.Option("--classes", help='Comma list, e.g. "cat,dog,sky".')],
    "classes_file": ClassesFileOpt,
    "photos": PhotosOpt,
    "photo_masks": PhotoMasksOpt,
    "stuff": StuffOpt,
    "stuff_table": StuffTableOpt,
    "models": ModelsOpt,
    "prefilter": Annotated[
        bool | None, typer.Option("--filter/--no-filter", help="CLIP category pre-filter [default: on].")
    ],
    "eta": Annotated[int | None, typer.Option("--eta", help=f"Most classes the pre-filter keeps [default: {D.ETA}].")],
    "pamr": Annotated[
        bool | None, typer.Option("--pamr/--no-pamr", help="PAMR refinement of the scores [default: off].")
    ],
    "scales": Annotated[
        str | None, typer.Option("--scales", help=f"Window sizes [default: {','.join(map(str, D.SCALES))}].")
    ],
    "stride": Annotated[int | None, typer.Option("--stride", help=f"Window stride [default: {D.STRIDE}].")],
    "whole_image": Annotated[
        bool | None,
        typer.Option("--whole-image/--no-whole-image", help="The whole image as one more window [default: on]."),
    ],
    "short_side": Annotated[
        int | None, typer.Option("--short-side", help=f"Resize short side to this first [default: {D.SHORT_SIDE}].")
    ],
    "background": Annotated[
        bool | None,
        typer.Option("--background/--no-background", help="Background class from bg prototypes [default: on]."),
    ],
    "stuff_threshold": Annotated[
        float | None,
        typer.Option("--stuff-threshold", help=f"Stuff filter similarity [default: {D.STUFF_THRESHOLD}]."),
    ],
    "window_batch": Annotated[
        int | None,
        typer.Option(
            "--window-batch",
            help=f"Windows per network forward [default: {D.SEGMENT_BATCH_SIZE};"
            f" on the CPU {D.CPU_BATCH_SIZE}, tiny: {D.BATCH_SIZE}].",
        ),
    ],
    "max_pixels": Annotated[
        int | None,
        typer.Option("--max-pixels", help=f"Refuse larger images (decompression bombs) [default: {D.MAX_PIXELS:_}]."),
    ],
    "n": NOpt,
    "steps": StepsOpt,
    "scheduler": SchedulerOpt,
    "seed": SeedOpt,
    "masker": MaskerOpt,
    "extractors": ExtractorsOpt,
    "k": KOpt,
    "batch_size": BatchSizeOpt,
    "device": DeviceOpt,
    "threads": ThreadsOpt,
    "precision": PrecisionOpt,
    "compile": Annotated[
        bool, typer.Option("--compile", help="torch.compile the feature extractors (pays off on long CUDA runs).")
    ],
    "cache_dir": CacheDirOpt,
}
assert list(_OPTIONS) == [f.name for f in fields(SegmentArgs)], "declare each shared option in both places"


_VOCABULARY = ("classes", "classes_file", "photos", "photo_masks")


def segmentation_options(command=None, *, vocabulary: bool = True):
    """Decorator: append the shared options to ``command``'s own and call it with ``args=SegmentArgs(...)``.

    ``vocabulary=False`` leaves out --classes and --classes-file (for commands whose classes are given, like a
    benchmark's).
    """
    if command is None:
        return functools.partial(segmentation_options, vocabulary=vocabulary)
    names = [f.name for f in fields(SegmentArgs) if vocabulary or f.name not in _VOCABULARY]
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "args"]
    defaults = {f.name: f.default for f in fields(SegmentArgs)}
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=_OPTIONS[name])
        for name in names
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        args = SegmentArgs(**{name: kwargs.pop(name) for name in names})
        return command(args=args, **kwargs)

    params = own + shared
    wrapper.__signature__ = inspect.Signature(params)  # what Typer reads
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


@dataclass
class Prepared:
    """The library objects behind the shared options."""

    classes: list[ClassSpec]
    models: Models
    cache: Cache
    synth: SynthOptions
    seg: SegmentOptions
    compile: bool = False
    # Said before any work: which classes will be synthesised first and why, and whether --masker auto could not
    # use CutLER for them.
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the classes without a cached bank for these settings


def prepare(args: SegmentArgs, classes: list[ClassSpec] | None = None, quiet: bool = False) -> Prepared:
    """Validate the shared options and build what they name (no network is loaded; the cache is opened).

    ``classes`` replaces --classes / --classes-file when the command knows its vocabulary (a benchmark's; its
    classes may come with photos already listed). Classes' photos are listed and checked here (``quiet``: without
    a progress line).
    Raises the library's ValueError / ModelUnavailable / CacheError for the caller's ``user_errors()``. Fails
    at once if a network the run needs has no weights here.
    """
    from ..classes import build_class_list, split_list
    from ..models import resolve_models
    from ..models.loading import Models, resolve_device, set_threads
    from ..pipeline.keys import masker_note
    from ..pipeline.segment import segment_roles
    from ..pipeline.synth import missing_banks, support_size_note, synthesis_notes
    from ..segmentation import SegmentOptions

    if classes is None:
        classes = build_class_list(
            split_list(args.classes) if args.classes else None,
            args.classes_file,
            split_list(args.stuff) if args.stuff else None,
            **given(stuff_table=args.stuff_table),
            names_from="--classes",
        )
    spec = resolve_models(args.models or DEFAULT_MODELS)
    synth = synth_options(
        n=args.n,
        steps=args.steps,
        scheduler=args.scheduler,
        seed=args.seed,
        masker=args.masker,
        extractors=args.extractors,
        k=args.k,
        batch_size=args.batch_size,
    )
    seg = SegmentOptions(
        **given(
            scales=args.scales,
            stride=args.stride,
            whole_image=args.whole_image,
            short_side=args.short_side,
            background=args.background,
            prefilter=args.prefilter,
            eta=args.eta,
            stuff_threshold=args.stuff_threshold,
            pamr=args.pamr,
            batch_size=args.window_batch,
            max_pixels=args.max_pixels,
        )
    )
    set_threads(args.threads)
    models = Models(spec, resolve_device(args.device), args.precision)
    classes = with_photos(classes, args.photos, args.photo_masks, synth, models, quiet)
    cache = open_cache(args.cache_dir)
    try:
        models.check_available(segment_roles(classes, synth, seg, models, cache))
        missing = missing_banks(classes, synth, models, cache)
        notes = synthesis_notes(missing, synth, models, cache, classes)
        if missing and (masker := masker_note(synth, models)):
            notes.append(masker)
        if missing and (size := support_size_note(synth, models, classes)):
            notes.append(size)
    except BaseException:
        cache.close()
        raise
    return Prepared(classes, models, cache, synth, seg, args.compile, notes, missing)
