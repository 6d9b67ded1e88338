"""synth through the cache: what is computed, what is reused, and content addressing (CPU, tiny)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ovdiff_cli import pipeline
from ovdiff_cli.cache import Cache
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.prototypes import PrototypeBank

FAST = {"n": 4, "steps": 2, "batch_size": 4, "k": 4}


@pytest.fixture
def cache(tmp_path):
    with Cache(tmp_path / "c") as c:
        yield c


def run(cache, models, names, **opts):
    merged = {**FAST, **opts}
    return pipeline.synthesize([ClassSpec(n) for n in names], pipeline.SynthOptions(**merged), models, cache)


def fresh_stats(cache):
    cache.stats.clear()
    return cache.stats


def test_rerun_computes_nothing(cache, tiny_models):
    first = run(cache, tiny_models, ["cat"])
    assert first[0].images_generated == 4 and not first[0].bank_cached
    stats = fresh_stats(cache)
    again = run(cache, tiny_models, ["cat"])
    assert again[0].images_generated == 0 and again[0].images_cached == 4 and again[0].bank_cached
    assert again[0].digest == first[0].digest
    assert "support" not in stats  # a cached bank does not even read its support images
    assert all(s.get("writes", 0) == 0 for s in stats.values())


def test_new_class_computes_only_itself(cache, tiny_models):
    run(cache, tiny_models, ["cat"])
    stats = fresh_stats(cache)
    res = run(cache, tiny_models, ["cat", "potted plant"])
    assert [r.images_generated for r in res] == [0, 4]
    assert stats["support"]["writes"] == 4 and stats["bank"]["writes"] == 1


def test_growing_n_generates_only_new_images(cache, tiny_models):
    small = run(cache, tiny_models, ["cat"], n=4)
    stats = fresh_stats(cache)
    grown = run(cache, tiny_models, ["cat"], n=8)
    assert grown[0].images_generated == 4 and grown[0].images_cached == 4
    assert stats["support"]["writes"] == 4
    assert grown[0].digest != small[0].digest
    for e in ("sd", "dino", "clip"):
        assert grown[0].prototypes[e]["instance"] >= small[0].prototypes[e]["instance"]


def test_image_alone_equals_image_in_its_batch(tmp_path, tiny_models):
    """Image 3 regenerated on its own is byte-identical to image 3 generated with its batch of 4."""
    opts = pipeline.SynthOptions(**FAST)
    with Cache(tmp_path / "a") as full:
        support = pipeline.ensure_support(full, tiny_models, "cat", opts, pipeline._Silent())
        keys = support.keys
        assert support.generated == 4 and list(support.fresh) == keys
        together = full.get("support", keys[3])
    with Cache(tmp_path / "b") as alone:
        for i in range(3):  # images 0-2 already there: only image 3 is generated
            alone.put("support", keys[i], full_payload(tmp_path / "a", keys[i]))
        support = pipeline.ensure_support(alone, tiny_models, "cat", opts, pipeline._Silent())
        assert support.generated == 1 and list(support.fresh) == [keys[3]]
        assert alone.get("support", keys[3]) == together


def test_bank_from_images_in_memory_equals_bank_from_the_cache(tmp_path, tiny_models, monkeypatch):
    """Issue 15: a run hands its generated images to masks and features on the device, without the PNG round
    trip; a bank rebuilt later from the cached PNGs alone is byte-identical."""
    loads = []
    real_load = pipeline.load_support
    monkeypatch.setattr(pipeline, "load_support", lambda c, k: loads.append(k) or real_load(c, k))
    with Cache(tmp_path / "a") as first:
        made = run(first, tiny_models, ["cat"])[0]
        keys = pipeline.class_keys(tiny_models, "cat", pipeline.SynthOptions(**FAST))[0]
        payloads = {k: first.get("support", k) for k in keys}
    assert made.images_generated == 4 and loads == []  # nothing read back from the cache
    with Cache(tmp_path / "b") as second:
        for k, payload in payloads.items():
            second.put("support", k, payload)
        rebuilt = run(second, tiny_models, ["cat"])[0]
    assert rebuilt.images_generated == 0 and loads == keys
    assert rebuilt.digest == made.digest


def full_payload(directory: Path, key: str) -> bytes:
    with Cache(directory) as c:
        return c.get("support", key)


def test_resumed_run_gives_same_bank(tmp_path, tiny_models):
    """A run stopped after its first batch and resumed ends with the same bank as an uninterrupted one."""
    opts = dict(FAST, n=8)
    with Cache(tmp_path / "straight") as c:
        straight = run(c, tiny_models, ["cat"], **opts)[0]
    with Cache(tmp_path / "resumed") as c:
        real_generate = pipeline.synthesis.generate
        calls = []

        def interrupted(*args, **kwargs):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return real_generate(*args, **kwargs)

        pipeline.synthesis.generate = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                run(c, tiny_models, ["cat"], **opts)
        finally:
            pipeline.synthesis.generate = real_generate
        assert c.info()["support"]["entries"] == 4  # the first batch was saved before the interruption
        resumed = run(c, tiny_models, ["cat"], **opts)[0]
    assert resumed.images_generated == 4
    assert resumed.digest == straight.digest


def test_corrupt_support_entry_is_recomputed_not_returned(cache, tiny_models):
    first = run(cache, tiny_models, ["cat"])[0]
    keys = [pipeline.support_key(tiny_models, "cat", i, pipeline.SynthOptions(**FAST)) for i in range(4)]
    good = cache.get("support", keys[1])
    # Store garbage under the right key, as a torn write or bit rot would leave it.
    cache._cache.set(f"support/{keys[1]}", b"OVDIFF1\0" + b"\0" * 32 + good[:10], tag="support")
    stats = fresh_stats(cache)
    cache.clear("bank")
    again = run(cache, tiny_models, ["cat"])[0]
    assert stats["support"]["corrupt"] == 1 and again.images_generated == 1
    assert cache.get("support", keys[1]) == good
    assert again.digest == first.digest


def test_truncated_bank_is_recomputed(cache, tiny_models):
    first = run(cache, tiny_models, ["cat"])[0]
    db_key = f"bank/{first.bank_key}"
    stored = cache._cache.get(db_key)
    cache._cache.set(db_key, stored[: len(stored) // 2], tag="bank")  # a torn write
    stats = fresh_stats(cache)
    again = run(cache, tiny_models, ["cat"])[0]
    assert stats["bank"]["corrupt"] == 1 and not again.bank_cached
    assert again.digest == first.digest


def test_bank_contents(cache, tiny_models):
    res = run(cache, tiny_models, ["cat"], extractors=("dino", "clip"))[0]
    bank = PrototypeBank.from_bytes(cache.get("bank", res.bank_key))
    assert bank.class_name == "cat" and bank.names == ("clip", "dino")
    assert bank["dino"].prototypes.shape[1] == 32 and bank["clip"].prototypes.shape[1] == 32
    n = 4
    # Each extractor on its own grid (REFERENCE 4): tiny DINO sees a 64-pixel support image at short side 56
    # (7x7 patches), CLIP at its own size (8x8 patches of 8).
    assert bank["dino"].fg_masks.shape == (n, 7, 7) and bank["clip"].fg_masks.shape == (n, 8, 8)
    for e in bank.names:
        assert not (bank[e].fg_masks & bank[e].bg_masks).any()
        assert np.allclose(np.linalg.norm(bank[e].prototypes.numpy(), axis=1), 1, atol=2e-3)
        assert res.prototypes[e]["class"] == int((bank[e].kind == 0).sum())


def test_options_are_validated():
    with pytest.raises(ValueError, match="--n 0"):
        pipeline.SynthOptions(n=0)
    with pytest.raises(ValueError, match="surf"):
        pipeline.SynthOptions(extractors=("sd", "surf"))
    with pytest.raises(ValueError, match="nope"):
        pipeline.SynthOptions(masker="nope")


def test_segment_roles_only_what_the_run_needs(cache, tiny_models):
    from ovdiff_cli.segmentation import SegmentOptions

    classes = [ClassSpec("cat"), ClassSpec("sky", stuff=True)]
    opts = pipeline.SynthOptions(**{**FAST, "extractors": "dino"})
    seg = SegmentOptions(prefilter=False)
    assert pipeline.missing_banks(classes, opts, tiny_models, cache) == ["cat", "sky"]
    # tiny's masker is its (random) CutLER: synthesising needs it too
    assert pipeline.segment_roles(classes, opts, seg, tiny_models, cache) == ["clip", "cutler", "dino", "sd"]
    pipeline.synthesize(classes, opts, tiny_models, cache)
    assert pipeline.missing_banks(classes, opts, tiny_models, cache) == []
    # everything cached: a dino-only run without the pre-filter needs neither Stable Diffusion nor CLIP
    assert pipeline.segment_roles(classes, opts, seg, tiny_models, cache) == ["dino"]
    assert pipeline.segment_roles(classes, opts, SegmentOptions(), tiny_models, cache) == ["clip", "dino"]


def test_cpu_batches_hold_one_image_and_generate_only_what_is_asked(cache, tiny_models, monkeypatch):
    """On the CPU a padded batch slot costs a whole forward: the default batch there is one image, so --n 1
    generates one image (not a padded batch of 8) and features run once per image."""
    import torch

    from ovdiff_cli import defaults as D
    from ovdiff_cli import synthesis
    from ovdiff_cli.models import resolve_models
    from ovdiff_cli.models.loading import Models

    opts = pipeline.SynthOptions(n=1, steps=2, k=2)
    assert opts.batch_size is None and pipeline.batch_size(opts, tiny_models) == 1  # never more than N
    # Full-size networks run one image at a time on the CPU; the toy ones batch as on a GPU (overhead-bound).
    full = Models(resolve_models("sd15-random"), torch.device("cpu"))  # nothing is built to ask this
    assert pipeline.batch_size(pipeline.SynthOptions(), full) == D.CPU_BATCH_SIZE == 1
    assert pipeline.batch_size(pipeline.SynthOptions(), tiny_models) == tiny_models.spec.cpu_batch_size == 8
    assert pipeline.batch_size(pipeline.SynthOptions(batch_size=3), tiny_models) == 3  # the user's wins
    assert pipeline.batch_size(pipeline.SynthOptions(n=2, batch_size=8), tiny_models) == 2  # never more than N
    generated = []
    real = synthesis.generate
    monkeypatch.setattr(
        synthesis,
        "generate",
        lambda gen, name, seeds, **kw: generated.append(len(seeds)) or real(gen, name, seeds, **kw),
    )
    res = pipeline.synthesize([ClassSpec("cat")], opts, tiny_models, cache)
    assert generated == [1] and res[0].images_generated == 1
    # The key records the batch the image was generated in: slot 0 of batch 0 of size 1.
    key_cpu = pipeline.support_key(tiny_models, "cat", 0, opts)
    assert key_cpu == pipeline.support_key(tiny_models, "cat", 0, replace(opts, batch_size=1))
    assert key_cpu != pipeline.support_key(tiny_models, "cat", 0, replace(opts, n=8, batch_size=8))


def test_each_class_reports_its_stage_times(cache, tiny_models):
    first = run(cache, tiny_models, ["cat"])[0]
    assert set(first.stages) == {"sampling", "encode", "decode", "masks", "features", "prototypes", "load"}
    assert all(v >= 0 for v in first.stages.values())
    assert sum(v for k, v in first.stages.items() if k != "load") <= first.seconds
    again = run(cache, tiny_models, ["cat"])[0]
    assert again.stages == {"load": 0.0}  # a cached bank: no stage ran, nothing was loaded
