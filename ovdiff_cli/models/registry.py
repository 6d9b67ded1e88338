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

# CLIP's MLP activation, chosen in --models with `clip-act=` (after the first entry, like the ROLE=PATH overrides).
CLIP_ACT = "clip-act"
CLIP_ACTIVATIONS = ("quickgelu", "gelu")
# sha256 of CLIP weight files known to be trained with QuickGELU (OpenAI's) -> whose they are. Model set modules add
# the files they pin, so a copy of them in a folder (`models fetch --to`) runs QuickGELU whatever its config says.
QUICK_GELU_WEIGHTS: dict[str, str] = {}


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
    # CLIP only: the MLP activation its weights were trained with, where the set or the user says it ("quickgelu"
    # for OpenAI's weights, or `clip-act=` in --models); None follows the weights and their config
    # (:func:`clip_activation`).
    activation: str | None = None

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

    Per-model overrides replace one network with a local folder, e.g. ``sd15,sd=/models/sd15``; ``clip-act=gelu``
    or ``clip-act=quickgelu`` says which activation a CLIP read from files runs (default: :func:`clip_activation`).
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
    activation = None
    for item in overrides:
        role, sep, path = item.partition("=")
        if role == CLIP_ACT:
            if path not in CLIP_ACTIVATIONS:
                raise ValueError(f"--models override {item!r}: expected {CLIP_ACT}={' or '.join(CLIP_ACTIVATIONS)}")
            activation = path
            continue
        if not sep or role not in ROLES:
            raise ValueError(
                f"--models override {item!r}: expected ROLE=PATH with ROLE one of {', '.join(ROLES)}, or"
                f" {CLIP_ACT}={'|'.join(CLIP_ACTIVATIONS)}"
            )
        target = Path(path).expanduser()
        if not (target.is_dir() or (role == "cutler" and target.is_file())):
            what = "a folder or a checkpoint file" if role == "cutler" else "a folder"
            raise ValueError(f"--models override {item!r}: {path} is not {what}")
        spec = spec.with_local(role, path)
    if activation:  # applied last, so it holds for a clip=PATH given before or after it
        clip = spec.components["clip"]
        if clip.builtin:
            raise ValueError(
                f"--models {arg!r}: {CLIP_ACT} is for CLIP weights read from files, and {spec.name}'s CLIP is built"
                " in-process; add clip=PATH"
            )
        spec = replace(spec, components={**spec.components, "clip": replace(clip, activation=activation)})
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
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    partial: tuple[Path, list[str]] | None = None  # the first snapshot found here with weight files missing
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
        except IncompleteSnapshotError as exc:
            # huggingface_hub refuses a snapshot that its cached file listing says lacks files: it is here, so name
            # the files we load that are gone (an alias may still hold them all).
            root = Path(exc.snapshot_path)
            names = comp.allow_patterns or ROLE_FILES.get(comp.role, ())
            missing = [rel for rel in names if not (root / rel).is_file()]
            if not missing:
                return root  # only files we never load are gone
            partial = partial or (root, missing)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            continue
    if partial:
        root, missing = partial
        named = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing in {root}"
        error = WeightsMissing(
            f"{ROLE_TITLES[comp.role]}: weight file{'s' if len(missing) > 1 else ''} {named}: fetch again with"
            f" {_fetch_hint(comp)}, or pass a complete folder with --models NAME,{comp.role}=PATH"
        )
        error.detail = named  # which files, as weight_files says it, for `models list`
        raise error
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


def found_source(comp: Component) -> str:
    """Where this machine has the component's weights, as ``REPO@COMMIT``: the repository they were found under
    (the pinned name or one of its other names) and, for a branch such as ``main``, the commit it pointed to then
    (``REPO@COMMIT (main)``: the sha to pin). Its declared :attr:`Component.source` where nothing is found."""
    if not comp.hub_id:
        return comp.source
    from huggingface_hub.file_download import repo_folder_name

    try:
        root = local_snapshot(comp)
    except ModelUnavailable:
        return comp.source
    repo = next(
        (r for r in comp.hub_aliases if root.parent.parent.name == repo_folder_name(repo_id=r, repo_type="model")),
        comp.hub_id,
    )
    branch = f" ({comp.revision or 'main'})" if root.name != comp.revision else ""
    return f"{repo}@{root.name}{branch}"


