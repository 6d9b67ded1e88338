"""Reading CutLER's detectron2 checkpoint (``cutler_cascade_final.pth``) and converting it to safetensors.

A detectron2 ``.pth`` is ``torch.save({"model": state_dict, ...})``; it is read with ``torch.load(weights_only=True)``
(plus numpy's array constructors, for checkpoints that hold numpy arrays), which never runs pickled code. Our module
tree reproduces detectron2's names, so the name table is the identity on every key that is not in one of the
ignored families below; :func:`map_state_dict` checks names and shapes key by key. :func:`convert` writes the
mapped weights as safetensors, which later loads read without pickle.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..meta import without_init
from ..models.registry import hash_file
from .configs import FULL, CutlerConfig
from .model import CutlerDetector


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the detector; the message is one line."""


# Every key of a detectron2 GeneralizedRCNN state dict lives under one of these modules.
_D2_ROOTS = ("backbone.", "proposal_generator.", "roi_heads.")
# detectron2 key families the detector does not load, each with the reason.
_IGNORED = (
    # BatchNorm's update counter: only training (momentum=None) reads it; frozen BatchNorm has none.
    re.compile(r"\.num_batches_tracked$"),
    # Cell anchors: rebuilt from the config; detectron2 before v0.4 saved them in the state dict.
    re.compile(r"^proposal_generator\.anchor_generator\.cell_anchors\.\d+$"),
)
# Normalisation constants: older detectron2 saved them; they are checked against the config instead of loaded.
_PIXEL_STATS = ("pixel_mean", "pixel_std")
# A BatchNorm's running statistics are buffers in detectron2 too; everything else in its state dict is a parameter.
_BUFFER_SUFFIXES = (".running_mean", ".running_var")
_FORMAT = "ovdiff-cutler-v1"
# numpy's array constructors (pure data), under numpy 2's and numpy 1's module names.
_NUMPY_GLOBALS = [
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *[type(np.dtype(code)) for code in "?bBhHiIlLqQefd"],
]


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a detectron2 ``.pth`` (its ``model`` entry) or of our ``.safetensors`` file.

    Values become CPU tensors (numpy arrays are converted). Raises :class:`CheckpointError` for a missing,
    truncated or foreign file, and for a pickle that ``weights_only`` loading refuses.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a checkpoint file (.pth or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception:  # safetensors raises its own error types; any of them means "not readable"
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another format)") from None
    # torch.save writes a zip archive (detectron2's checkpointer included); anything else, a truncated archive
    # included, would reach torch's legacy pickle reader and fail with a misleading "weights only" message.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint (no zip archive: truncated, or another format)")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...: a refused or damaged file
        if type(exc).__name__ == "UnpicklingError":  # weights_only refused a global: we never unpickle code
            refused = re.search(r"(?:GLOBAL |<class ')([\w.]+)", str(exc))
            what = f"it pickles {refused.group(1)}" if refused else "it pickles more than tensors"
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refuses it ({what}); if you trust the file, keep only its"
                " weights: re-save its 'model' entry alone with torch.save, then pass that file"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, truncated or damaged ({_first_line(exc)})"
        ) from None
    return _state_dict_of(blob, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _state_dict_of(blob: object, path: Path) -> dict[str, Tensor]:
    """The ``model`` entry of a detectron2 checkpoint, or the blob itself if it is already a flat state dict."""
    state = blob.get("model", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: holds no state dict (expected a dict with a 'model' entry of tensors)")
    tensors = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {name!r} of its state dict is a {type(value).__name__}, not a tensor")
        tensors[name] = value
    return tensors


def map_state_dict(model: CutlerDetector, d2_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """detectron2 names and tensors onto ``model``'s state-dict names, in the model's order.

    Strips a ``module.`` prefix (a DistributedDataParallel wrapper), checks ``pixel_mean``/``pixel_std`` against the
    config when present, drops the ignored families, then requires exactly the model's keys with its shapes. Raises
    :class:`CheckpointError` naming the first missing key, unexpected key or shape mismatch (in that order).
    """
    state = dict(d2_state)
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): value for name, value in state.items()}
    if not any(name.startswith(_D2_ROOTS) for name in state):
        first = next(iter(state), "<none>")
        raise CheckpointError(
            f"not a detectron2 R-CNN checkpoint: none of its {len(state)} keys is under backbone., proposal_generator."
            f" or roi_heads. (first: {first})"
        )
    for name in _PIXEL_STATS:
        if name in state:
            expected = torch.tensor(getattr(model.config, name))
            found = state.pop(name).flatten().float()
            if found.shape != expected.shape or not torch.allclose(found, expected, atol=1e-3):
                raise CheckpointError(
                    f"{name} in the checkpoint is {found.tolist()}, but config {model.config.name!r} uses"
                    f" {expected.tolist()}"
                )
    state = {name: value for name, value in state.items() if not any(rule.search(name) for rule in _IGNORED)}
    targets = model.state_dict()
    for name in targets:
        if name not in state:
            raise CheckpointError(f"missing key {name}")
    for name in state:
        if name not in targets:
            raise CheckpointError(f"unexpected key {name}")
    for name, target in targets.items():
        if state[name].shape != target.shape:
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint {tuple(state[name].shape)}, model {tuple(target.shape)}"
            )
    return {name: state[name] for name in targets}


