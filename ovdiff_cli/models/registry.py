"""Model sets: named bundles of the three networks OVDiff needs, registered like timm's ``@register_model``.

A model set is data (:class:`ModelSetSpec`): which generator, DINO and CLIP to use, where their weights come
from, the support-image size and the SD feature layers. This module imports nothing heavy, so ``ovdiff models
list`` and ``--help`` stay fast; :mod:`ovdiff_cli.models.loading` builds the networks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..defaults import CPU_BATCH_SIZE

ROLES = ("sd", "dino", "clip", "cutler")
ROLE_TITLES = {"sd": "Stable Diffusion", "dino": "DINO ViT", "clip": "CLIP ViT", "cutler": "CutLER detector"}
# The library a ROLE=PATH override reads its folder or file with, whatever the set's own component was.
ROLE_LIBRARIES = {"sd": "diffusers", "dino": "timm", "clip": "open_clip", "cutler": "detectron2"}
# The files a network's weights consist of, in a hub snapshot or a local folder: every one must be there, or the
# libraries would quietly build a randomly initialised network instead (open_clip does, with a log line).
DIFFUSERS_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
ROLE_FILES = {
    "sd": DIFFUSERS_FILES,
    "dino": ("config.json", "model.safetensors"),
    "clip": ("open_clip_config.json", "open_clip_model.safetensors"),
}


RANDOM = "random"  # the pseudo-library of networks built in-process with seeded random weights


class ModelUnavailable(RuntimeError):
    """A model's weights cannot be used: not on this machine (and never downloaded implicitly), or broken."""


class WeightsMissing(ModelUnavailable):
    """The weights are simply not on this machine (as opposed to present but empty or cut short)."""


@dataclass(frozen=True)
class Component:
    """Where one network of a model set comes from.

    ``library`` picks the loader: "diffusers", "timm", "open_clip", "detectron2" (a CutLER checkpoint), or "random"
    (weights drawn in-process from a seed); ``arch`` is the library's architecture name. Exactly one source applies:
    a hub repo at a pinned revision, a file at a ``url`` (downloaded by ``ovdiff models fetch`` into the weights
    folder), a local folder or file (``local``), or a config built in-process with random weights (``config`` +
    ``init_seed``).
    """

    role: str
    library: str
    arch: str
    hub_id: str | None = None
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()
    url: str | None = None
    local: str | None = None
    config: dict = field(default_factory=dict)
    init_seed: int = 0
    # Other hub names of the same repository (renamed or mirrored): a user's cache may hold the pinned commit there.
    hub_aliases: tuple[str, ...] = ()
    # The model set whose `ovdiff models fetch` downloads this component (for hints); None for local overrides.
    fetch_set: str | None = None

    @property
    def builtin(self) -> bool:
        """Built in-process from ``config`` with seeded random weights: nothing to find, load or fetch."""
        return self.library == RANDOM

    @property
    def source(self) -> str:
        if self.local:
            return self.local
        if self.hub_id:
            return f"{self.hub_id}@{self.revision or 'main'}"
        if self.url:
            return self.url
        return f"built in-process (seed {self.init_seed})"


