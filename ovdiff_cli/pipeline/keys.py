"""Cache keys of ``ovdiff synth``'s stages (paper 3.2 support set generation, 3.3 masks and prototypes), for
``synth`` and for every command that synthesises missing prototypes first (segment, explain, eval).

What determines a support image's bytes (:func:`support_key`), a class's prototype bank (:func:`bank_key`) and,
through :func:`_masker_fields`, its mask proposals; the stage versions; the options they are computed from
(:class:`SynthOptions`) and the batch sizes and masker the options mean on given models. Computed from model hashes
and options: no model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import cache as cachelib
from .. import defaults as D
from .. import masks, synthesis
from ..classes import ClassSpec
from ..extractors import build_extractor, parse_extractors
from ..models.loading import Models, dtype_name

# Bump a stage's version whenever its bytes would change for the same key fields.
# 2: the reference's recipe (issue 11): DPM-Solver++ by default, bicubic per-step attribution stored in float32,
# masks chosen at the support image's resolution, per-extractor prototypes from raw features.
# 3: the last mile (issue 23): images floored with their residual kept, DPM-Solver++'s last step second order,
# tokens upsampled one by one; CutLER on the float image at torchvision's size; eq. 1's per-pixel partition,
# per-grid skips, sklearn's K-means stop, fp32 prototypes, DINO support at 512, windows resized without antialias.
SUPPORT_VERSION = 3
PROPOSALS_VERSION = 3
BANK_VERSION = 3


@dataclass(frozen=True)
class SynthOptions:
    """What determines a class's support set and prototype bank. Defaults are the paper's (see defaults.py)."""

    n: int = D.N_SUPPORT
    steps: int = D.STEPS
    scheduler: str = D.SCHEDULER
    guidance: float = D.GUIDANCE
    seed: int = D.SEED
    batch_size: int | None = None  # None: D.BATCH_SIZE, or D.CPU_BATCH_SIZE on the CPU (see batch_size())
    masker: str = D.MASKER
    extractors: tuple[str, ...] = D.EXTRACTORS
    k: int = D.K_PARTS
    negative_prompt: str = D.NEGATIVE_PROMPT

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"--n {self.n}: must be 0 (photos only) or more")
        for name in ("steps", "batch_size", "k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.n > D.N_MAX:
            raise ValueError(
                f"--n {self.n:,}: more than {D.N_MAX:,} support images per class (the paper uses {D.N_SUPPORT});"
                " a class's prototypes hold every image's features in memory at once"
            )
        if self.scheduler not in D.SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(D.SCHEDULERS)}")
        object.__setattr__(self, "extractors", parse_extractors(self.extractors))
        name = self.masker.strip().lower()
        # "auto" stays "auto" here: which masker it means depends on the models (see effective_masker).
        object.__setattr__(self, "masker", name if name == masks.AUTO else masks.resolve_masker_name(name))
        masks.build_masker(self.masker)  # an unknown masker or bad parameter fails here, early


def configured_batch_size(opts: SynthOptions, models: Models) -> int:
    """The user's ``--batch-size``, else D.BATCH_SIZE on an accelerator and the model set's ``cpu_batch_size`` on
    the CPU (D.CPU_BATCH_SIZE for full-size networks)."""
    if opts.batch_size is not None:
        return opts.batch_size
    return models.spec.cpu_batch_size if models.device.type == "cpu" else D.BATCH_SIZE


def batch_size(opts: SynthOptions, models: Models, photos: int = 0) -> int:
    """Images per network batch when computing on support images (masks, features): the configured batch size,
    never more than the class's images (N generated plus ``photos``)."""
    return max(1, min(configured_batch_size(opts, models), opts.n + photos))


def class_options(spec: ClassSpec, opts: SynthOptions) -> SynthOptions:
    """The run's options for one class: its own count of generated images when its classes-file line sets one."""
    return opts if spec.n is None or spec.n == opts.n else replace(opts, n=spec.n)


def photos_of(spec: ClassSpec) -> tuple:
    """The class's usable photos (photos.Photo, in support-set order); none without a photos folder."""
    return spec.photo_set.photos if spec.photo_set is not None else ()


def photo_key(models: Models, class_name: str, photo) -> str:
    """Cache key of a photo's support entry: its bytes' digest and what turns them into the entry, never its path
    (a renamed photo keeps its entry). With the user's mask: the mask's digest (no attribution is computed, so
    neither the class nor SD is in the key). Without: the class prompt, SD and the attribution's timesteps (it
    runs one photo at a time, so no batch enters it: see support.ensure_photos)."""
    fields: dict = {"photo": photo.digest, "size": models.spec.image_size, "fit": "whole-lanczos"}
    if photo.mask_digest is not None:
        fields["mask"] = photo.mask_digest
    else:
        fields |= {
            "prompt": synthesis.prompt_for(class_name),
            "class_name": class_name,
            "model": models.hashes["sd"],
            "timesteps": list(D.PHOTO_TIMESTEPS),
            "noise_seed": D.PHOTO_NOISE_SEED,
            "dtype": dtype_name(models.dtype("sd")),
        }
    return cachelib.make_key("support", SUPPORT_VERSION, kind="photo", **fields)


