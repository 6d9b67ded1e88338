"""Write a full-size random-weight model set (``sd15-random``) as a model folder, the layout ``--models PATH`` reads
(sd/ in diffusers' layout, dino/ and clip/ as their hub snapshots hold them), with float32 safetensors like the
real sd15 files. Loading that folder runs the code path a user with the real weights runs, so its time is the
loading time of the real files (the weights' values do not matter to it).

    python bench/model_folder.py OUT [--models sd15-random]

bench/gpu.py's ``--load-from-files DIR`` writes one with :func:`write_model_folder` and times loading it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ovdiff_cli.models import resolve_models
from ovdiff_cli.models.loading import Models
from ovdiff_cli.models.registry import ROLE_FILES


def _save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def write_model_folder(models: Models, folder: Path) -> float:
    """Write ``models``' SD, DINO and CLIP (a random-weight set with the sd15 architectures) into ``folder``;
    return the seconds it took. Raises ValueError for a set whose architectures are not sd15's."""
    if models.spec.components["dino"].config.get("patch_size") != 8 or models.spec.image_size != 512:
        raise ValueError(f"--models {models.spec.name}: only a set with sd15's architectures loads as a folder")
    t0 = time.perf_counter()
    gen = models.get("sd")
    sd = folder / "sd"
    for name, module in (("unet", gen.unet), ("vae", gen.vae)):
        module.save_config(sd / name)
        _save(module, sd / name / "diffusion_pytorch_model.safetensors")
    gen.text_encoder.config.save_pretrained(sd / "text_encoder")
    _save(gen.text_encoder, sd / "text_encoder" / "model.safetensors")
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "PNDMScheduler", **gen.scheduler_config}
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (sd / "model_index.json").write_text(json.dumps(index, indent=2))
    dino = folder / "dino"
    _save(models.get("dino"), dino / ROLE_FILES["dino"][1])
    (dino / "config.json").write_text(json.dumps({"architecture": "vit_base_patch8_224", "num_classes": 0}))
    clip = folder / "clip"
    _save(models.get("clip"), clip / ROLE_FILES["clip"][1])
    (clip / ROLE_FILES["clip"][0]).write_text(json.dumps({"model_cfg": models.spec.components["clip"].config}))
    return time.perf_counter() - t0


def time_folder_load(folder: Path, device: torch.device, precision: str = "auto") -> dict[str, float]:
    """Seconds to load each network from ``folder`` (sd, dino, clip), as a command does on first use."""
    models = Models(resolve_models(str(folder)), device, precision)
    models.hashes  # noqa: B018  (the weight files' digests, computed once per file and remembered, not timed)
    for role in ("sd", "dino", "clip"):
        models.get(role)
    return dict(models.load_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default="sd15-random")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    seconds = write_model_folder(Models(resolve_models(args.models), torch.device(args.device), "fp32"), args.out)
    print(f"wrote {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