@dataclass(frozen=True)
class ModelSetSpec:
    """One named model set.

    Attributes:
        image_size: side of the square support images, pixels.
        grid: side of the grid on which attribution maps, masks and prototype pooling live (image_size / 8).
        sd_feature_layers: indices (down-mid-up order) of the UNet cross-attention layers whose queries form
            the SD features.
        clip_input: side every window is resized to for CLIP (support images go at ``image_size``).
        dino_short, dino_max_long: DINO sees an input at its own size when both sides are at most ``dino_short``,
            else resized to short side ``dino_short`` with the long side at most ``dino_max_long``.
        maskcut_input: side of the square DINO input MaskCut cuts (its patch grid is this / 8).
        cpu_batch_size: images (synth) and windows (segment) per forward on the CPU. Full-size networks run one at
            a time there (a batch buys no parallelism and a padded slot costs a whole forward); toy-size ones are
            dominated by per-call overhead, so they batch like on a GPU.
        meaningful: False for ``tiny`` (random weights): its outputs are mechanically real, semantically noise.

    SD features always come from the support image size: every SD input is resized to ``image_size`` square.
    """

    name: str
    description: str
    image_size: int
    grid: int
    sd_feature_layers: tuple[int, ...]
    components: dict[str, Component]
    meaningful: bool = True
    clip_input: int = 448
    dino_short: int = 448
    dino_max_long: int = 800
    maskcut_input: int = 480
    cpu_batch_size: int = CPU_BATCH_SIZE

    def with_local(self, role: str, path: str) -> ModelSetSpec:
        """This set with one component read from a local folder (or, for cutler, a checkpoint file) instead of its
        own source; works for every set, so a real checkpoint can be tried with the tiny models too."""
        if role not in ROLES:
            raise ValueError(f"unknown model component {role!r}; expected one of {', '.join(ROLES)}")
        comps = dict(self.components)
        old = comps.get(role, Component(role, ROLE_LIBRARIES[role], ""))
        library = old.library if not old.builtin else ROLE_LIBRARIES[role]
        comps[role] = Component(role, library, old.arch, local=str(Path(path).expanduser()))
        return replace(self, components=comps)


MODEL_SETS: dict[str, ModelSetSpec] = {}

# The SD feature layers, as indices into the UNet's 16 cross-attention layers (down-mid-up): the first down layer,
# the mid layer, up blocks 1-2 and the last up layer, as in the authors' code.
SD_FEATURE_LAYERS = (0, 6, 7, 8, 9, 10, 11, 12, 15)


def random_weight_set(
    name: str,
    description: str,
    image_size: int,
    *,
    unet: dict,
    vae: dict,
    text: dict,
    scheduler: dict,
    dino: dict,
    clip: dict,
    cutler: str,
    **sizes: int,
) -> ModelSetSpec:
    """A model set whose networks are built in-process from these configs with seeded random weights.

    ``cutler``: the CutLER detector's size, "tiny" or "full" (ovdiff_cli.cutler.configs). ``sizes``: the extractor
    input sizes of :class:`ModelSetSpec` (clip_input, dino_short, ...) where they differ from the full-size ones.
    """
    sd_config = {"unet": unet, "vae": vae, "text": text, "scheduler": scheduler}
    return ModelSetSpec(
        name=name,
        description=description,
        image_size=image_size,
        grid=image_size // 8,
        sd_feature_layers=SD_FEATURE_LAYERS,
        components={
            "sd": Component("sd", RANDOM, "stable-diffusion", config=sd_config, init_seed=0),
            "dino": Component("dino", RANDOM, "vit-dino", config=dino, init_seed=1),
            "clip": Component("clip", RANDOM, "open_clip", config=clip, init_seed=2),
            "cutler": Component("cutler", RANDOM, "cutler", config={"size": cutler}, init_seed=3),
        },
        meaningful=False,
        **sizes,
    )


def register_model_set(fn: Callable[[], ModelSetSpec]) -> Callable[[], ModelSetSpec]:
    """Decorator: register the spec a small builder function returns under its ``name``."""
    spec = fn()
    MODEL_SETS[spec.name] = spec
    return fn


def _ensure_registered() -> None:
    # Importing the set modules runs their @register_model_set decorators.
    from . import sd15, sd15_random, tiny  # noqa: F401


def list_model_sets() -> list[ModelSetSpec]:
    _ensure_registered()
    return list(MODEL_SETS.values())


