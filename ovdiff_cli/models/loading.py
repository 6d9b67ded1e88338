"""Build the networks of a model set: from the hub cache, a local folder, or (tiny) from configs in-process.

Heavy imports live here and are only paid by commands that run models.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch

from ..meta import without_init
from .registry import (
    ROLE_FILES,
    ROLE_TITLES,
    Component,
    ModelSetSpec,
    ModelUnavailable,
    WeightsMissing,
    _fetch_hint,
    clip_activation,
    component_hash,
    local_snapshot,
    weight_files,
)

CONTEXT_LENGTH = 77
log = logging.getLogger("ovdiff")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu. An unavailable explicit choice raises ValueError.

    Under torchrun (LOCAL_RANK set), ``auto`` picks this process's own GPU, so ranks do not share one.
    """
    if name == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK", "")
            if local.isdigit():
                return torch.device(f"cuda:{int(local) % torch.cuda.device_count()}")
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in {"cpu", "cuda", "mps"} and not name.startswith("cuda:"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    return torch.device(name)


def set_threads(threads: int | None = None) -> int:
    """Set the threads torch's CPU kernels use and return how many: ``threads``, else ``$OVDIFF_THREADS``, else the
    cores this process may run on (its affinity mask, which taskset, cgroups and schedulers narrow), not every core
    of the machine. Raises ValueError naming a bad value.

    OpenMP's threads wait passively (OMP_WAIT_POLICY=PASSIVE, set by the CLI before torch loads): spinning threads
    on a machine where another process holds a core made runs ten times slower.
    """
    value: int | str | None = threads if threads is not None else os.environ.get("OVDIFF_THREADS")
    if value is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        source = "--threads" if threads is not None else "OVDIFF_THREADS"
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{source} {value!r}: expected a whole number of threads, at least 1")
    torch.set_num_threads(count)
    return count


def default_dtype(device: torch.device) -> torch.dtype:
    """The fast half precision of ``--precision fast``: bf16 on CUDA GPUs that support it (fp16's range can
    overflow in the VAE and attention), else fp16 on CUDA; fp32 elsewhere, where half-precision kernels are slow or
    missing."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP32_ROLES = ("sd", "clip", "prefilter", "dino", "cutler", "match")


def resolve_precision(precision: str, device: torch.device) -> dict[str, torch.dtype]:
    """``--precision`` -> the dtype each computation runs in (role -> dtype).

    Roles are the networks ("sd", "clip" for dense CLIP features, "dino", "cutler"), "prefilter" (the CLIP
    pre-filter, the same network as "clip") and "match" (the feature-prototype similarity matmul).

    ``auto`` is fp32 off CUDA; on CUDA it is the reference's numerics (REFERENCE 1, 4, 6): SD and the pre-filter in
    fp16, dense CLIP, DINO, CutLER and matching in fp32. ``fast`` (faster, not the reference's bits) runs SD and
    every CLIP in bf16 (fp16 where unsupported) and matches in fp16 on CUDA. ``fp32`` is fp32 everywhere; ``bf16`` and
    ``fp16`` apply to every network, with fp16 matching on CUDA. CutLER's box and mask math stays fp32 whatever
    the precision: its ROIAlign has no bf16 kernel, and proposals decide which support pixels become prototypes
    at all. Raises ValueError naming the accepted values.
    """
    from ..defaults import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    out = dict.fromkeys(_FP32_ROLES, torch.float32)
    if device.type != "cuda":
        if precision in _PRECISIONS:  # an explicit choice applies off CUDA too (matching stays fp32)
            out |= dict.fromkeys(("sd", "clip", "prefilter", "dino"), _PRECISIONS[precision])
        return out
    if precision == "auto":
        return out | {"sd": torch.float16, "prefilter": torch.float16}
    half = default_dtype(device) if precision == "fast" else _PRECISIONS[precision]
    networks = ("sd", "clip", "prefilter") if precision == "fast" else ("sd", "clip", "prefilter", "dino")
    return out | dict.fromkeys(networks, half) | {"match": torch.float32 if half == torch.float32 else torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (for cache keys and reports)."""
    return {v: k for k, v in _PRECISIONS.items()}[dtype]


class PromptTokenizer:
    """CLIP BPE tokenisation with Stable Diffusion's conventions, from open_clip's shipped vocabulary.

    SD 1.5's tokenizer is this same OpenAI CLIP BPE vocabulary; we pad with end-of-text as SD does.
    """

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer()
        self.sot = self._tok.encoder["<start_of_text>"]
        self.eot = self._tok.encoder["<end_of_text>"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        return self._tok.encode(text)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, 77) int64 ids: start, tokens (truncated to fit), end, end-padding."""
        out = torch.full((len(texts), CONTEXT_LENGTH), self.eot, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)[: CONTEXT_LENGTH - 2], self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@dataclass
class Generator:
    """Stable Diffusion's parts, loaded once per process."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: PromptTokenizer
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(B, 77, D) text-encoder hidden states in the model dtype."""
        ids = self.tokenizer(texts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run constructors under a fixed RNG state without disturbing the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_random_generator(comp: Component) -> tuple[Any, Any, Any, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = comp.config
    with _seeded(comp.init_seed):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    return unet, vae, text, dict(cfg["scheduler"])


def _load_hub_generator(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any, dict]:
    """SD's parts read from their safetensors straight into ``dtype`` on ``device``: the networks are built on the
    meta device (accelerate), so no random initialisation runs and no float32 copy of 4 GB is ever made."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import CLIPTextModel

    if are_progress_bars_disabled():  # diffusers keeps its own switch (on), where transformers follows the hub's
        diffusers_logging.disable_progress_bar()
    place = {"device_map": str(device)} if device.type != "cpu" else {}
    common = {"low_cpu_mem_usage": True, **place}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **common)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **common)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return unet, vae, text, config


