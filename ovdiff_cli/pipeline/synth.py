"""``ovdiff synth`` end to end (paper 3.2 support set generation, 3.3 masks and prototypes): support set ->
attribution -> masks -> features -> prototype bank, through the cache. Every stage reads the content-addressed
cache first and writes what it computed at once, so a second run computes nothing, a new class computes only
itself, a larger N generates only the new images, and an interrupted run resumes where it stopped.

This module owns the "bank" cache stage (:func:`build_class_bank`, :func:`synthesize`), what a bank records
(:func:`bank_meta`), the cached banks as ``ovdiff cache ls`` lists them, and the notes a run prints before it
synthesises (also for segment, explain and eval, which synthesise missing prototypes first).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from .. import cache as cachelib
from .. import defaults as D
from .. import photos, prototypes, synthesis
from ..classes import ClassSpec
from ..extractors import build_extractor
from ..models.loading import Models, dtype_name
from ..outputs import count_noun
from ..timing import Timings
from .common import Progress, _Silent
from .keys import SynthOptions, batch_size, class_keys, class_options, effective_masker, photos_of
from .support import SupportWriter, _batched, ensure_photos, ensure_support, support_masks, support_tensors


@dataclass
class ClassResult:
    """What ``synth`` did for one class (the CLI's summary row and JSON entry)."""

    name: str
    stuff: bool
    images_generated: int = 0
    images_cached: int = 0
    generated: int = 0  # generated images in the support set (N)
    photos: int = 0  # the user's photos in the support set
    photos_computed: int = 0  # photos whose entry (fitted image, mask or attribution) was made in this run
    # (file, reason) of each photo that gave no prototypes in this class's bank: its pixels failed to decode, or no
    # mask was found. Files left out when listing are in the ClassSpec's photo_set.skipped.
    photos_skipped: list[tuple[str, str]] = field(default_factory=list)
    prototypes: dict[str, dict[str, int]] = field(default_factory=dict)
    digest: str = ""
    bank_key: str = ""
    bank_cached: bool = False
    seconds: float = 0.0
    # Seconds per stage: sampling, encode, decode, masks, features, prototypes (see ensure_support, build_class_bank)
    stages: dict[str, float] = field(default_factory=dict)
    bank: prototypes.PrototypeBank | None = field(default=None, repr=False)


def build_class_bank(
    cache: cachelib.Cache,
    models: Models,
    class_name: str,
    keys: list[str],
    opts: SynthOptions,
    timings: Timings | None = None,
    fresh: dict[str, synthesis.SupportImage] | None = None,
    photos: tuple = (),
) -> prototypes.PrototypeBank:
    """Masks, features and prototypes of one class from its support images: those generated in this run
    (``fresh``, see :func:`support_tensors`) and the cached ones; the last ``len(photos)`` keys are the class's
    photos (photos.Photo, in that order), whose provenance the bank records (:func:`photo_meta`). ``timings``
    accumulates "decode" (cache reads, PNG decoding, attribution upsampling), "masks", "features" and
    "prototypes"."""
    timings = timings or Timings()
    with timings("decode"):
        support = support_tensors(cache, models, keys, fresh)
    with timings("masks"):
        fg, bg = support_masks(cache, models, keys, support, opts)
    features = {}
    with timings("features"):
        for name in opts.extractors:
            ext = build_extractor(name, models)
            run = lambda x, ext=ext: ext(x, support=True)  # noqa: E731
            features[name] = _batched(support.images, run, batch_size(opts, models, len(photos)))
    meta = bank_meta(opts, models, len(photos))
    if photos:
        found = fg[len(keys) - len(photos) :].flatten(1).any(1).tolist()
        routes = ["user" if i in support.user_masks else "attribution" for i in range(opts.n, len(keys))]
        meta["photos"] = photo_meta(photos, routes, found)
    with timings("prototypes"):
        return prototypes.build_bank(
            class_name, features, fg, bg, k=opts.k, seed=D.KMEANS_SEED, support_keys=keys, meta=meta
        )


# Why a photo gave no prototypes, by the route its mask was to come from.
NO_MASK = {
    "attribution": "no mask found (the masker found no object on it); give it a mask with --photo-masks",
    "user": "its mask's object vanishes at the support image's size; use a larger photo or a larger object",
}


def photo_meta(photos: tuple, routes: list[str], found: list[bool]) -> list[dict]:
    """What a bank records of each photo in its support set, in order: file name, content digest, the route its
    mask came from ("user" or "attribution") and the mask it got: the route, or "none" where no fg was found (the
    photo gave no prototypes)."""
    return [
        {"file": p.name, "sha256": p.digest, "route": r, "mask": r if ok else "none"}
        for p, r, ok in zip(photos, routes, found, strict=True)
    ]


def photos_used(meta: dict) -> int:
    """How many of the user's photos a bank (its meta) holds with a mask: the ones that gave prototypes."""
    return sum(p.get("mask") != "none" for p in meta.get("photos", []))


def renamed(meta: list[dict], photos: tuple) -> list[dict]:
    """A cached bank's photo records with the current file names: the bank is keyed by the photos' content, so a
    renamed photo reuses it, and the name it shows is the one the photo has now."""
    return [{**m, "file": p.name} if m["sha256"] == p.digest else m for m, p in zip(meta, photos, strict=True)]


def synthesize(
    classes: Iterable[ClassSpec],
    opts: SynthOptions,
    models: Models,
    cache: cachelib.Cache,
    progress: Progress | None = None,
) -> list[ClassResult]:
    """Support sets and prototype banks for ``classes``, computing only what the cache lacks.

    A cached bank is enough: its support images are not needed (nor regenerated) unless the bank is rebuilt,
    so banks imported from another machine work without Stable Diffusion.
    """
    progress = progress or _Silent()
    sync = torch.cuda.synchronize if models.device.type == "cuda" else None
    results = []
    for spec in classes:
        t0 = time.perf_counter()
        loads_before = sum(models.load_seconds.values())
        stages = Timings(sync)
        copts = class_options(spec, opts)
        result = ClassResult(spec.name, spec.stuff, generated=copts.n)
        keys, result.bank_key = class_keys(models, spec, opts)
        payload = cache.get("bank", result.bank_key)
        if payload is None and photos_of(spec):
            # Photos first (cheap next to generating): a photo whose pixels fail to decode leaves the set, and the
            # bank of the others may be cached already.
            items = list(zip(keys[copts.n :], photos_of(spec), strict=True))
            run = ensure_photos(cache, models, spec.name, items, copts, progress, stages)
            result.photos_computed, result.photos_skipped = run.computed, list(run.failed)
            if run.failed:
                gone = {name for name, _ in run.failed}
                kept = tuple(p for p in photos_of(spec) if p.name not in gone)
                spec = replace(spec, photo_set=replace(spec.photo_set, photos=kept))
                keys, result.bank_key = class_keys(models, spec, opts)
                payload = cache.get("bank", result.bank_key)
        photo_list = photos_of(spec)
        if payload is not None:
            bank = prototypes.PrototypeBank.from_bytes(payload)
            result.bank_cached = True
            result.images_cached = sum(cache.contains("support", k) for k in keys[: copts.n])
            if photo_list:
                bank.meta["photos"] = renamed(bank.meta.get("photos", []), photo_list)
        else:
            # The writer stays open while the bank is built: the last batch's PNGs are encoded meanwhile.
            with SupportWriter(cache, spec.name, stages) as writer:
                support = ensure_support(cache, models, spec.name, copts, progress, stages, writer)
                result.images_generated = support.generated
                result.images_cached = copts.n - result.images_generated
                progress.start(f"{spec.name}: prototypes", 1)
                bank = build_class_bank(cache, models, spec.name, keys, copts, stages, support.fresh, photo_list)
            payload = bank.to_bytes()
            cache.put("bank", result.bank_key, payload)
            progress.advance()
        result.photos = photos_used(bank.meta)
        result.photos_skipped += [
            (m["file"], NO_MASK[m["route"]]) for m in bank.meta.get("photos", []) if m["mask"] == "none"
        ]
        result.bank = bank
        result.prototypes = bank.counts()
        result.digest = hashlib.sha256(payload).hexdigest()  # equal digests = byte-identical prototypes
        result.seconds = time.perf_counter() - t0
        result.stages = {k: round(v, 3) for k, v in stages.seconds.items()}
        # "load": networks first loaded while making this class; that time is also inside the stages that needed them.
        result.stages["load"] = round(sum(models.load_seconds.values()) - loads_before, 3)
        results.append(result)
    return results


def missing_banks(classes: Iterable[ClassSpec], opts: SynthOptions, models: Models, cache: cachelib.Cache) -> list[str]:
    """Names of the classes whose prototype bank is not cached yet (no model is loaded to find out)."""
    return [c.name for c in classes if not cache.contains("bank", class_keys(models, c, opts)[1])]


def bank_meta(opts: SynthOptions, models: Models, photos: int = 0) -> dict:
    """The settings a bank records about how it was made (``ovdiff cache ls`` shows them). Batch size and SD
    precision are among them because they are in the support keys: a bank made with others has other keys.
    ``n`` counts the generated images; a bank with photos also records each one (see :func:`photo_meta`)."""
    return {
        "model_set": models.spec.name,
        "masker": effective_masker(opts, models),
        "n": opts.n,
        "seed": opts.seed,
        "steps": opts.steps,
        "scheduler": opts.scheduler,
        "guidance": opts.guidance,
        "k": opts.k,
        "batch_size": batch_size(opts, models, photos),
        "precision": dtype_name(models.dtype("sd")),
    }


@dataclass
class CachedBank:
    """One cached prototype bank, as ``ovdiff cache ls`` lists it: its class, the settings that made it (the
    bank's ``meta``: model set, n, steps, seed, masker...), its extractors, when it was stored and its size."""

    class_name: str
    key: str
    stored_at: float
    bytes: int
    extractors: list[str]
    meta: dict

    @property
    def photos(self) -> int:
        """How many of the user's photos the bank's support set holds (with a mask: the ones that gave prototypes)."""
        return photos_used(self.meta)

    def settings(self) -> str:
        """``"sd15, n 4, steps 30, seed 42, masker maskcut, sd+dino+clip"`` (fields older banks lack are left out);
        a bank with photos says ``"n 4 + 3 photos"``."""
        m = self.meta
        parts = [str(m["model_set"])] if "model_set" in m else []
        parts += [
            f"{name} {m[name]}" + (f" + {count_noun(self.photos, 'photo')}" if name == "n" and self.photos else "")
            for name in ("n", "steps", "seed", "masker", "batch_size", "precision")
            if name in m
        ]
        return ", ".join([*parts, "+".join(sorted(self.extractors))])


def cached_banks(cache: cachelib.Cache, class_name: str | None = None) -> list[CachedBank]:
    """Every readable bank in the cache (only ``class_name``'s when given), oldest first. Reads each bank's header,
    not its tensors; an entry that is not a readable bank is left out."""
    out = []
    for key, stored_at, size in cache.listing("bank"):
        payload = cache.get("bank", key)
        try:
            info = prototypes.read_bank_info(payload) if payload is not None else None
        except ValueError:
            info = None
        if info is None or (class_name is not None and info["class_name"] != class_name):
            continue
        out.append(CachedBank(info["class_name"], key, stored_at, size, list(info["extractors"]), dict(info["meta"])))
    return out


def support_size_note(opts: SynthOptions, models: Models, classes: Iterable[ClassSpec] = ()) -> str | None:
    """A warning, before any work, when a class's support set is large (above D.N_WARN images: --n, or a class's
    own N plus its photos): the cache it fills per class and the memory its prototypes need. None otherwise."""
    sizes = [(class_options(c, opts).n + len(photos_of(c)), c.name) for c in classes] or [(opts.n, None)]
    count, name = max(sizes, key=lambda s: s[0])
    if count <= D.N_WARN:
        return None
    per_class = count * models.spec.image_size**2 * D.SUPPORT_BYTES_PER_PIXEL
    size = f"{per_class / 1e9:.1f} GB" if per_class >= 1e9 else f"{per_class / 1e6:.0f} MB"
    what = f"--n {opts.n:,}" if name is None or count == opts.n else f"class {name!r} ({count:,} support images)"
    return (
        f"{what}: about {size} of cache per class not yet cached, and all {count:,}"
        f" images' masked features held in memory to build its prototypes ({D.N_SUPPORT} is the paper's);"
        " the progress line gives the time left once the first batch is done"
    )


def synthesis_notes(
    missing: list[str], opts: SynthOptions, models: Models, cache: cachelib.Cache, classes: Iterable[ClassSpec] = ()
) -> list[str]:
    """What a segment, explain or eval run says before it synthesises classes itself: which ones, why (no bank for
    these settings), and the settings of the banks the cache does hold for them (so a mismatch is visible).
    ``classes``: the run's classes, for the support sets of those with photos or their own N."""
    if not missing:
        return []
    wanted = CachedBank("", "", 0.0, 0, list(opts.extractors), bank_meta(opts, models)).settings()
    own = [
        f"{c.name}: {class_options(c, opts).n} generated + {count_noun(len(photos_of(c)), 'photo')}"
        for c in classes
        if c.name in missing and (photos_of(c) or class_options(c, opts).n != opts.n)
    ]
    notes = [
        f"synthesising {len(missing)} {'class' if len(missing) == 1 else 'classes'} first"
        f" ({opts.n} images each{''.join(f'; {o}' for o in own)}; no cached prototypes for {wanted}):"
        f" {', '.join(missing)}"
    ]
    held: dict[str, list[str]] = {}
    with_photos: set[str] = set()
    for bank in cached_banks(cache):
        if bank.class_name in missing:
            held.setdefault(bank.class_name, []).append(bank.settings())
            if bank.photos:
                with_photos.add(bank.class_name)
    for name in missing:
        if held.get(name):
            shown = "; ".join(dict.fromkeys(held[name]))
            how = "those options and its --photos folder" if name in with_photos else "those options"
            notes.append(f"cached for {name} with other settings: {shown} (pass {how} to use them)")
    return notes


def photo_sets(
    classes: list[ClassSpec],
    opts: SynthOptions,
    models: Models,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[ClassSpec]:
    """``classes`` with their photos listed, hashed and checked (photos.list_photos), before any work: a photo with
    a side shorter than the feature grid is left out with a reason. ``on_progress(folder, done, total)`` follows
    the hashing.

    Raises:
        ValueError: a photos or masks folder that is missing or holds no image, a wrong mask, or a class left with
            no support image at all (N = 0 and no usable photo) or with more than D.N_MAX.
    """
    out = []
    for spec in classes:
        if spec.photos is not None:
            progress = None if on_progress is None else functools.partial(on_progress, str(spec.photos))
            found = photos.list_photos(spec.photos, spec.photo_masks, min_side=models.spec.grid, on_progress=progress)
            spec = replace(spec, photo_set=found)
        n = class_options(spec, opts).n
        count = len(photos_of(spec))
        if n + count == 0:
            why = "no photos"
            if spec.photo_set is not None:
                first, reason = spec.photo_set.skipped[0]
                files = len(spec.photo_set.skipped)
                why = f"none of the {files} files in {spec.photos} is a usable photo ({first}: {reason})"
            raise ValueError(
                f"class {spec.name!r}: {why} and --n 0 generates no image; it would have no support images"
                " (give it photos, or --n 1 or more)"
            )
        if n + count > D.N_MAX:
            raise ValueError(
                f"class {spec.name!r}: {count:,} photos and {n:,} generated images, more than {D.N_MAX:,} support"
                " images per class (its prototypes hold every image's features in memory at once)"
            )
        out.append(spec)
    return out
