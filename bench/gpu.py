"""GPU bench: the paper's full-size architectures with random weights (``sd15-random``), on one CUDA device.

Needs only torch with CUDA and ovdiff's own dependencies (no weights, no network). Finishes in a few minutes:

    python bench/gpu.py [--out bench/results-gpu.json] [--images 64]

Measures, after building the models (each network's load time is recorded):
  * synth of one class: 32 images, 30 DPM-Solver++ steps (the default sampler), in batches of 8, with
    attribution capture on, and again off;
  * synth of two classes through the command's own code (pipeline.synthesize): seconds and stages per class
    (sampling, encode, decode, masks, features, prototypes), the second class being the steady state;
  * MaskCut alone on N images' worth of DINO-like keys at 60x60 patches (the masks stage without DINO);
  * with --load-from-files DIR: the random networks written to DIR as a model folder (float32 safetensors, the real
    files' layout, see bench/model_folder.py), then each network's loading from it: the path a user with the real
    weights takes (goal: the three networks in <= 10 s);
  * with --compile-unet, an experiment: sampling with the UNet's forward through torch.compile;
  * segment through the command's own code (pipeline.segment_files: JPEG files decoded, labels and overlays
    written): milliseconds per 512x512 image (steady state, and a process's first batch) with sd + dino + clip,
    windows of 448 and 336 plus the whole image (the paper's defaults), a VOC-sized vocabulary (20 classes of 130
    prototypes each, fg and bg), the CLIP pre-filter on; and the share of that time inside network forward passes.
Floors (H100, from FLOPs): synth 2.1 s per class, segment ~20 ms per image. Goals: synth <= 1.5x, segment <= 2x
the floor, forwards >= 85% of segment time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # draw_scenes: the drawn test scenes

from model_folder import time_folder_load, write_model_folder  # bench/ itself: sys.path[0] when run as a script

from ovdiff_cli import synthesis
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.extractors import build_extractor
from ovdiff_cli.filters import ClipPrefilter
from ovdiff_cli.models import resolve_models
from ovdiff_cli.models.loading import Models
from ovdiff_cli.segmentation import ExtractorSet, PrototypeSet, Segmenter, SegmentOptions
from ovdiff_cli.timing import Timings

FLOOR_SYNTH_S = 2.1
FLOOR_SEGMENT_MS = 20.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def sample_class(models: Models, capture: bool = True) -> None:
    """32 support images of one class, 30 steps, batches of 8: the sampling part of synth."""
    gen = models.get("sd")
    seeds = [synthesis.image_seed(42, "cat", i) for i in range(32)]
    for start in range(0, 32, 8):
        size = models.spec.image_size
        synthesis.generate(gen, "cat", seeds[start : start + 8], steps=30, image_size=size, capture=capture)


def bench_synth(models: Models) -> dict:
    sample_class(models)  # warm-up (cuDNN autotuning, allocator)
    on = min(sync_time(lambda: sample_class(models)) for _ in range(2))
    off = min(sync_time(lambda: sample_class(models, capture=False)) for _ in range(2))
    return {"capture_on_s": on, "capture_off_s": off, "ratio": on / off, "floor_s": FLOOR_SYNTH_S}


def bench_compiled_unet(models: Models) -> dict:
    """An experiment, not a code path of the commands (``--compile-unet``): sampling as bench_synth's capture-on
    run with the UNet's forward through ``torch.compile`` (static shapes), to decide whether synth should offer
    it. The first run includes the compilation: 397 s for the tiny set on a 2-core CPU (no faster after it), so
    give it a separate call on a GPU."""
    unet = models.get("sd").unet
    eager = unet.forward
    unet.forward = torch.compile(eager, dynamic=False)
    try:
        first = sync_time(lambda: sample_class(models))
        steady = min(sync_time(lambda: sample_class(models)) for _ in range(2))
    finally:
        unet.forward = eager
    return {"first_run_s": first, "capture_on_s": steady}


def bench_synth_command(models: Models, n: int, steps: int) -> dict:
    """``ovdiff synth``'s own code path (pipeline.synthesize, through a fresh cache) for two classes: the first pays
    the networks' loading, the second is the steady state. Per class: seconds and the stage breakdown."""
    import tempfile

    from ovdiff_cli import pipeline
    from ovdiff_cli.cache import Cache

    opts = pipeline.SynthOptions(n=n, steps=steps)
    out = {"n": n, "steps": steps, "masker": pipeline.effective_masker(opts, models)}
    with tempfile.TemporaryDirectory() as tmp, Cache(Path(tmp) / "cache") as cache:
        for label, name in (("first_class", "cat"), ("second_class", "dog")):
            (result,) = pipeline.synthesize([ClassSpec(name)], opts, models, cache)
            out[label] = {"seconds": result.seconds, "stages": result.stages}
    return out


