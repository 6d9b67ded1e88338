"""``ovdiff synth`` end to end (paper 3.2 support set generation, 3.3 masks and prototypes): support set ->
attribution -> masks -> features -> prototype bank, through the cache. Every stage reads the content-addressed
cache first and writes what it computed at once, so a second run computes nothing, a new class computes only
itself, a larger N generates only the new images, and an interrupted run resumes where it stopped.

This module owns the "bank" cache stage (:func:`build_class_bank`, :func:`synthesize`), what a bank records
(:func:`bank_meta`), the cached banks as ``ovdiff cache ls`` lists them, and the notes a run prints before it
synthesises (also for segment, explain and eval, which synthesise missing prototypes first).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .. import cache as cachelib
from .. import defaults as D
from .. import prototypes, synthesis
from ..classes import ClassSpec
from ..extractors import build_extractor
from ..models.loading import Models, dtype_name
from ..timing import Timings
from .common import Progress, _Silent
from .keys import SynthOptions, batch_size, class_keys, effective_masker
from .support import SupportWriter, _batched, ensure_support, support_masks, support_tensors


@dataclass
class ClassResult:
    """What ``synth`` did for one class (the CLI's summary row and JSON entry)."""

    name: str
    stuff: bool
    images_generated: int = 0
    images_cached: int = 0
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
) -> prototypes.PrototypeBank:
    """Masks, features and prototypes of one class from its support images: those generated in this run
    (``fresh``, see :func:`support_tensors`) and the cached ones. ``timings`` accumulates "decode" (cache reads,
    PNG decoding, attribution upsampling), "masks", "features" and "prototypes"."""
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
            features[name] = _batched(support.images, run, batch_size(opts, models))
    with timings("prototypes"):
        return prototypes.build_bank(
            class_name,
            features,
            fg,
            bg,
            k=opts.k,
            seed=D.KMEANS_SEED,
            support_keys=keys,
            meta=bank_meta(opts, models),
        )


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
        result = ClassResult(spec.name, spec.stuff)
        keys, result.bank_key = class_keys(models, spec.name, opts)
        payload = cache.get("bank", result.bank_key)
        if payload is not None:
            bank = prototypes.PrototypeBank.from_bytes(payload)
            result.bank_cached = True
            result.images_cached = sum(cache.contains("support", k) for k in keys)
        else:
            # The writer stays open while the bank is built: the last batch's PNGs are encoded meanwhile.
            with SupportWriter(cache, spec.name, stages) as writer:
                support = ensure_support(cache, models, spec.name, opts, progress, stages, writer)
                result.images_generated = support.generated
                result.images_cached = opts.n - result.images_generated
                progress.start(f"{spec.name}: prototypes", 1)
                bank = build_class_bank(cache, models, spec.name, keys, opts, stages, support.fresh)
            payload = bank.to_bytes()
            cache.put("bank", result.bank_key, payload)
            progress.advance()
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
    return [c.name for c in classes if not cache.contains("bank", class_keys(models, c.name, opts)[1])]


def bank_meta(opts: SynthOptions, models: Models) -> dict:
    """The settings a bank records about how it was made (``ovdiff cache ls`` shows them). Batch size and SD
    precision are among them because they are in the support keys: a bank made with others has other keys."""
    return {
        "model_set": models.spec.name,
        "masker": effective_masker(opts, models),
        "n": opts.n,
        "seed": opts.seed,
        "steps": opts.steps,
        "scheduler": opts.scheduler,
        "guidance": opts.guidance,
        "k": opts.k,
        "batch_size": batch_size(opts, models),
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

    def settings(self) -> str:
        """``"sd15, n 4, steps 30, seed 42, masker maskcut, sd+dino+clip"`` (fields older banks lack are left out)."""
        m = self.meta
        parts = [str(m["model_set"])] if "model_set" in m else []
        parts += [
            f"{name} {m[name]}" for name in ("n", "steps", "seed", "masker", "batch_size", "precision") if name in m
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


def support_size_note(opts: SynthOptions, models: Models) -> str | None:
    """A warning, before any work, when --n is large (above D.N_WARN): the cache it fills per class and the memory
    its prototypes need. None otherwise."""
    if opts.n <= D.N_WARN:
        return None
    per_class = opts.n * models.spec.image_size**2 * D.SUPPORT_BYTES_PER_PIXEL
    size = f"{per_class / 1e9:.1f} GB" if per_class >= 1e9 else f"{per_class / 1e6:.0f} MB"
    return (
        f"--n {opts.n:,}: about {size} of cache per class not yet cached, and all {opts.n:,}"
        f" images' masked features held in memory to build its prototypes ({D.N_SUPPORT} is the paper's);"
        " the progress line gives the time left once the first batch is done"
    )


def synthesis_notes(missing: list[str], opts: SynthOptions, models: Models, cache: cachelib.Cache) -> list[str]:
    """What a segment, explain or eval run says before it synthesises classes itself: which ones, why (no bank for
    these settings), and the settings of the banks the cache does hold for them (so a mismatch is visible)."""
    if not missing:
        return []
    wanted = CachedBank("", "", 0.0, 0, list(opts.extractors), bank_meta(opts, models)).settings()
    notes = [
        f"synthesising {len(missing)} {'class' if len(missing) == 1 else 'classes'} first"
        f" ({opts.n} images each; no cached prototypes for {wanted}): {', '.join(missing)}"
    ]
    held: dict[str, list[str]] = {}
    for bank in cached_banks(cache):
        if bank.class_name in missing:
            held.setdefault(bank.class_name, []).append(bank.settings())
    for name in missing:
        if held.get(name):
            shown = "; ".join(dict.fromkeys(held[name]))
            notes.append(f"cached for {name} with other settings: {shown} (pass those options to use them)")
    return notes
