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


def test_growing_n_below_the_batch_size_reuses_every_image_on_the_cpu(tmp_path, tiny_models):
    """Issue 23: with the default batch size, N 4 then 6 generates only images 4 and 5, and all six are the bytes a
    fresh N = 6 run makes (on the CPU batches keep the configured size whatever N)."""
    grown = {"n": 6, "batch_size": None}
    with Cache(tmp_path / "a") as a:
        run(a, tiny_models, ["cat"], n=4, batch_size=None)
        stats = fresh_stats(a)
        second = run(a, tiny_models, ["cat"], **grown)[0]
        assert (second.images_generated, second.images_cached) == (2, 4)
        assert stats["support"]["writes"] == 2
        keys = pipeline.class_keys(tiny_models, "cat", pipeline.SynthOptions(**{**FAST, **grown}))[0]
        incremental = [a.get("support", k) for k in keys]
    with Cache(tmp_path / "b") as b:
        direct = run(b, tiny_models, ["cat"], **grown)[0]
        assert direct.images_generated == 6 and [b.get("support", k) for k in keys] == incremental
    assert direct.digest == second.digest


def test_support_keys_hold_the_batch_the_image_ran_in(tiny_models):
    """The key holds the batch an image ran in: on CUDA it follows N below the batch size of 8; on the CPU it is
    the configured batch size, whatever N."""
    import torch

    from ovdiff_cli.models.loading import Models

    gpu = Models(tiny_models.spec, torch.device("cuda"), "auto")  # builds nothing: keys come from the spec

    def keys(models, n):
        opts = pipeline.SynthOptions(**{**FAST, "n": n, "batch_size": None})
        return [pipeline.support_key(models, "cat", i, opts) for i in range(n)]

    assert keys(tiny_models, 6)[:4] == keys(tiny_models, 4)
    assert keys(gpu, 6)[:4] != keys(gpu, 4)[:4]  # batches of 4, then of 6: other batch shapes
    assert keys(gpu, 12)[:8] == keys(gpu, 8)  # from N = 8 on, the batch is 8 whatever N is
    assert keys(gpu, 8) != keys(tiny_models, 8)  # SD's dtype differs: fp16 under auto on CUDA
    assert keys(Models(tiny_models.spec, torch.device("cuda"), "fp32"), 8) == keys(tiny_models, 8)


def test_support_bytes_are_floored_and_cutler_sees_the_float_image(tmp_path, tiny_models, monkeypatch):
    """Row 14: saved pixels are floor(255 x) of x = decoded / 2 + 0.5, as torchvision's to_pil_image makes them;
    CutLER gets the float x (to 1/512 of a grey level), the same from a fresh run and from the cache."""
    import torch
    from torchvision.transforms.functional import to_pil_image

    from ovdiff_cli import synthesis

    decoded = torch.linspace(-1.2, 1.2, 3 * 8 * 8).reshape(3, 8, 8)
    x = (decoded / 2 + 0.5).clamp(0, 1)
    saved, residual = synthesis.quantise(decoded)
    assert np.array_equal(saved.permute(1, 2, 0).numpy(), np.asarray(to_pil_image(x)))
    assert saved[0, 4, 0] == int(x[0, 4, 0] * 255)  # 0.5 -> 127 (rounding would give 128)
    # one residual step is 1/256 of a grey level; restoring takes its centre, so the error is at most half of it
    assert (synthesis.restore_float(saved, residual) - x).abs().max() <= 0.5 / 256 / 255 + 1e-7

    seen = []

    def record(self, attribution, features=None, images=None):
        seen.append(images.clone())
        return [torch.zeros(0, *attribution.shape[1:], dtype=torch.bool) for _ in range(attribution.shape[0])]

    monkeypatch.setattr(pipeline.support.masks.CutlerMasker, "propose", record)
    opts = {"masker": "cutler"}
    with Cache(tmp_path / "a") as a:
        run(a, tiny_models, ["cat"], **opts)
        keys = pipeline.class_keys(tiny_models, "cat", pipeline.SynthOptions(**{**FAST, **opts}))[0]
        payloads = {k: a.get("support", k) for k in keys}
    with Cache(tmp_path / "b") as b:  # the same images from the cache alone: CutLER sees the same floats
        for k, payload in payloads.items():
            b.put("support", k, payload)
        run(b, tiny_models, ["cat"], **opts)
        floored = torch.stack([torch.from_numpy(pipeline.load_support(b, k)[0]) for k in keys]).permute(0, 3, 1, 2)
    fresh, cached = seen
    assert torch.equal(fresh, cached)
    assert (fresh * 255 >= floored.float() - 1e-3).all() and (fresh * 255 < floored.float() + 1).all()
    assert not torch.equal(fresh, floored.float() / 255)


def test_threshold_masks_take_otsu_from_the_cached_grid_maps(cache, tiny_models):
    """Row 15 through the pipeline: the "-CutLER" thresholds are skimage's multi-Otsu of the class's latent-grid
    maps as cached, applied to the maps at the image size."""
    import torch
    from skimage.filters import threshold_multiotsu

    from ovdiff_cli import attribution

    opts = pipeline.SynthOptions(**{**FAST, "masker": "threshold"})
    keys = pipeline.ensure_support(cache, tiny_models, "cat", opts, pipeline.common._Silent()).keys
    grid = torch.stack([torch.from_numpy(pipeline.load_support(cache, k)[2]) for k in keys])
    low, high = threshold_multiotsu(grid.double().numpy().ravel(), classes=3)
    support = pipeline.support_tensors(cache, tiny_models, keys)
    assert torch.equal(support.grid_attribution, grid)
    big = attribution.at_image_size(grid, tiny_models.spec.image_size)
    fg, bg = pipeline.support_masks(cache, tiny_models, keys, support, opts)
    want_fg = big > high
    assert torch.equal(fg, want_fg) and torch.equal(bg, (big < low) & want_fg.flatten(1).any(1)[:, None, None])