def resolve_models(arg: str) -> ModelSetSpec:
    """Parse ``--models``: ``NAME``, ``PATH`` (a folder with sd/, dino/, clip/), or ``NAME,role=PATH,...``.

    Per-model overrides replace one network with a local folder, e.g. ``sd15,sd=/models/sd15``.
    Raises ValueError (one line, naming the bad value) for anything else.
    """
    _ensure_registered()
    head, *overrides = [p.strip() for p in arg.split(",")]
    if head in MODEL_SETS:
        spec = MODEL_SETS[head]
    elif head and Path(head).expanduser().is_dir():
        spec = MODEL_SETS["sd15"]
        root = Path(head).expanduser()
        for role in ROLES:
            if role == "cutler" and not (root / role).exists():
                continue  # optional: without it the sd15 set's own checkpoint (or MaskCut) is used
            if not (root / role).is_dir():
                raise ValueError(f"--models {head}: expected a folder {root / role} (layout: sd/, dino/, clip/)")
            spec = spec.with_local(role, str(root / role))
        spec = replace(spec, name=str(root))
    else:
        names = ", ".join(MODEL_SETS)
        raise ValueError(f"--models {arg!r}: not a model set ({names}) nor an existing folder")
    for item in overrides:
        role, sep, path = item.partition("=")
        if not sep or role not in ROLES:
            raise ValueError(f"--models override {item!r}: expected ROLE=PATH with ROLE one of {', '.join(ROLES)}")
        target = Path(path).expanduser()
        if not (target.is_dir() or (role == "cutler" and target.is_file())):
            what = "a folder or a checkpoint file" if role == "cutler" else "a folder"
            raise ValueError(f"--models override {item!r}: {path} is not {what}")
        spec = spec.with_local(role, path)
    return spec