def weight_files(comp: Component, *, contents: bool = False) -> list[Path]:
    """Every file this component's weights are loaded from, checked present, non-empty and not cut short (from the
    files' own framing: safetensors headers, zip directories), without loading them. With ``contents``, also that
    they hold the tensors the network needs, by name and shape (:mod:`ovdiff_cli.models.contents`: seconds once
    per file, remembered); hashing does not ask for it, so cache keys stay cheap.

    Raises ModelUnavailable naming the first missing, empty, cut short or (``contents``) wrong file and how to provide
    the weights: WeightsMissing when it is simply not there, contents.WeightsWrong when it holds the wrong things.
    """
    root = local_snapshot(comp)
    names = comp.allow_patterns or ROLE_FILES.get(comp.role, ())
    files = [root] if root.is_file() else [root / rel for rel in names]  # a file: a CutLER checkpoint
    problem, wrong = None, False
    for f in files:
        if not f.is_file() or f.stat().st_size == 0:
            problem = (f, "is empty" if f.is_file() else "is missing")
        elif state := _incomplete(f):
            problem, wrong = (f, state), state.startswith("is not a ")  # whole, but another format
        if problem:
            break
    if problem is None and contents:
        from .contents import check_contents

        problem = check_contents(comp, root, files)
        wrong = problem is not None
    if problem:
        from .contents import WeightsWrong

        f, state = problem
        named = f"{f.relative_to(root)} {state} in {root}" if f != root else f"{f} {state}"
        again = f"fetch it again with {_fetch_hint(comp)}, or " if comp.fetch_set else ""
        kind = WeightsWrong if wrong else WeightsMissing if state == "is missing" else ModelUnavailable
        error = kind(
            f"{ROLE_TITLES[comp.role]}: weight file {named}: {again}pass a {'correct' if wrong else 'complete'}"
            f" {'file' if f == root else 'folder'} with --models NAME,{comp.role}=PATH"
        )
        error.detail = named  # which file and what is wrong with it, for `models list`
        raise error
    return files


# safetensors' own limit on its JSON header: a larger length prefix means the file is something else.
SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor name -> {"dtype", "shape", "data_offsets"}, and
    "__metadata__") and the offset its data starts at, read without the data. Raises ValueError whose text
    completes "FILE ...": "is not a safetensors file (...)" for random bytes or another format, "is truncated
    (...)" for a file cut inside its header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else size
        # Every safetensors header is a JSON object: a file cut inside it still starts with its brace.
        first = f.read(1)
        if first and (first != b"{" or header_len > SAFETENSORS_MAX_HEADER):
            raise ValueError("is not a safetensors file (no JSON header after its first 8 bytes: another format?)")
        if 8 + header_len > size:
            raise ValueError(f"is truncated ({size:,} bytes, shorter than its own header)")
        try:
            header = json.loads(first + f.read(header_len - 1))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ValueError("is not a safetensors file (its header cannot be read)")
    return header, 8 + header_len


def _incomplete(path: Path) -> str | None:
    """What is wrong with a weight file by its own framing, without reading its tensors: "is truncated (...)" when it
    is visibly cut short, "is not a safetensors file (...)" when a .safetensors file has no header at all (random
    bytes, another format); None if it looks whole. A safetensors file must end exactly where its header's last
    tensor ends; a zip-format torch checkpoint must have its central directory (written last)."""
    import zipfile

    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            header, data_start = safetensors_header(path)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except ValueError as exc:
            return str(exc)
        except (KeyError, TypeError, IndexError):
            return "is not a safetensors file (its header cannot be read)"
        expected = data_start + end
        if expected != size:
            return f"is truncated ({size:,} bytes where its header lists {expected:,})"
        return None
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"is truncated ({size:,} bytes; the checkpoint's zip directory is missing)"
    return None