def test_image_alone_equals_image_in_its_batch(tmp_path, tiny_models):
    """Image 3 regenerated on its own is byte-identical to image 3 generated with its batch of 4."""
    opts = pipeline.SynthOptions(**FAST)
    with Cache(tmp_path / "a") as full:
        support = pipeline.ensure_support(full, tiny_models, "cat", opts, pipeline.common._Silent())
        keys = support.keys
        assert support.generated == 4 and list(support.fresh) == keys
        together = full.get("support", keys[3])
    with Cache(tmp_path / "b") as alone:
        for i in range(3):  # images 0-2 already there: only image 3 is generated
            alone.put("support", keys[i], full_payload(tmp_path / "a", keys[i]))
        support = pipeline.ensure_support(alone, tiny_models, "cat", opts, pipeline.common._Silent())
        assert support.generated == 1 and list(support.fresh) == [keys[3]]
        assert alone.get("support", keys[3]) == together


def test_bank_from_images_in_memory_equals_bank_from_the_cache(tmp_path, tiny_models, monkeypatch):
    """Issue 15: a run hands its generated images to masks and features on the device, without the PNG round
    trip; a bank rebuilt later from the cached PNGs alone is byte-identical."""
    loads = []
    real_load = pipeline.support.load_entry
    monkeypatch.setattr(pipeline.support, "load_entry", lambda c, k: loads.append(k) or real_load(c, k))
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
        real_generate = pipeline.support.synthesis.generate
        calls = []

        def interrupted(*args, **kwargs):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return real_generate(*args, **kwargs)

        pipeline.support.synthesis.generate = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                run(c, tiny_models, ["cat"], **opts)
        finally:
            pipeline.support.synthesis.generate = real_generate
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
    # Each extractor on its own grid (REFERENCE 4): tiny DINO and CLIP both see the 64-pixel support image at its
    # own size (8x8 patches of 8; DINO's windows would be shrunk to short side 56, support images never are).
    assert bank["dino"].fg_masks.shape == (n, 8, 8) and bank["clip"].fg_masks.shape == (n, 8, 8)
    for e in bank.names:
        assert not (bank[e].fg_masks & bank[e].bg_masks).any()
        assert np.allclose(np.linalg.norm(bank[e].prototypes.numpy(), axis=1), 1, atol=1e-5)  # fp32, unit rows
        assert res.prototypes[e]["class"] == int((bank[e].kind == 0).sum())


def test_options_are_validated():
    with pytest.raises(ValueError, match="--n -1"):
        pipeline.SynthOptions(n=-1)
    assert pipeline.SynthOptions(n=0).n == 0  # photos only: whether a class has any support is checked per class
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


def test_cpu_batches_keep_their_size_and_store_only_what_is_asked(cache, tiny_models, monkeypatch):
    """On the CPU a padded batch slot costs a whole forward: the default batch there is one image for full-size
    networks, so --n 1 generates one image and features run once per image."""
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
    # A full-size set's batch of one, asked for by name here: one image generated, one stored.
    stats = fresh_stats(cache)
    res = pipeline.synthesize([ClassSpec("cat")], replace(opts, batch_size=1), tiny_models, cache)
    assert generated == [1] and res[0].images_generated == 1 and stats["support"]["writes"] == 1
    # On the CPU generation keeps the configured batch whatever N (so N can grow): tiny's 8 run, 1 is stored.
    stats = fresh_stats(cache)
    res = pipeline.synthesize([ClassSpec("dog")], opts, tiny_models, cache)
    assert generated == [1, 8] and res[0].images_generated == 1 and stats["support"]["writes"] == 1
    # The key records the batch the image was generated in: slot 0 of batch 0 of the configured size.
    key_cpu = pipeline.support_key(tiny_models, "cat", 0, opts)
    assert key_cpu == pipeline.support_key(tiny_models, "cat", 0, replace(opts, n=8, batch_size=8))
    assert key_cpu != pipeline.support_key(tiny_models, "cat", 0, replace(opts, batch_size=1))


def test_each_class_reports_its_stage_times(cache, tiny_models):
    first = run(cache, tiny_models, ["cat"])[0]
    assert set(first.stages) == {"sampling", "encode", "decode", "masks", "features", "prototypes", "load"}
    assert all(v >= 0 for v in first.stages.values())
    assert sum(v for k, v in first.stages.items() if k != "load") <= first.seconds
    again = run(cache, tiny_models, ["cat"])[0]
    assert again.stages == {"load": 0.0}  # a cached bank: no stage ran, nothing was loaded


def test_prefilter_runs_its_own_dtype_beside_fp32_dense_clip(tiny_models, monkeypatch):
    """Row 16: under --precision auto on CUDA the pre-filter's CLIP runs fp16 while dense CLIP features stay fp32
    (REFERENCE 4, 6): a converted copy, the dense network untouched. Same dtype: the very same network."""
    import torch

    assert pipeline.prefilter_clip(tiny_models) is tiny_models.get("clip")
    monkeypatch.setitem(tiny_models.dtypes, "prefilter", torch.bfloat16)
    copy = pipeline.prefilter_clip(tiny_models)
    dense = tiny_models.get("clip")
    assert copy is not dense
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in dense.parameters()} == {torch.float32}
    for a, b in zip(copy.parameters(), dense.parameters(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16))