def sampling_batch_size(opts: SynthOptions, models: Models) -> int:
    """Images per batch when generating: images run in batches of this size aligned to their index, every slot a
    genuine image (see :func:`support_key`). On an accelerator it is :func:`batch_size`, so a small support set
    never generates images it does not need; on the CPU the configured batch size whatever N (1 for full-size
    networks), so N never changes an image's batch there."""
    return batch_size(opts, models) if models.device.type != "cpu" else configured_batch_size(opts, models)


def support_key(models: Models, class_name: str, index: int, opts: SynthOptions) -> str:
    """Cache key of support image ``index`` of ``class_name``: everything that determines its bytes.

    N is absent. The batch is present, as (batch, slot, batch size) of :func:`sampling_batch_size`: the batch
    size changes low-order bits (on this project's CPU an image generated alone differs from the same image in a
    batch of 4), the slot and the neighbours do not (every slot holds its genuine image, so they are the same
    whoever asks). On the CPU that batch does not follow N, so a growing N reuses every cached image; on an
    accelerator it follows N while N is below the batch size. Passing an accelerator's ``--batch-size`` and
    ``--precision`` on the CPU asks for the images and banks it made. The dtype SD ran in is in the key too.
    """
    b = sampling_batch_size(opts, models)
    slot = [index // b, index % b, b]
    return cachelib.make_key(
        "support",
        SUPPORT_VERSION,
        prompt=synthesis.prompt_for(class_name),
        negative_prompt=opts.negative_prompt,
        class_name=class_name,
        image_seed=synthesis.image_seed(opts.seed, class_name, index),
        batch_slot=slot,
        model=models.hashes["sd"],
        steps=opts.steps,
        guidance=opts.guidance,
        scheduler=opts.scheduler,
        size=models.spec.image_size,
        dtype=dtype_name(models.dtype("sd")),
    )


def effective_masker(opts: SynthOptions, models: Models) -> str:
    """The masker a run uses: ``--masker auto`` is cutler when the model set's CutLER checkpoint is on this machine
    (the paper's recipe), else maskcut (see :func:`masker_note`)."""
    if opts.masker != masks.AUTO:
        return opts.masker
    return masks.resolve_masker_name(masks.AUTO, cutler_weights=models.has_weights("cutler"))


def masker_note(opts: SynthOptions, models: Models) -> str | None:
    """What to tell the user when ``--masker auto`` could not use CutLER; None when there is nothing to say."""
    if opts.masker != masks.AUTO or models.has_weights("cutler"):
        return None
    comp = models.spec.components.get("cutler")
    where = f" ({comp.source})" if comp is not None else ""
    return (
        f"--masker auto uses {effective_masker(opts, models)}: the CutLER checkpoint{where} is not on this machine,"
        " so support masks are not the paper's recipe; get it with `ovdiff models fetch sd15` or pass"
        " --models NAME,cutler=PATH"
    )


def build_class_masker(opts: SynthOptions, models: Models) -> masks.Masker:
    """The run's masker, bound to the models (it loads nothing until it runs)."""
    return masks.build_masker(effective_masker(opts, models), models=models)


def _masker_fields(models: Models, masker: masks.Masker) -> dict:
    """What a masker's output depends on, for cache keys: its name, version, parameters and the network it runs."""
    model = models.hashes["dino"] if masker.needs_features else None
    if masker.name == "cutler":
        model = models.hashes["cutler"]
    return {
        "masker": masker.name,
        "masker_version": masker.version,
        "masker_params": masker.params(),
        "masker_model": model,
        "masker_input": models.spec.maskcut_input if masker.needs_features else None,
    }


def bank_key(models: Models, class_name: str, keys: list[str], opts: SynthOptions, photos: int = 0) -> str:
    """Cache key of a class's prototype bank: its support keys (generated images, then ``photos`` photos) and
    every setting of masks, features and prototypes."""
    masker = build_class_masker(opts, models)
    extractors = {name: build_extractor(name, models) for name in opts.extractors}
    # Only a class with photos has the photo fields: every other class keeps the key it always had.
    with_photos = {"photos": {"count": photos, "erode": D.BG_ERODE, "no_mask": "skip"}} if photos else {}
    return cachelib.make_key(
        "bank",
        BANK_VERSION,
        class_name=class_name,
        support=keys,
        **with_photos,
        **_masker_fields(models, masker),
        extractors={
            n: {"model": models.hashes[e.role], "params": e.params(), "dtype": dtype_name(models.dtype(e.role))}
            for n, e in extractors.items()
        },
        mask_size=models.spec.image_size,
        mask_grid_threshold=D.MASK_GRID_THRESHOLD,
        selection={"bg_max": D.BG_ATTRIBUTION_MAX, "erode": D.BG_ERODE, "fg_fallback": D.FG_FALLBACK},
        k=opts.k,
        kmeans_seed=D.KMEANS_SEED,
        kmeans_iters=D.KMEANS_ITERS,
        kmeans_tol=D.KMEANS_TOL,
    )


def class_keys(models: Models, spec: ClassSpec | str, opts: SynthOptions) -> tuple[list[str], str]:
    """The class's support keys (its N generated images, then its photos) and its bank key: computed from model
    hashes, options and the photos' digests, no model loaded. ``opts`` is the run's; the class's own N applies."""
    spec = ClassSpec(spec) if isinstance(spec, str) else spec
    opts = class_options(spec, opts)
    photos = photos_of(spec)
    keys = [support_key(models, spec.name, i, opts) for i in range(opts.n)]
    keys += [photo_key(models, spec.name, p) for p in photos]
    return keys, bank_key(models, spec.name, keys, opts, len(photos))