def component_hash(comp: Component) -> str:
    """A digest of the files the component's weights are actually loaded from (used in every cache key), so a file
    that changes, is swapped or goes missing never reuses an entry made with other weights.

    Hub: the snapshot's commit sha plus a digest of its files' identities (a snapshot file links to a blob named by
    the sha256 of its content, so this costs nothing). Local folder or checkpoint file: a digest of the content of
    its weight files (sha256 of every byte, remembered by path, size and modification time, so it is computed once).
    Built-in: a digest of its config and init seed. A CLIP that runs GELU (:func:`clip_activation`) gets its own
    hash. Raises ModelUnavailable when a weight file is missing.

    This fast path trusts names: a hub blob's name is not checked against its bytes, and a local file edited in
    place with its size and modification time kept keeps its remembered digest. :func:`verify` (``ovdiff models
    verify``) re-reads every byte.
    """
    if comp.builtin:
        blob = json.dumps({"arch": comp.arch, "config": comp.config, "seed": comp.init_seed}, sort_keys=True)
        return "random-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    files = weight_files(comp)
    root = local_snapshot(comp)
    base = root.parent if root.is_file() else root
    digest = _files_digest(base, files)
    # The activation is part of what CLIP computes. QuickGELU, the only one before a folder's GELU was honoured,
    # keeps the hashes it always had; GELU gets others, so no entry made under the other activation is reused.
    act = "-gelu" if comp.role == "clip" and clip_activation(comp) == "gelu" else ""
    if comp.hub_id:
        return f"{root.name}-{digest[:12]}{act}"  # huggingface_hub names snapshot folders by commit sha
    return ("file-" if root.is_file() else "local-") + digest + act