def bench_maskcut(models: Models, n: int = 32) -> dict:
    """MaskCut alone on ``n`` support images' worth of DINO-like keys (60x60 patches, 768 channels: smooth random
    fields plus noise, so the eigen-solves have real work), through the masker ``synth`` uses."""
    from ovdiff_cli import masks

    side, dim = models.spec.maskcut_input // 8, 768
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 8, 6, 6, generator=gen)
    fields = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    feats = torch.einsum("nkhw,kd->nhwd", fields, 3 * torch.randn(8, dim, generator=gen))
    feats = (feats + torch.randn(n, side, side, dim, generator=gen)).to(models.device)
    attr = torch.zeros(n, models.spec.image_size, models.spec.image_size, device=models.device)
    masker = masks.build_masker("maskcut")
    masker.propose(attr[:1], feats[:1])  # warm-up
    seconds = sync_time(lambda: masker.propose(attr, feats))
    return {"images": n, "grid": side, "seconds": seconds, "batch": masks.MASKCUT_BATCH}


def random_protoset(models: Models, extractors: dict, classes: int = 20, per_class: int = 130) -> PrototypeSet:
    """A vocabulary of the paper's size with random unit prototypes (timing does not depend on their values)."""
    probe = torch.rand(1, 3, 64, 64, device=models.device)
    dims = {name: ext(probe).shape[-1] for name, ext in extractors.items()}
    half = per_class // 2  # fg and bg
    rows = sorted(
        [(c + 1, c + 1) for c in range(classes) for _ in range(half)]
        + [(0, c + 1) for c in range(classes) for _ in range(half)]
    )
    channel, source = (torch.tensor([r[j] for r in rows]) for j in (0, 1))
    sets = {
        name: ExtractorSet(
            torch.nn.functional.normalize(torch.randn(len(rows), d), dim=-1),
            channel,
            source,
            torch.arange(len(rows)),
            classes + 1,
        )
        for name, d in dims.items()
    }
    return PrototypeSet([ClassSpec(f"class {c}") for c in range(classes)], sets)