@dataclass(frozen=True)
class MappingReport:
    """What :func:`map_state_dict` loaded: counts and the first and last detectron2 names, in checkpoint order."""

    keys_mapped: int
    keys_ignored: int
    parameters: int  # elements of detectron2's nn.Parameters (BatchNorm running statistics excluded)
    elements: int  # elements of every mapped tensor
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.keys_mapped} keys mapped ({self.keys_ignored} ignored), {self.parameters:,} parameters, "
            f"{self.elements:,} elements; first {', '.join(self.first_names)}; last {', '.join(self.last_names)}"
        )


def mapping_report(model: CutlerDetector, d2_state: Mapping[str, Tensor], ends: int = 5) -> MappingReport:
    """Map ``d2_state`` onto ``model`` (raising as :func:`map_state_dict` does) and count what was loaded."""
    return _report(d2_state, map_state_dict(model, d2_state), ends)


def _report(d2_state: Mapping[str, Tensor], mapped: Mapping[str, Tensor], ends: int = 5) -> MappingReport:
    names = [name.removeprefix("module.") for name in d2_state]
    loaded = [name for name in names if name in mapped]
    return MappingReport(
        keys_mapped=len(mapped),
        keys_ignored=len(names) - len(mapped),
        parameters=sum(value.numel() for name, value in mapped.items() if not name.endswith(_BUFFER_SUFFIXES)),
        elements=sum(value.numel() for value in mapped.values()),
        first_names=tuple(loaded[:ends]),
        last_names=tuple(loaded[-ends:]),
    )


def load_cutler(
    path: str | Path,
    config: CutlerConfig = FULL,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CutlerDetector:
    """A detector in eval mode on ``device``/``dtype`` with the weights of a ``.pth`` or converted ``.safetensors``,
    built without initialising the parameters the checkpoint replaces (see meta.without_init)."""
    model = without_init(lambda: CutlerDetector(config))
    model.load_state_dict(map_state_dict(model, read_checkpoint(path)), assign=True)
    return model.to(device=device, dtype=dtype).eval()


def convert(path_in: str | Path, path_out: str | Path, config: CutlerConfig = FULL) -> MappingReport:
    """Write the mapped weights of ``path_in`` as safetensors at ``path_out``; return what was mapped.

    The metadata names the format, the config and the source file with its sha256. Reading ``path_in`` never
    unpickles code (see :func:`read_checkpoint`); later loads of the safetensors file need no pickle at all.
    """
    from safetensors.torch import save_file

    path_in, path_out = Path(path_in), Path(path_out)
    state = read_checkpoint(path_in)
    mapped = map_state_dict(without_init(lambda: CutlerDetector(config)), state)  # only the names and shapes
    metadata = {"format": _FORMAT, "config": config.name, "source": path_in.name, "source_sha256": hash_file(path_in)}
    save_file({name: value.contiguous() for name, value in mapped.items()}, path_out, metadata=metadata)
    return _report(state, mapped)
