"""Issue 24 (real weights, part 3), items 1-3 and 8a: every weight file is checked whole and right, by its tensor names
and shapes against its network's, before any work; `models list` says `wrong: ...` for a file that is not."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from real_format import cutler_checkpoint, cutler_shapes, sparse_safetensors
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ovdiff_cli import pipeline
from ovdiff_cli.cli import app
from ovdiff_cli.models import contents, resolve_models
from ovdiff_cli.models.contents import WeightsWrong
from ovdiff_cli.models.registry import Component, presence, weight_files
from ovdiff_cli.models.sd15 import CLIP_REVISION
from ovdiff_cli.models.tiny import TINY_CLIP, TINY_DINO

SYNTH = ["synth", "cat", "--n", "1", "--steps", "1", "--k", "2", "-q"]


def _random_bytes(n: int) -> bytes:
    return random.Random(0).randbytes(n)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _clip_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """open_clip's two files for the tiny CLIP's config, holding ``tensors``."""
    _save(tensors, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return folder


def _dino_state() -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=0, **TINY_DINO).state_dict()


def _sd_folder(folder: Path) -> Path:
    """A diffusers folder (configs and safetensors, as save_pretrained writes them) of the tiny set's SD."""
    from ovdiff_cli.models.loading import _build_random_generator
    from ovdiff_cli.models.registry import ROLE_FILES

    unet, vae, text, scheduler = _build_random_generator(resolve_models("tiny").components["sd"])
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(folder / part)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert all((folder / rel).is_file() for rel in ROLE_FILES["sd"])
    return folder


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if any command gets as far as generating or synthesising anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the weights were checked")

    for user in (pipeline.synth, pipeline.segment):  # synth, and segment, explain and eval through build_segmenter
        monkeypatch.setattr(user, "synthesize", refuse)


def _refused(args: list[str], tmp_path: Path) -> list[str]:
    """Run a command expected to stop before any work: exit 2, nothing cached; its output lines."""
    cache = tmp_path / "run-cache"
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert not cache.exists()  # opened only after the check: nothing generated, nothing cached
    return result.output.strip().splitlines()


def _models_list_status(set_name: str, network: str) -> str:
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    return next(r[-1] for r in rows if r[:2] == [set_name, network])


# --- item 1: a garbage CutLER checkpoint ----------------------------------------------------------------------------


def test_a_garbage_cutler_checkpoint_is_refused_before_any_image_and_listed_wrong(tmp_path, no_generation):
    ckpt = tmp_path / "cutler.pth"
    ckpt.write_bytes(_random_bytes(50 << 10))
    why = "is not a CutLER checkpoint: not a torch checkpoint (no zip archive: truncated, or another format)"
    lines = _refused([*SYNTH, "--models", f"tiny,cutler={ckpt}"], tmp_path)
    # A user's own file: never "fetch it again", which would not replace it.
    assert lines == [
        f"error: CutLER detector: weight file {ckpt} {why}: pass a correct file with --models NAME,cutler=PATH"
    ]
    # The same file where `ovdiff models fetch sd15` puts it: listed as wrong, not present.
    fetched = tmp_path / "weights" / "cutler" / "cutler_cascade_final.pth"
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(ckpt.read_bytes())
    assert _models_list_status("sd15", "CutLER detector") == f"wrong: {fetched} {why}"
    with pytest.raises(WeightsWrong, match="fetch it again with `ovdiff models fetch sd15`, or pass a correct file"):
        weight_files(resolve_models("sd15").components["cutler"], contents=True)


def test_a_cutler_checkpoint_is_checked_against_the_full_detector(tmp_path):
    good = cutler_checkpoint(tmp_path / "good.safetensors")
    assert presence(resolve_models(f"tiny,cutler={good}").components["cutler"]) == "present"
    shapes = cutler_shapes()
    del shapes["roi_heads.box_head.0.fc2.bias"]
    short = sparse_safetensors(tmp_path / "short.safetensors", shapes)
    assert presence(resolve_models(f"tiny,cutler={short}").components["cutler"]) == (
        f"wrong: {short} does not fit the CutLER detector (missing key roi_heads.box_head.0.fc2.bias)"
    )


# --- item 2: another network's tensors under the right file name --------------------------------------------------


def test_a_clip_file_holding_dino_s_tensors_is_named_before_any_work(tmp_path, no_generation, monkeypatch):
    dino = _dino_state()
    folder = _clip_folder(tmp_path / "clip", dino)
    top = "'cls_token', 'pos_embed', 'norm.bias'"
    state = (
        f"open_clip_model.safetensors has no tensor 'positional_embedding' (77, 32): none of the {len(dino)} it holds"
        f" is the network's ({top}, ...) in {folder}"
    )
    assert presence(resolve_models(f"tiny,clip={folder}").components["clip"]) == f"wrong: {state}"
    lines = _refused([*SYNTH, "--models", f"tiny,clip={folder}", "--extractors", "clip"], tmp_path)
    assert lines == [f"error: CLIP ViT: weight file {state}: pass a correct folder with --models NAME,clip=PATH"]
    # In the hub cache, where `models list` looks: wrong, not present.
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read once, at its import
    snap = hub / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / CLIP_REVISION
    _clip_folder(snap, dino)
    assert _models_list_status("sd15", "CLIP ViT") == f"wrong: {state.replace(str(folder), str(snap))}"