def bench_segment(models: Models, n_images: int) -> dict:
    """segment's own code path (pipeline.segment_files: decoding JPEG files, segmenting, writing labels and overlays)
    over ``n_images`` drawn 512x512 scenes: a new segmenter's first batch, then the steady state; and, for
    comparison with earlier results, the segmenter alone over the same images in memory (no decoding, no writing)."""
    import tempfile

    from draw_scenes import draw_scene

    from ovdiff_cli import outputs, pipeline
    from ovdiff_cli.inputs import find_images, load_image

    extractors = {name: build_extractor(name, models) for name in ("sd", "dino", "clip")}
    protoset = random_protoset(models, extractors)
    names = [c.name for c in protoset.classes]
    prefilter = ClipPrefilter(pipeline.prefilter_clip(models), names)
    timings = Timings(sync)
    match = models.dtype("match")
    segmenter = Segmenter(protoset, extractors, SegmentOptions(), prefilter, models.device, timings, False, match)
    legend = outputs.build_legend(names, [False] * len(names))
    # 512x512 inputs have one 448 window and four 336 ones: segment groups eight of them, so that every batch of 8
    # windows is full (groups of two, before, padded six of the 448 batch's eight slots).
    per_batch = segmenter.options.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(n_images + per_batch):
            draw_scene(512, 512, i).save(folder / f"scene_{i:03d}.jpg", quality=92)
        items = find_images([str(folder)])
        first = pipeline.segment_files(pipeline.plan_outputs(items[:per_batch], Path(tmp) / "first"), segmenter, legend)
        first_stages = dict(sorted(timings.seconds.items()))  # where the first batch's extra time goes
        timings.seconds.clear()
        run = pipeline.segment_files(pipeline.plan_outputs(items[per_batch:], Path(tmp) / "out"), segmenter, legend)
        shares = {k: v / run.seconds for k, v in sorted(timings.seconds.items())}
        images = [torch.from_numpy(load_image(item.path)).permute(2, 0, 1) for item in items[per_batch:]]

    def loop() -> None:
        for start in range(0, n_images, per_batch):
            for seg in segmenter(images[start : start + per_batch]):
                seg.labels()

    loop_seconds = sync_time(loop)
    # The same without the stage timers' device syncs (two per timed phase), to see what measuring costs.
    segmenter.timings = Timings()
    unsynced_seconds = sync_time(loop)
    forwards = shares.get("forward", 0.0) + shares.get("prefilter", 0.0)
    return {
        "images": run.done,
        "ms_per_image": 1000 * run.seconds / run.done,
        "forward_share": forwards,
        "shares": shares,
        "floor_ms": FLOOR_SEGMENT_MS,
        "first_batch_ms_per_image": 1000 * first.seconds / first.done,
        # The warm-up measure: what a process's first group costs beyond the same images in the steady state.
        "first_batch_extra_s": first.seconds - first.done * run.seconds / run.done,
        "first_batch_stages_s": first_stages,
        "loop_ms_per_image": 1000 * loop_seconds / n_images,
        "loop_unsynced_ms_per_image": 1000 * unsynced_seconds / n_images,
        "writes_in_background": pipeline.writes_in_background(segmenter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results-gpu.json"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--models",
        default="sd15-random",
        help="a model set or folder (a folder of saved weights times real loading); tiny + --device cpu: a smoke run",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto", help="auto, fast, fp32, bf16 or fp16 (see the README)")
    parser.add_argument("--n", type=int, default=32, help="support images per class for the synth command timing")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps for the synth command timing")
    parser.add_argument(
        "--load-from-files", type=Path, metavar="DIR", help="write the models to DIR as a folder and time loading it"
    )
    parser.add_argument(
        "--compile-unet", action="store_true", help="also time sampling with the UNet compiled (an experiment)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (or --models tiny --device cpu for a smoke run)")
    # No TF32 switch here: the bench runs with torch's defaults, as the commands do (matmuls in full float32).
    build = time.perf_counter()
    models = Models(resolve_models(args.models), torch.device(args.device), args.precision)
    for role in ("sd", "dino", "clip"):
        models.get(role)
    build = time.perf_counter() - build
    results = {
        "device": torch.cuda.get_device_name() if models.device.type == "cuda" else "cpu",
        "precision": models.precision,
        "dtype": {role: str(dtype) for role, dtype in models.dtypes.items()},
        "torch": torch.__version__,
        "build_models_s": build,
        "load_s": dict(models.load_seconds),  # per network: built (random sets) or read from its files
        "synth": bench_synth(models),
        "synth_command": bench_synth_command(models, args.n, args.steps),
        "maskcut": bench_maskcut(models, args.n),
        "segment": bench_segment(models, args.images),
    }
    if args.compile_unet:
        results["compiled_unet"] = bench_compiled_unet(models)
    s, g = results["synth"], results["segment"]
    s["vs_floor"] = s["capture_on_s"] / FLOOR_SYNTH_S
    g["vs_floor"] = g["ms_per_image"] / FLOOR_SEGMENT_MS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if the part below fails
    if args.load_from_files:
        device = models.device
        try:
            written = write_model_folder(models, args.load_from_files)
            del models  # the folder's copies take the random networks' place in memory
            loaded = time_folder_load(args.load_from_files, device, args.precision)
            results["load_from_files"] = {"write_s": written, "load_s": loaded, "total_s": sum(loaded.values())}
        except Exception as exc:  # a bench records what failed and still reports the rest
            results["load_from_files"] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['device']} (precision {results['precision']}), models built in {build:.1f} s")
    print("load: " + ", ".join(f"{role} {sec:.1f} s" for role, sec in results["load_s"].items()))
    print(f"synth 32x30 capture on  {s['capture_on_s']:.2f} s  ({s['vs_floor']:.2f}x floor; goal <= 1.5x)")
    print(f"synth 32x30 capture off {s['capture_off_s']:.2f} s  (on/off {s['ratio']:.3f}; goal <= 1.10)")
    sc = results["synth_command"]["second_class"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in sc["stages"].items() if k != "load")
    print(f"synth command, second class of a run: {sc['seconds']:.2f} s ({stages}; goal <= 6 s)")
    mc = results["maskcut"]
    grid = f"{mc['grid']}x{mc['grid']}"
    print(f"maskcut alone, {mc['images']} images of {grid} patches: {mc['seconds']:.2f} s (goal <= 0.5 s)")
    print(f"segment 512x512 {g['ms_per_image']:.1f} ms/image ({g['vs_floor']:.2f}x floor; goal <= 2x)")
    print(f"segment 512x512, the segmenter alone (no decoding, no writing) {g['loop_ms_per_image']:.1f} ms/image")
    print(f"  the same without the stage timers' syncs {g['loop_unsynced_ms_per_image']:.1f} ms/image")
    extra = g["first_batch_extra_s"]
    first = g["first_batch_ms_per_image"]
    print(f"segment first batch of a process {first:.0f} ms/image ({extra:.1f} s extra; goal <= 3 s)")
    print("  first batch (s): " + ", ".join(f"{k} {v:.2f}" for k, v in g["first_batch_stages_s"].items()))
    print(f"segment time in network forwards {g['forward_share']:.1%} (goal >= 85%)")
    print("shares: " + ", ".join(f"{k} {v:.1%}" for k, v in g["shares"].items()))
    if args.compile_unet:
        cu = results["compiled_unet"]
        print(f"synth 32x30 capture on, UNet compiled {cu['capture_on_s']:.2f} s (first run {cu['first_run_s']:.1f} s)")
    lf = results.get("load_from_files", {})
    if "error" in lf:
        print(f"loading from safetensors files failed: {lf['error']}")
    elif lf:
        each = ", ".join(f"{role} {sec:.2f} s" for role, sec in lf["load_s"].items())
        print(f"loading from safetensors files: {lf['total_s']:.1f} s ({each}; goal <= 10 s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
