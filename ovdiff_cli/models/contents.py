"""What a weight file holds, compared with what its network needs, before any work.

A file can be whole (its framing checks out: :func:`ovdiff_cli.models.registry.weight_files`) and still be the wrong
file: another network's weights under the right name, a state dict missing a tensor, random bytes. The loaders
would find out only when they run, after minutes of sampling, in a multi-line library error. Here the tensor names
and shapes a file holds (a safetensors header; a CutLER checkpoint read without unpickling code) are compared with
the ones its network expects, computed from the architecture on the meta device (no memory, no initialisation) and
passed through the same renaming the loader applies. A passed check is remembered by the files' content identity,
so it costs seconds once per file, and a run whose results are all cached still loads nothing.

This module imports nothing heavy at import time; the libraries are imported only when a check runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from .registry import (
    ROLE_FILES,
    ROLE_TITLES,
    Component,
    ModelUnavailable,
    _digest_memo,
    _files_digest,
    safetensors_header,
)

Shapes = dict[str, tuple[int, ...]]

# Bump when the comparison changes, so files passed by an older check are checked again.
_CHECK_VERSION = 1
# The libraries whose loaders decide what each role's files must hold (their versions are part of a passed check).
_ROLE_PACKAGES = {
    "sd": ("diffusers", "transformers"),
    "dino": ("timm",),
    "clip": ("open_clip_torch",),
    "cutler": ("torch",),
}
# Files passed in this process (the persistent memo may not be writable).
_PASSED: set[str] = set()


class WeightsWrong(ModelUnavailable):
    """Weight files that are whole but not what the network needs: another format, or other tensors."""


class _Problem(Exception):
    """The first thing wrong with one file: ``state`` completes "FILE ..." ("has no tensor 'x' (3, 4)")."""

    def __init__(self, path: Path, state: str) -> None:
        super().__init__(state)
        self.path, self.state = path, state


def check_contents(comp: Component, root: Path, files: list[Path]) -> tuple[Path, str] | None:
    """The first file of ``comp`` (found at ``root``: a folder, or a CutLER checkpoint file) whose contents are not
    what its network needs, with what is wrong ("has no tensor 'visual.conv1.weight' (768, 3, 16, 16): ..."); None
    when every file fits. ``files`` are its weight files, already checked present and whole.

    Raises ModelUnavailable when the network to compare with cannot be built for a reason no file explains (an
    unknown architecture name).
    """
    key = _memo_key(comp, root, files)
    if key in _PASSED or _digest_memo().get(key) == "ok":
        return None
    try:
        for path in files:
            if path.suffix == ".json":
                _json(path)
        _CHECKS[comp.role](comp, root)
    except _Problem as problem:
        return problem.path, problem.state
    _remember(key)
    return None


def _memo_key(comp: Component, root: Path, files: list[Path]) -> str:
    """What a passed check depends on: the files' contents, the architecture and the loaders' versions."""
    versions = ",".join(f"{p}={_version(p)}" for p in _ROLE_PACKAGES[comp.role])
    digest = _files_digest(root.parent if root.is_file() else root, files)
    return f"contents-v{_CHECK_VERSION}\0{comp.role}\0{comp.library}\0{comp.arch}\0{versions}\0{digest}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _remember(key: str) -> None:
    from .registry import _save_digest_memo

    _PASSED.add(key)
    memo = _digest_memo()
    memo[key] = "ok"
    _save_digest_memo(memo)


# --- what a file holds ----------------------------------------------------------------------------------------------


def _safetensors_shapes(path: Path) -> Shapes:
    """Tensor name -> shape from a safetensors file's header (:func:`registry.safetensors_header`), no data read.

    Raises _Problem "is not a safetensors file (...)" for anything without a readable header.
    """
    try:
        header, _ = safetensors_header(path)
        return {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except ValueError as exc:
        raise _Problem(path, str(exc)) from None
    except (TypeError, KeyError, AttributeError):
        raise _Problem(path, "is not a safetensors file (its header is not a table of tensors)") from None


def _meta_tensors(shapes: Shapes) -> dict[str, Any]:
    """Stand-ins for a file's tensors, for a loader's key conversion to run on: meta tensors of the file's shapes
    (float32: the conversions look at names and shapes only)."""
    import torch

    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Problem(path, f"is not a JSON file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --- the comparison -------------------------------------------------------------------------------------------------


def _compare(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any], *, unexpected: bool = True) -> None:
    """Raise _Problem for the first tensor the network needs that ``found`` lacks, then (when ``unexpected``: the
    loader is strict) the first it has no place for, then the first of another shape. Values are tensors or shapes.
    """
    found, expected = _shapes(found), _shapes(expected)
    for name, shape in expected.items():
        if name not in found:
            raise _Problem(path, f"has no tensor {name!r} {shape}: {_holds(found, expected)}")
    if unexpected:
        for name in found:
            if name not in expected:
                raise _Problem(path, f"holds a tensor {name!r} the network has no place for")
    for name, shape in expected.items():
        if found[name] != shape:
            raise _Problem(path, f"holds tensor {name!r} of shape {found[name]} where the network needs {shape}")


def _shapes(tensors: Mapping[str, Any]) -> Shapes:
    return {name: tuple(getattr(value, "shape", value)) for name, value in tensors.items()}


def _holds(found: Shapes, expected: Shapes) -> str:
    """What the file holds instead, to recognise it by: how much of the network, or its top-level names (fewest
    dots first: 'cls_token', 'pos_embed' say more about a network than 'blocks.0.attn.proj.bias')."""
    shared = sum(name in expected for name in found)
    if shared:
        return f"it holds {shared} of the network's {len(expected)}"
    if not found:
        return "it holds no tensors"
    top = sorted(found, key=lambda name: name.count("."))
    names = ", ".join(repr(name) for name in top[:3]) + (", ..." if len(top) > 3 else "")
    return f"none of the {len(found)} it holds is the network's ({names})"


def _converted(path: Path, convert: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """``convert()``: a library's own checkpoint conversion run on the file's stand-in tensors; a failure is the
    file's (it would fail the load the same way)."""
    try:
        return convert()
    except Exception as exc:  # the libraries' conversions raise anything for a state dict they do not recognise
        raise _Problem(path, f"cannot be converted for {what} ({_first_line(exc)})") from None


