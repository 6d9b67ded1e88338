"""Issue 24 (real weights, part 3): CLIP's activation follows its weights, `ovdiff models verify` re-reads every
byte the fast hash trusts by name, `models list` names where weights were found, hints name the set, and progress
bars stay out of logs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ovdiff_cli.cli import app
from ovdiff_cli.models import ModelUnavailable, component_hash, loading, resolve_models
from ovdiff_cli.models.loading import Models
from ovdiff_cli.models.registry import (
    QUICK_GELU_WEIGHTS,
    ROLE_FILES,
    Component,
    WeightsMissing,
    clip_activation,
    found_source,
    local_snapshot,
    verify,
)
from ovdiff_cli.models.sd15 import SD15_REVISION
from ovdiff_cli.models.tiny import TINY_CLIP


def _hub_snapshot(
    cache: Path, repo: str, sha: str, files: dict[str, bytes], *, ref: str | None = None, listed: tuple[str, ...] = ()
) -> Path:
    """A snapshot as huggingface_hub lays it out: each file a relative link to a blob named by the sha256 of its
    content (an LFS file: .safetensors) or its git blob hash (a small file); ``ref`` points a branch at ``sha``;
    ``listed`` names more files in the cached tree listing (huggingface_hub >= 1.x) that are not downloaded."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    tree = {}
    for rel, data in files.items():
        lfs = rel.endswith(".safetensors")
        blob = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        link = repo_dir / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob, link.parent))
        tree[rel] = {"size": len(data), "blob_id": blob}
    for rel in listed:
        tree[rel] = {"size": 1, "blob_id": "0" * 40}
    (repo_dir / "trees").mkdir(exist_ok=True)
    (repo_dir / "trees" / f"{sha}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
    return repo_dir / "snapshots" / sha


def _safetensors(values: bytes) -> bytes:
    from safetensors.torch import save

    return save({"w": torch.frombuffer(bytearray(values), dtype=torch.uint8)})


def _clip_folder(folder: Path, **config: object) -> Path:
    """A CLIP folder in open_clip's hub layout holding the tiny set's CLIP, its config extended by ``config``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / ROLE_FILES["clip"][0]).write_text(json.dumps({"model_cfg": {**TINY_CLIP, **config}}))
    tiny = Models(resolve_models("tiny"), torch.device("cpu")).get("clip")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, folder / ROLE_FILES["clip"][1])
    return folder


def _activations(models_arg: str) -> set[str]:
    from open_clip.transformer import QuickGELU

    clip = Models(resolve_models(models_arg), torch.device("cpu")).get("clip")
    return {type(m).__name__ for m in clip.modules() if isinstance(m, QuickGELU | torch.nn.GELU)}


# --- item 6: CLIP's activation -------------------------------------------------------------------------------------


def test_clip_folder_runs_the_activation_its_weights_were_trained_with(tmp_path, monkeypatch):
    """LAION's CLIP weights are trained with GELU, OpenAI's with QuickGELU: the folder's config decides unless its
    weights are a known OpenAI file (then QuickGELU whatever the config says) or the user says with clip-act=."""
    laion = _clip_folder(tmp_path / "laion")  # no quick_gelu in the config, as open_clip writes GELU models
    openai = _clip_folder(tmp_path / "openai", quick_gelu=True)
    assert _activations(f"tiny,clip={laion}") == {"GELU"}
    assert _activations(f"tiny,clip={openai}") == {"QuickGELU"}
    assert _activations(f"tiny,clip={laion},clip-act=quickgelu") == {"QuickGELU"}
    assert _activations(f"tiny,clip-act=gelu,clip={openai}") == {"GELU"}  # in either order

    # A copy of the pinned OpenAI file (e.g. `models fetch --to`) is known by its sha256, whatever its config says.
    digest = hashlib.sha256((laion / ROLE_FILES["clip"][1]).read_bytes()).hexdigest()
    monkeypatch.setitem(QUICK_GELU_WEIGHTS, digest, "OpenAI's, as far as this test is concerned")
    assert _activations(f"tiny,clip={laion}") == {"QuickGELU"}
    assert _activations(f"tiny,clip={laion},clip-act=gelu") == {"GELU"}  # the user has the last word


def test_the_activation_is_part_of_the_model_hash(tmp_path):
    """Same files, other activation: other features, so no cached entry may be shared. QuickGELU keeps the hashes
    it always had (it was the only activation before)."""
    folder = _clip_folder(tmp_path / "clip")
    quick = component_hash(resolve_models(f"tiny,clip={folder},clip-act=quickgelu").components["clip"])
    plain = component_hash(resolve_models(f"tiny,clip={folder}").components["clip"])
    assert plain == quick + "-gelu"
    assert component_hash(resolve_models(f"tiny,clip={folder},clip-act=gelu").components["clip"]) == plain


def test_the_pinned_openai_clip_runs_quickgelu_and_clip_act_is_checked(tmp_path):
    sd15_clip = resolve_models("sd15").components["clip"]
    assert clip_activation(sd15_clip) == "quickgelu"  # known without its files
    assert clip_activation(resolve_models("sd15,clip-act=gelu").components["clip"]) == "gelu"
    # A folder in place of the pinned CLIP follows the folder, not the pinned weights' activation.
    folder = _clip_folder(tmp_path / "clip")
    assert clip_activation(resolve_models(f"sd15,clip={folder}").components["clip"]) == "gelu"
    with pytest.raises(ValueError, match=r"'clip-act=relu': expected clip-act=quickgelu or gelu"):
        resolve_models(f"tiny,clip={folder},clip-act=relu")
    with pytest.raises(ValueError, match=r"clip-act is for CLIP weights read from files.*add clip=PATH"):
        resolve_models("tiny,clip-act=gelu")  # tiny's CLIP is built in-process from its config
    with pytest.raises(ValueError, match=r"or clip-act=quickgelu\|gelu"):
        resolve_models("tiny,act=gelu")


# --- item 7: ovdiff models verify ----------------------------------------------------------------------------------


def _dino_snapshot(hub_cache: Path) -> Path:
    files = {"config.json": b'{"architecture": "vit_base_patch8_224"}', "model.safetensors": _safetensors(bytes(64))}
    return _hub_snapshot(hub_cache, "timm/vit_base_patch8_224.dino", "d1" * 20, files, ref="main")


def _flip_last_tensor_byte(path: Path) -> None:
    """Change one byte of a file's tensor data in place: same size, framing intact."""
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))