def _hf_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def weights_dir() -> Path:
    """Where ``ovdiff models fetch`` puts weights that do not live on the Hugging Face hub (CutLER's checkpoint):
    ``$OVDIFF_WEIGHTS``, else ``$XDG_CACHE_HOME/ovdiff-weights``, else ``~/.cache/ovdiff-weights``."""
    import os

    if os.environ.get("OVDIFF_WEIGHTS"):
        return Path(os.environ["OVDIFF_WEIGHTS"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ovdiff-weights"


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pkl")


def _checkpoint_in(path: Path) -> Path:
    """A checkpoint file given directly, or the one checkpoint inside a folder (safetensors preferred)."""
    if path.is_file():
        return path
    found = sorted(
        (p for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES), key=lambda p: p.suffix != ".safetensors"
    )
    if not found:
        raise WeightsMissing(f"CutLER detector: no checkpoint ({', '.join(_CHECKPOINT_SUFFIXES)}) in {path}")
    return found[0]


def local_snapshot(comp: Component) -> Path:
    """The folder (or, for a CutLER checkpoint, the file) holding this component's weights on this machine,
    without touching the network.

    Raises ModelUnavailable with a one-line message saying how to provide the weights.
    """
    if comp.local:
        path = Path(comp.local)
        if not path.exists():
            raise WeightsMissing(f"{ROLE_TITLES[comp.role]}: local path {path} does not exist")
        return _checkpoint_in(path) if comp.role == "cutler" else path
    if comp.url:
        path = weights_dir() / comp.role / comp.url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise WeightsMissing(
                f"{ROLE_TITLES[comp.role]} weights ({comp.url}) are not in {path.parent}: run {_fetch_hint(comp)}"
                f" on a machine with internet and share OVDIFF_WEIGHTS, or pass --models NAME,{comp.role}=PATH"
            )
        return path
    assert comp.hub_id, "built-in components have no snapshot"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for repo in (comp.hub_id, *comp.hub_aliases):
        try:
            return Path(
                snapshot_download(
                    repo,
                    revision=comp.revision,
                    allow_patterns=list(comp.allow_patterns) or None,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            continue
    also = f" (nor under {' or '.join(comp.hub_aliases)} at that revision)" if comp.hub_aliases else ""
    raise WeightsMissing(
        f"{ROLE_TITLES[comp.role]} weights ({comp.hub_id}@{comp.revision or 'main'}) are not in the "
        f"Hugging Face cache {_hf_cache_dir()}{also}: run {_fetch_hint(comp)} on a machine with internet and "
        f"share HF_HOME, pass local folders with --models PATH (sd/ dino/ clip/) or "
        f"--models NAME,{comp.role}=PATH, or use --models tiny"
    )


def _fetch_hint(comp: Component) -> str:
    """The command that downloads ``comp``: "`ovdiff models fetch sd15`" (the set is named when known)."""
    return f"`ovdiff models fetch {comp.fetch_set}`" if comp.fetch_set else "`ovdiff models fetch`"


def weight_files(comp: Component) -> list[Path]:
    """Every file this component's weights are loaded from, checked present, non-empty and not cut short (from the
    files' own framing: safetensors headers, zip directories), without loading them.

    Raises ModelUnavailable naming the first missing or empty file and how to provide the weights.
    """
    root = local_snapshot(comp)
    names = comp.allow_patterns or ROLE_FILES.get(comp.role, ())
    files = [root] if root.is_file() else [root / rel for rel in names]  # a file: a CutLER checkpoint
    for f in files:
        state = None
        if not f.is_file() or f.stat().st_size == 0:
            state = "is empty" if f.is_file() else "is missing"
        else:
            state = _incomplete(f)
        if state:
            named = f"{f.relative_to(root)} {state} in {root}" if f != root else f"{f} {state}"
            again = f"fetch it again with {_fetch_hint(comp)}, or " if comp.fetch_set else ""
            error = (WeightsMissing if state == "is missing" else ModelUnavailable)(
                f"{ROLE_TITLES[comp.role]}: weight file {named}: {again}pass a complete"
                f" {'file' if f == root else 'folder'} with --models NAME,{comp.role}=PATH"
            )
            error.detail = named  # which file and what is wrong with it, for `models list`
            raise error
    return files


def _incomplete(path: Path) -> str | None:
    """Why a weight file is visibly cut short, from its own framing and without reading its tensors; None if it
    looks whole. A safetensors file must end exactly where its header's last tensor ends; a zip-format torch
    checkpoint must have its central directory (written last)."""
    import zipfile

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(head, "little") if len(head) == 8 else size
            if 8 + header_len > size:
                return f"is truncated ({size:,} bytes, shorter than its own header)"
            try:
                header = json.loads(f.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return "is not a safetensors file (its header cannot be read)"
            expected = 8 + header_len + end
            if expected != size:
                return f"is truncated ({size:,} bytes where its header lists {expected:,})"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"is truncated ({size:,} bytes; the checkpoint's zip directory is missing)"
    return None


def component_hash(comp: Component) -> str:
    """A digest of the files the component's weights are actually loaded from (used in every cache key), so a file
    that changes, is swapped or goes missing never reuses an entry made with other weights.

    Hub: the snapshot's commit sha plus a digest of its files' identities (a snapshot file links to a blob named by
    the sha256 of its content, so this costs nothing). Local folder or checkpoint file: a digest of the content of
    its weight files (sha256 of every byte, remembered by path, size and modification time, so it is computed once).
    Built-in: a digest of its config and init seed. Raises ModelUnavailable when a weight file is missing.
    """
    if comp.builtin:
        blob = json.dumps({"arch": comp.arch, "config": comp.config, "seed": comp.init_seed}, sort_keys=True)
        return "random-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    files = weight_files(comp)
    root = local_snapshot(comp)
    base = root.parent if root.is_file() else root
    digest = _files_digest(base, files)
    if comp.hub_id:
        return f"{root.name}-{digest[:12]}"  # huggingface_hub names snapshot folders by commit sha
    return ("file-" if root.is_file() else "local-") + digest


def _files_digest(root: Path, files: list[Path]) -> str:
    """sha256 over each file's name (relative to ``root``) and content identity, as 16 hex digits."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{_content_id(f)}\0".encode())
    return h.hexdigest()[:16]


def _content_id(path: Path) -> str:
    """What a file holds: in a Hugging Face hub cache, the name of the blob it links to (the sha256 of an LFS file's
    content, the git hash of a small one); elsewhere, the sha256 of its bytes, remembered by path, size and mtime."""
    import os

    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent.name == "blobs":
            return "blob:" + target.name
    stat = path.stat()
    memo_key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = _digest_memo()
    if memo_key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        memo[memo_key] = h.hexdigest()
        _save_digest_memo(memo)
    return "sha256:" + memo[memo_key]


def _memo_path() -> Path:
    return weights_dir() / "digests.json"


def _digest_memo() -> dict[str, str]:
    try:
        data = json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _save_digest_memo(memo: dict[str, str]) -> None:
    """Write the memo atomically; a folder that cannot be written just means digests are computed again."""
    import os
    import tempfile

    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(memo, fh, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def presence(comp: Component) -> str:
    """Human-readable availability of one component: 'built-in', 'present', 'missing', or 'incomplete: FILE is
    truncated (...)' when its files are here but one is empty or cut short (found from headers, nothing loaded)."""
    if comp.builtin:
        return "built-in"
    try:
        weight_files(comp)
    except WeightsMissing:
        return "missing"
    except ModelUnavailable as exc:
        return f"incomplete: {getattr(exc, 'detail', exc)}"
    return "present"


def fetch_timeouts() -> tuple[float, float]:
    """(connect, read) seconds for downloads: the defaults, or ``OVDIFF_FETCH_TIMEOUT`` for both."""
    import os

    from ..defaults import FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT

    raw = os.environ.get("OVDIFF_FETCH_TIMEOUT", "")
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"OVDIFF_FETCH_TIMEOUT={raw!r}: expected a number of seconds") from None
    return (value, value) if value > 0 else (FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT)


def _hub_client_with_timeouts() -> None:
    """Make huggingface_hub give up on a silent server. Its requests pass ``timeout=None`` (wait forever), so the
    bound is put on the transport: a request without a timeout gets the fetch timeouts."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    connect, read = fetch_timeouts()
    bounds = {"connect": connect, "read": read, "write": read, "pool": connect}

    class BoundedTransport(httpx2.HTTPTransport):
        def handle_request(self, request):
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: given.get(k) or v for k, v in bounds.items()}
            return super().handle_request(request)

    def factory():
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, transport=BoundedTransport()
        )

    set_client_factory(factory)


def lay_out(comp: Component, source: Path, target: Path, link: bool = False) -> str:
    """Put a fetched component's weight files under ``target`` (``models fetch --to``) and say what was written.

    Files are hard-linked from the download cache where the file system allows it, else copied, so the folder
    works on machines that do not share that cache; ``link`` makes symlinks instead. A file already there with
    the same size is kept; a link pointing nowhere, or a file of another size, is replaced. A CutLER checkpoint
    keeps its file name inside ``target``.
    """
    import os
    import shutil

    names = [source.name] if source.is_file() else list(comp.allow_patterns or ROLE_FILES.get(comp.role, ()))
    base = source.parent if source.is_file() else source
    counts = {"hard-linked": 0, "copied": 0, "symlinked": 0, "already there": 0}
    if target.is_symlink() and not target.exists():
        target.unlink()  # a dangling link from an older layout: never keep it
    for rel in names:
        src, dst = (base / rel).resolve(), target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and not dst.exists():
            dst.unlink()
        if dst.exists() and not dst.is_symlink() and dst.stat().st_size == src.stat().st_size:
            counts["already there"] += 1
            continue
        dst.unlink(missing_ok=True)
        if link:
            dst.symlink_to(src)
            counts["symlinked"] += 1
            continue
        try:
            os.link(src, dst)
            counts["hard-linked"] += 1
        except OSError:  # another file system, or links not allowed: a copy always works
            shutil.copy2(src, dst)
            counts["copied"] += 1
    done = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"{target}: {len(names)} files ({done})"


def fetch(comp: Component) -> Path:
    """Download one component's pinned revision into the Hugging Face cache, or its checkpoint URL into the weights
    folder (``ovdiff models fetch``), giving up after the connect and read timeouts (:func:`fetch_timeouts`)."""
    if comp.builtin or comp.local:
        raise ValueError(f"{comp.role} is {comp.source}: nothing to fetch")
    if comp.url:
        import urllib.request

        target = weights_dir() / comp.role / comp.url.rsplit("/", 1)[-1]
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        # urllib's timeout bounds the connection and every read alike: the larger of the two applies.
        with urllib.request.urlopen(comp.url, timeout=max(fetch_timeouts())) as response, open(partial, "wb") as fh:
            while block := response.read(1 << 20):
                fh.write(block)
        partial.replace(target)  # atomic: a present file is a complete download
        return target
    from huggingface_hub import snapshot_download

    _hub_client_with_timeouts()
    return Path(
        snapshot_download(comp.hub_id, revision=comp.revision, allow_patterns=list(comp.allow_patterns) or None)
    )