def _prepare(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model.requires_grad_(False).eval().to(device)
    # Cast only when needed: diffusers warns on any dtype cast, even a no-op one.
    if next(model.parameters()).dtype != dtype:
        model.to(dtype)
    return model


def load_generator(comp: Component, device: torch.device, dtype: torch.dtype, decoder: bool = True) -> Generator:
    """Stable Diffusion's parts. ``decoder=False`` drops the VAE decoder, which only generation needs."""
    if comp.builtin:
        unet, vae, text, sched = _build_random_generator(comp)
    else:
        unet, vae, text, sched = _load_hub_generator(local_snapshot(comp), device, dtype)
    if not decoder:
        vae.decoder = vae.post_quant_conv = None
    for m in (unet, vae, text):
        _prepare(m, device, dtype)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # faster convolutions with tensor cores
    return Generator(unet, vae, text, PromptTokenizer(), sched, device, dtype)


def _assign_from(model: torch.nn.Module, load: Callable[[torch.nn.Module], Any], what: str) -> torch.nn.Module:
    """Fill a model built by :func:`without_init` by calling ``load(model)``, a library's own checkpoint loader,
    with every ``model.load_state_dict`` call made with ``assign=True``: the model takes the loaded tensors as they
    are (already on the device) instead of copying them into its meta parameters, which would do nothing. Raises
    RuntimeError naming any parameter the checkpoint did not provide."""
    model.load_state_dict = partial(type(model).load_state_dict, model, assign=True)
    try:
        load(model)
    finally:
        del model.load_state_dict
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise RuntimeError(f"{what}: the checkpoint has no values for {', '.join(empty[:3])}")
    return model


def load_dino(comp: Component, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A timm ViT that accepts any input size (positional embeddings interpolated). Real weights are read from the
    safetensors file straight onto ``device`` (through timm's own checkpoint conversion), into a model built
    without initialisation."""
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if comp.builtin:
        with _seeded(comp.init_seed):
            model = VisionTransformer(num_classes=0, dynamic_img_size=True, **comp.config)
        return _prepare(model, device, dtype)
    from safetensors.torch import load_file

    weights = local_snapshot(comp) / "model.safetensors"
    model = without_init(lambda: timm.create_model(comp.arch, pretrained=False, num_classes=0, dynamic_img_size=True))

    def load(m: torch.nn.Module) -> None:
        m.load_state_dict(checkpoint_filter_fn(load_file(weights, device=str(device)), m), strict=True)

    return _prepare(_assign_from(model, load, "DINO ViT"), device, dtype)


def load_clip(comp: Component, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """An open_clip CLIP model (image and text towers). Real weights: the folder's ``open_clip_config.json`` and
    safetensors file, read straight onto ``device`` by open_clip's own checkpoint loader (with its format
    conversions) into a model built without initialisation."""
    import open_clip

    if comp.builtin:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        cfg = comp.config
        with _seeded(comp.init_seed):
            model = CLIP(
                embed_dim=cfg["embed_dim"],
                vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
                quick_gelu=clip_activation(comp) == "quickgelu",
            )
        return _prepare(model, device, dtype)
    root = local_snapshot(comp)
    config_name, weights_name = ROLE_FILES["clip"]
    cfg = dict(json.loads((root / config_name).read_text())["model_cfg"])
    # The activation the weights were trained with, which a config may not say (OpenAI's QuickGELU): weights run under
    # the other one load silently and give other features.
    cfg["quick_gelu"] = clip_activation(comp) == "quickgelu"
    log.info("CLIP ViT runs %s", "QuickGELU" if cfg["quick_gelu"] else "GELU")
    # As open_clip's create_model picks the class; the tower configs stay dicts, which both classes accept.
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = without_init(lambda: cls(**cfg))

    def load(m: torch.nn.Module) -> None:
        open_clip.load_checkpoint(m, str(root / weights_name), strict=True, device=str(device))

    return _prepare(_assign_from(model, load, "CLIP ViT"), device, dtype)


def load_cutler_detector(comp: Component, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The CutLER detector: seeded random weights at the component's size for the random-weight sets, else the
    checkpoint file (detectron2 .pth or converted .safetensors) at full size."""
    from ..cutler.checkpoint import load_cutler
    from ..cutler.configs import FULL, TINY
    from ..cutler.model import random_cutler

    if comp.builtin:
        config = {"tiny": TINY, "full": FULL}[comp.config["size"]]
        return random_cutler(config, comp.init_seed).to(device=device, dtype=dtype).eval()
    return load_cutler(local_snapshot(comp), FULL, device, dtype)


_LOADERS = {"sd": load_generator, "dino": load_dino, "clip": load_clip, "cutler": load_cutler_detector}
_NOTICE_SHOWN = False


def _load(role: str, comp: Component, device: torch.device, dtype: torch.dtype, **extra: Any) -> Any:
    """Load one network, or fail with one line (ModelUnavailable) naming what is wrong with its files.

    Every weight file is checked first, so a missing one is never replaced by random initialisation; a file that
    is there but cannot be read (truncated, another format, tensors that do not fit) fails the load.
    """
    files = [] if comp.builtin else weight_files(comp)
    try:
        return _LOADERS[role](comp, device, dtype, **extra)
    except ModelUnavailable:
        raise
    except Exception as exc:  # the libraries raise OSError, RuntimeError, SafetensorError, ValueError... for bad files
        if not files:
            raise  # built in-process from a config: not a user's file, a bug
        lines = str(exc).strip().splitlines()
        where = files[0].parent if len(files) > 1 else files[0]
        # A downloaded set's files can be fetched again; a folder of the user's own can only be replaced.
        again = (
            f"`ovdiff models verify {comp.fetch_set}` checks the files' bytes; fetch it again with {_fetch_hint(comp)}"
            if comp.fetch_set
            else f"replace it, or pass another {'file' if len(files) == 1 else 'folder'} with --models NAME,{role}=PATH"
        )
        raise ModelUnavailable(
            f"{ROLE_TITLES[role]}: cannot load the weights in {where} ({type(exc).__name__}: "
            f"{lines[0] if lines else 'no detail'}); a truncated or replaced file? {again}"
        ) from None


class Models:
    """The networks of one model set, each loaded on first use and kept for the life of the process.

    A run whose results are all cached loads none of them: hashes come from the spec and the weight files' names
    and digests (remembered), not from loading the networks.
    """

    def __init__(self, spec: ModelSetSpec, device: torch.device, precision: str = "auto") -> None:
        self.spec = spec
        self.device = device
        self.precision = precision
        self.dtypes = resolve_precision(precision, device)
        self._loaded: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}  # role -> seconds its last load took (building or reading)

    def dtype(self, role: str) -> torch.dtype:
        """The dtype network ``role`` runs in (see :func:`resolve_precision`)."""
        return self.dtypes[role]

    @cached_property
    def hashes(self) -> dict[str, str]:
        """role -> model hash, for cache keys. The optional CutLER detector is left out when its checkpoint is not
        on this machine or is broken (no key can use it then; --masker auto says so); a missing main network raises
        ModelUnavailable when asked."""
        out = {}
        for role, comp in self.spec.components.items():
            try:
                out[role] = component_hash(comp)
            except ModelUnavailable:
                if role != "cutler":
                    raise
        return out

    def get(self, role: str, *, decoder: bool = True) -> Any:
        """The loaded network for ``role`` ("sd" -> :class:`Generator`, "dino", "clip" -> nn.Module).

        ``decoder=False`` (the SD feature extractor) accepts a Generator without its VAE decoder, so a run that
        generates nothing never loads it; asking for the decoder later reloads the generator whole.
        """
        loaded = self._loaded.get(role)
        if role == "sd" and loaded is not None and decoder and loaded.vae.decoder is None:
            del self._loaded[role]
        if role not in self._loaded:
            global _NOTICE_SHOWN
            if not self.spec.meaningful and not _NOTICE_SHOWN:
                _NOTICE_SHOWN = True
                log.warning("note: model set '%s' has random weights: results are not meaningful", self.spec.name)
            extra = {"decoder": decoder} if role == "sd" else {}
            t0 = time.perf_counter()
            self._loaded[role] = _load(role, self.spec.components[role], self.device, self.dtype(role), **extra)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = self.load_seconds[role] = time.perf_counter() - t0
            log.info(
                "loaded %s in %.1f s (%s, %s)", ROLE_TITLES[role], seconds, dtype_name(self.dtype(role)), self.device
            )
        return self._loaded[role]

    def check_available(self, roles: list[str]) -> None:
        """Fail at once (ModelUnavailable, one line naming the file) if any needed network's weights are missing
        locally, cut short, or not what the network needs (tensor names and shapes against its architecture; a
        passed file is remembered, so this loads nothing and costs seconds once per file)."""
        for role in roles:
            comp = self.spec.components.get(role)
            if comp is None:
                raise ModelUnavailable(f"model set {self.spec.name!r} has no {role} network")
            if not comp.builtin:
                weight_files(comp, contents=True)

    def has_weights(self, role: str) -> bool:
        """Whether network ``role``'s weights are here (built in, or on this machine). Weights that are here but
        broken (empty, cut short, the wrong tensors) raise ModelUnavailable: falling back to another network would
        hide them."""
        try:
            self.check_available([role])
        except WeightsMissing:
            return False
        return True