def test_verify_finds_a_hub_blob_whose_bytes_are_not_its_name(hub_cache):
    snap = _dino_snapshot(hub_cache)
    dino = resolve_models("sd15").components["dino"]
    assert [(c.path.name, c.state) for c in verify(dino)] == [("config.json", "ok"), ("model.safetensors", "ok")]
    h0 = component_hash(dino)
    blob = Path(os.path.realpath(snap / "model.safetensors"))
    _flip_last_tensor_byte(blob)
    assert component_hash(dino) == h0  # the fast path trusts the blob's name: that is what verify is for
    checks = verify(dino)
    assert [c.state for c in checks] == ["ok", "corrupt"] and checks[1].bad
    assert f"is not its blob's name {blob.name[:16]}" in checks[1].detail
    assert f"delete {blob} and run `ovdiff models fetch sd15`" in checks[1].detail
    # A small file is named by its git blob hash.
    Path(os.path.realpath(snap / "config.json")).write_bytes(b'{"architecture": "vit_base_patch16_224"}')
    assert [c.state for c in verify(dino)] == ["corrupt", "corrupt"]

    result = CliRunner().invoke(app, ["models", "verify", "sd15"])
    assert result.exit_code == 1
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["set", "network", "file", "status"]
    weights = next(r for r in rows if r[2] == str(snap / "model.safetensors"))
    assert weights[:2] == ["sd15", "DINO ViT"] and weights[3].startswith("corrupt: content sha256 ")
    assert ["sd15", "CLIP ViT", "", "not here"] in rows  # weights not on this machine: listed, not bad
    doc = json.loads(CliRunner().invoke(app, ["models", "verify", "sd15", "--json"]).stdout)
    assert doc["bad"] == 2 and {r["state"] for r in doc["files"]} == {"corrupt", "not here"}