def clip_activation(comp: Component) -> str:
    """The MLP activation a CLIP component runs, "quickgelu" or "gelu": the one its weights were trained with.

    In order: the component's own (the pinned OpenAI weights, or ``clip-act=`` in ``--models``); QuickGELU for a
    weight file whose sha256 is in :data:`QUICK_GELU_WEIGHTS` (a copy of the pinned OpenAI file, whatever its
    folder's config says); else ``quick_gelu`` in the folder's ``open_clip_config.json``, GELU when absent, as
    open_clip reads it (LAION's and most other CLIP weights are trained with GELU). Built-in: its config's.
    """
    if comp.activation:
        return comp.activation
    if comp.builtin:
        return "quickgelu" if comp.config.get("quick_gelu") else "gelu"
    _ensure_registered()  # the sets' modules add their known weights
    root = local_snapshot(comp)
    config_name, weights_name = ROLE_FILES["clip"]
    if _content_id(root / weights_name).partition(":")[2] in QUICK_GELU_WEIGHTS:
        return "quickgelu"
    try:
        config = json.loads((root / config_name).read_text())["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return "gelu"  # unreadable: the load fails on it and says so
    return "quickgelu" if isinstance(config, dict) and config.get("quick_gelu") else "gelu"


def _files_digest(root: Path, files: list[Path]) -> str:
    """sha256 over each file's name (relative to ``root``) and content identity, as 16 hex digits."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{_content_id(f)}\0".encode())
    return h.hexdigest()[:16]


def _content_id(path: Path) -> str:
    """What a file holds: in a Hugging Face hub cache, the name of the blob it links to (the sha256 of an LFS file's
    content, the git hash of a small one); elsewhere, the sha256 of its bytes, remembered by path, size and mtime."""
    blob = _blob_name(path)
    if blob:
        return "blob:" + blob
    key = _memo_key(path)
    memo = _digest_memo()
    if key not in memo:
        memo[key] = hash_file(path)
        _save_digest_memo(memo)
    return "sha256:" + memo[key]


def _blob_name(path: Path) -> str | None:
    """The name of the hub blob ``path`` links to (a snapshot file in a Hugging Face cache), else None."""
    import os

    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if target.parent.name == "blobs":
            return target.name
    return None


def _memo_key(path: Path) -> str:
    """Where a file's digest is remembered: its real path, size and modification time, any of which an edit changes
    (an edit that keeps all three is only found by :func:`verify`)."""
    stat = path.stat()
    return f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"


def hash_file(path: Path, algorithm: str = "sha256", prefix: bytes = b"") -> str:
    """Hex digest of ``prefix`` followed by every byte of ``path``, read in 4 MiB blocks."""
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


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


@dataclass(frozen=True)
class FileCheck:
    """One weight file as :func:`verify` found it. ``state``: "ok"; "corrupt" (a hub file whose bytes are not what
    its blob's name says); "stale" (a local file whose remembered digest was of other bytes, now corrected); or
    "broken" (missing, empty or cut short, as the loaders' checks say; ``path`` is None and ``detail`` names the
    file). ``detail`` says what was found."""

    path: Path | None
    state: str
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.state != "ok"


def verify(comp: Component) -> list[FileCheck]:
    """Re-read every byte of ``comp``'s weight files, never trusting a name: a file linked to a hub blob must hash to
    the blob's name (the sha256 of an LFS file, the git blob hash of a small one), and a local file's remembered
    sha256 must be its content's. A remembered digest found stale is corrected, so cache keys follow the bytes from
    then on. Built-in components have nothing to verify.

    Raises WeightsMissing (without ``detail``) when the weights are not on this machine at all.
    """
    if comp.builtin:
        return []
    try:
        files = weight_files(comp)
    except ModelUnavailable as exc:
        if isinstance(exc, WeightsMissing) and not hasattr(exc, "detail"):
            raise
        return [FileCheck(None, "broken", getattr(exc, "detail", str(exc)))]
    memo = _digest_memo()
    checks, corrected = [], False
    for f in files:
        blob = _blob_name(f)
        if blob:
            checks.append(_check_blob(f, blob, comp))
            continue
        key, actual = _memo_key(f), hash_file(f)
        recorded = memo.get(key)
        if recorded != actual:
            memo[key], corrected = actual, True  # a first digest is remembered too
        if recorded in (None, actual):
            checks.append(FileCheck(f, "ok"))
            continue
        checks.append(
            FileCheck(
                f,
                "stale",
                f"remembered sha256 {recorded[:16]}… was of other bytes (edited with its size and modification time"
                f" kept); corrected to {actual[:16]}…, so cache keys follow the new bytes",
            )
        )
    if corrected:
        _save_digest_memo(memo)
    return checks


def _check_blob(path: Path, blob: str, comp: Component) -> FileCheck:
    """Whether the hub blob ``path`` links to holds what its name says."""
    import os

    if len(blob) == 64:  # an LFS file: named by the sha256 of its content
        kind, actual = "sha256", hash_file(path)
    else:  # a small file: named by its git blob hash
        kind, actual = "git blob hash", hash_file(path, "sha1", b"blob %d\0" % path.stat().st_size)
    if actual == blob:
        return FileCheck(path, "ok")
    return FileCheck(
        path,
        "corrupt",
        f"content {kind} {actual[:16]}… is not its blob's name {blob[:16]}…: delete {os.path.realpath(path)} and run"
        f" {_fetch_hint(comp)}",
    )


def presence(comp: Component) -> str:
    """Human-readable availability of one component: 'built-in', 'present', 'missing' ('missing: FILE is missing in
    FOLDER' when the rest of its files are here), 'incomplete: FILE is
    truncated (...) in FOLDER' when one of its files is empty or cut short, or 'wrong: FILE has no tensor ...' when
    one is whole but not what the network needs (another format, other tensors). Found from headers and the
    networks' shapes on the meta device, without loading any weights (:func:`weight_files` with ``contents``)."""
    if comp.builtin:
        return "built-in"
    from .contents import WeightsWrong

    try:
        weight_files(comp, contents=True)
    except WeightsMissing as exc:
        detail = getattr(exc, "detail", None)  # which file, when the weights are partly here
        return f"missing: {detail}" if detail else "missing"
    except WeightsWrong as exc:
        return f"wrong: {getattr(exc, 'detail', exc)}"
    except ModelUnavailable as exc:
        return f"incomplete: {getattr(exc, 'detail', exc)}"
    return "present"