def _built(config: Path | None, build: Callable[[], Any], what: str) -> Any:
    """``build()`` on the meta device; a failure is ``config``'s when a config file describes the network, else the
    component's own (an architecture name the library does not know)."""
    from ..meta import without_init

    try:
        return without_init(build)
    except Exception as exc:  # constructors raise anything for a config they do not accept
        if config is None:
            raise ModelUnavailable(
                f"{what}: cannot build the network to check its weights ({_first_line(exc)})"
            ) from None
        raise _Problem(config, f"describes no network the loader can build ({_first_line(exc)})") from None


# --- each role's network --------------------------------------------------------------------------------------------


def _check_sd(comp: Component, root: Path) -> None:
    """Each SD part's safetensors against the part diffusers or transformers builds from its config.json, after the
    renaming its loader does. Unexpected tensors are allowed, as both loaders skip them (SD 1.5's text encoder holds
    a position_ids buffer that newer transformers no longer keeps); a missing one would be left empty or random."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders = {
        "unet": lambda folder: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder)),
        "vae": lambda folder: AutoencoderKL.from_config(AutoencoderKL.load_config(folder)),
        "text_encoder": lambda folder: CLIPTextModel(CLIPTextConfig.from_pretrained(folder)),
    }
    for rel in ROLE_FILES["sd"]:
        weights = root / rel
        part = weights.parent.name
        if weights.suffix != ".safetensors":
            continue
        model = _built(weights.parent / "config.json", partial(builders[part], weights.parent), part)
        found = _meta_tensors(_safetensors_shapes(weights))
        if part == "text_encoder" and not any(name.startswith("text_model.") for name in model.state_dict()):
            # Checkpoints name CLIPTextModel's tensors text_model.*; transformers 5 models drop that prefix (its
            # conversion mapping strips it at load), 4.x models keep it.
            found = {name.removeprefix("text_model."): value for name, value in found.items()}
        if hasattr(model, "_fix_state_dict_keys_on_load"):
            model._fix_state_dict_keys_on_load(found)  # diffusers' renaming of deprecated attention names
        _compare(weights, found, model.state_dict(), unexpected=False)


def _check_dino(comp: Component, root: Path) -> None:
    """The safetensors through timm's checkpoint filter, as load_dino reads it, against timm's ViT (strict)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights = root / ROLE_FILES["dino"][1]
    model = _built(
        None,
        lambda: timm.create_model(comp.arch, pretrained=False, num_classes=0, dynamic_img_size=True),
        ROLE_TITLES["dino"],
    )
    found = _meta_tensors(_safetensors_shapes(weights))
    _compare(weights, _converted(weights, lambda: checkpoint_filter_fn(found, model), "timm"), model.state_dict())


def _check_clip(comp: Component, root: Path) -> None:
    """The safetensors through open_clip's own load_checkpoint (its format conversions and resizing), as load_clip
    reads it, against the CLIP its open_clip_config.json describes (strict)."""
    from unittest import mock

    import open_clip

    config_name, weights_name = ROLE_FILES["clip"]
    config, weights = root / config_name, root / weights_name
    cfg = _json(config)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise _Problem(config, "is not an open_clip config (no 'model_cfg' table)")
    cfg = dict(cfg["model_cfg"])
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP  # as load_clip picks it
    model = _built(config, lambda: cls(**cfg), "open_clip")
    found = _meta_tensors(_safetensors_shapes(weights))
    consumed: dict[str, Any] = {}

    def convert() -> dict[str, Any]:
        # load_checkpoint reads the file with safetensors' load_file and ends in model.load_state_dict: give it the
        # stand-ins and record what it would load.
        model.load_state_dict = lambda state, **kwargs: consumed.update(state)
        with mock.patch("safetensors.torch.load_file", lambda *args, **kwargs: dict(found)):
            open_clip.load_checkpoint(model, str(weights), strict=True)
        return consumed

    _compare(weights, _converted(weights, convert, "open_clip"), model.state_dict())


def _check_cutler(comp: Component, root: Path) -> None:
    """The checkpoint read as load_cutler reads it (never unpickling code) and mapped onto the full-size detector."""
    from ..cutler.checkpoint import CheckpointError, map_state_dict, read_checkpoint
    from ..cutler.configs import FULL
    from ..cutler.model import CutlerDetector

    try:
        state = read_checkpoint(root)
    except CheckpointError as exc:
        raise _Problem(root, f"is not a CutLER checkpoint: {str(exc).removeprefix(f'{root}: ')}") from None
    model = _built(None, lambda: CutlerDetector(FULL), ROLE_TITLES["cutler"])
    try:
        map_state_dict(model, state)
    except CheckpointError as exc:
        raise _Problem(root, f"does not fit the CutLER detector ({exc})") from None


_CHECKS: dict[str, Callable[[Component, Path], None]] = {
    "sd": _check_sd,
    "dino": _check_dino,
    "clip": _check_clip,
    "cutler": _check_cutler,
}