def test_clip_and_dino_files_are_read_as_their_loaders_convert_them(tmp_path):
    """The comparison runs the loaders' own conversions: timm resamples a DINO pos_embed of another grid, so that
    file fits; a tensor of another shape that no conversion touches does not, and is named with both shapes."""
    import timm

    from ovdiff_cli.meta import without_init

    arch = "vit_small_patch16_224.dino"
    shapes = {
        n: tuple(t.shape) for n, t in without_init(lambda: timm.create_model(arch, num_classes=0)).state_dict().items()
    }
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    dino = Component("dino", "timm", arch, local=str(folder))
    sparse_safetensors(folder / "model.safetensors", {**shapes, "pos_embed": (1, 1 + 7 * 7, 384)})
    assert presence(dino) == "present"
    sparse_safetensors(folder / "model.safetensors", {**shapes, "blocks.3.mlp.fc1.bias": (1000,)})
    assert presence(dino) == (
        f"wrong: model.safetensors holds tensor 'blocks.3.mlp.fc1.bias' of shape (1000,) where the network needs"
        f" (1536,) in {folder}"
    )
    sparse_safetensors(folder / "model.safetensors", {**shapes, "head.weight": (10, 384)})
    assert (
        presence(dino)
        == f"wrong: model.safetensors holds a tensor 'head.weight' the network has no place for in {folder}"
    )


# --- item 3: an SD file without one of its tensors ---------------------------------------------------------------


def test_an_sd_folder_missing_a_unet_tensor_is_named_before_any_work(tmp_path, no_generation):
    folder = _sd_folder(tmp_path / "sd")
    comp = resolve_models(f"tiny,sd={folder}").components["sd"]
    assert presence(comp) == "present"
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet)
    total = len(tensors)
    del tensors["mid_block.attentions.0.proj_out.weight"]
    _save(tensors, unet)
    state = (
        "unet/diffusion_pytorch_model.safetensors has no tensor 'mid_block.attentions.0.proj_out.weight'"
        f" (64, 64, 1, 1): it holds {total - 1} of the network's {total} in {folder}"
    )
    assert presence(comp) == f"wrong: {state}"
    lines = _refused([*SYNTH, "--models", f"tiny,sd={folder}"], tmp_path)
    assert lines == [f"error: Stable Diffusion: weight file {state}: pass a correct folder with --models NAME,sd=PATH"]


def test_sd_files_named_as_released_pass(tmp_path):
    """SD 1.5's text encoder names its tensors text_model.* and holds a position_ids buffer: transformers loads it
    (renaming, skipping the buffer), so the check does too."""
    folder = _sd_folder(tmp_path / "sd")
    text = folder / "text_encoder" / "model.safetensors"
    tensors = {"text_model." + k.removeprefix("text_model."): v for k, v in load_file(text).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    _save(tensors, text)
    assert presence(resolve_models(f"tiny,sd={folder}").components["sd"]) == "present"


# --- a passed check is remembered by content ---------------------------------------------------------------------


def test_a_passed_check_is_remembered_by_the_files_content(tmp_path, monkeypatch):
    folder = _clip_folder(tmp_path / "clip", _tiny_clip_state())
    comp = resolve_models(f"tiny,clip={folder}").components["clip"]
    monkeypatch.setattr(contents, "_PASSED", set())  # this process may have passed the same bytes in another test
    assert presence(comp) == "present"
    calls = []
    monkeypatch.setitem(contents._CHECKS, "clip", lambda comp, root: calls.append(root))
    monkeypatch.setattr(contents, "_PASSED", set())  # a new process: only the memo in the weights folder is left
    assert presence(comp) == "present" and calls == []
    _clip_folder(folder, {**_tiny_clip_state(), "logit_scale": torch.ones(())})  # other bytes: checked again
    assert presence(comp) == "present" and calls == [folder]


def _tiny_clip_state() -> dict[str, torch.Tensor]:
    from ovdiff_cli.models.loading import load_clip

    return load_clip(resolve_models("tiny").components["clip"], torch.device("cpu"), torch.float32).state_dict()


# --- item 8a: random bytes are not "truncated" -------------------------------------------------------------------


def test_random_bytes_in_a_safetensors_file_are_called_what_they_are(tmp_path):
    folder = _clip_folder(tmp_path / "clip", {})
    (folder / "open_clip_model.safetensors").write_bytes(_random_bytes(50 << 10))
    comp = resolve_models(f"tiny,clip={folder}").components["clip"]
    state = "is not a safetensors file (no JSON header after its first 8 bytes: another format?)"
    with pytest.raises(WeightsWrong) as info:
        weight_files(comp)  # found from the framing alone, as hashing sees it
    assert str(info.value) == (
        f"CLIP ViT: weight file open_clip_model.safetensors {state} in {folder}: pass a correct folder with"
        " --models NAME,clip=PATH"
    )
    assert presence(comp) == f"wrong: open_clip_model.safetensors {state} in {folder}"