def test_verify_corrects_a_remembered_digest_of_a_file_edited_with_its_time_kept(tmp_path):
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(_safetensors(bytes(64)))
    models_arg = f"sd15,dino={folder}"
    dino = resolve_models(models_arg).components["dino"]
    h0 = component_hash(dino)
    stat = weights.stat()
    _flip_last_tensor_byte(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert component_hash(dino) == h0  # same path, size and mtime: the remembered digest is trusted

    result = CliRunner().invoke(app, ["models", "verify", models_arg])
    assert result.exit_code == 1, result.output
    stale = [line for line in result.stdout.splitlines() if "\tstale: " in line]
    assert len(stale) == 1 and str(weights) in stale[0] and "corrected to" in stale[0]
    h1 = component_hash(dino)
    assert h1 != h0  # cache keys follow the new bytes from now on
    again = CliRunner().invoke(app, ["models", "verify", models_arg])
    assert again.exit_code == 0 and "stale" not in again.stdout
    assert component_hash(dino) == h1


def test_verify_usage_errors_and_nothing_to_verify(hub_cache):
    runner = CliRunner()
    bad = runner.invoke(app, ["models", "verify", "nope"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        "error: --models 'nope': not a model set (sd15, sd15-random, tiny) nor an existing folder"
    ]
    tiny = runner.invoke(app, ["models", "verify", "tiny"])
    assert tiny.exit_code == 0 and "nothing to verify" in tiny.output
    nothing_here = runner.invoke(app, ["models", "verify", "--json"])
    assert nothing_here.exit_code == 0
    doc = json.loads(nothing_here.stdout)
    assert doc["bad"] == 0 and {r["state"] for r in doc["files"]} == {"not here"}
    # A snapshot that is here with a weight file gone is bad, and the file is named.
    snap = _dino_snapshot(hub_cache)
    (snap / "model.safetensors").unlink()
    doc = json.loads(runner.invoke(app, ["models", "verify", "sd15", "--json"]).stdout)
    dino = next(r for r in doc["files"] if r["network"] == "dino")
    assert dino["state"] == "broken" and dino["detail"] == f"model.safetensors is missing in {snap}"


# --- item 8: where weights were found, which file is missing, which set to fetch, progress bars ------------------


def test_models_list_names_the_repository_and_commit_the_weights_were_found_under(hub_cache):
    files = {rel: _safetensors(b"sd") if rel.endswith(".safetensors") else b"{}" for rel in ROLE_FILES["sd"]}
    _hub_snapshot(hub_cache, "runwayml/stable-diffusion-v1-5", SD15_REVISION, files)
    _dino_snapshot(hub_cache)
    spec = resolve_models("sd15")
    assert found_source(spec.components["sd"]) == f"runwayml/stable-diffusion-v1-5@{SD15_REVISION}"
    # A branch: the commit it pointed to, which is what a pin would name.
    assert found_source(spec.components["dino"]) == f"timm/vit_base_patch8_224.dino@{'d1' * 20} (main)"
    assert found_source(spec.components["clip"]) == spec.components["clip"].source  # not here: as declared
    result = CliRunner().invoke(app, ["models", "list"])
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert ["sd15", "Stable Diffusion", f"runwayml/stable-diffusion-v1-5@{SD15_REVISION}"] in [r[:3] for r in rows]


def test_a_hub_snapshot_with_a_weight_file_gone_names_it(hub_cache):
    """huggingface_hub refuses a snapshot its cached file listing says is incomplete; the file we need is named."""
    dino = resolve_models("sd15").components["dino"]
    repo = "timm/vit_base_patch8_224.dino"
    snap = _hub_snapshot(hub_cache, repo, "e2" * 20, {"config.json": b"{}"}, ref="main", listed=("model.safetensors",))
    with pytest.raises(WeightsMissing) as info:
        local_snapshot(dino)
    assert info.value.detail == f"model.safetensors is missing in {snap}"
    msg = str(info.value)
    assert msg.startswith("DINO ViT: weight file model.safetensors is missing in ") and "\n" not in msg
    assert "`ovdiff models fetch sd15`" in msg
    # A component that names no files expects the whole repository; files we never load may be gone.
    files = {"config.json": b"{}", "model.safetensors": _safetensors(b"x")}
    whole = _hub_snapshot(hub_cache, "timm/other", "f3" * 20, files, ref="main", listed=("README.md",))
    assert local_snapshot(Component("dino", "timm", "x", hub_id="timm/other", revision="main")) == whole


def test_a_load_failure_names_the_set_to_fetch_or_the_folder_to_replace(hub_cache, tmp_path, monkeypatch):
    def unreadable(comp, device, dtype):
        raise RuntimeError("Error(s) in loading state_dict for VisionTransformer:\n\tsize mismatch")

    monkeypatch.setitem(loading._LOADERS, "dino", unreadable)
    snap = _dino_snapshot(hub_cache)
    with pytest.raises(ModelUnavailable) as info:
        Models(resolve_models("sd15"), torch.device("cpu")).get("dino")
    assert f"cannot load the weights in {snap}" in str(info.value)
    assert str(info.value).endswith("fetch it again with `ovdiff models fetch sd15`")
    with pytest.raises(ModelUnavailable) as info:
        Models(resolve_models(f"sd15,dino={snap}"), torch.device("cpu")).get("dino")
    assert str(info.value).endswith("replace it, or pass another folder with --models NAME,dino=PATH")
    assert "models fetch" not in str(info.value)


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_stay_out_of_logs_even_with_verbose(monkeypatch, terminal):
    """A progress bar redraws itself with carriage returns; `-v 2> run.log` must not fill a log with them."""
    import logging

    from ovdiff_cli.cli import _environment

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    ours = logging.getLogger("ovdiff")
    monkeypatch.setattr(ours, "handlers", list(ours.handlers))  # the test's own list: the old one is restored
    for attr in ("level", "propagate"):
        monkeypatch.setattr(ours, attr, getattr(ours, attr))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    _environment(["ovdiff", "segment", "x.png", "-v"])
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == (None if terminal else "1")
