"""Model sets: --models parsing, model hashes (tiny, local folder, hub cache), lazy loading, tokenizer, device."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from real_format import cutler_checkpoint

from ovdiff_cli.meta import without_init
from ovdiff_cli.models import ModelUnavailable, component_hash, loading, resolve_models
from ovdiff_cli.models.loading import CONTEXT_LENGTH, Models, PromptTokenizer, resolve_device
from ovdiff_cli.models.registry import ROLE_FILES, local_snapshot, presence, weight_files
from ovdiff_cli.models.sd15 import SD15_REVISION

SOT, EOT = 49406, 49407
# Every file each network is loaded from (the lists the loaders check).
WEIGHT_FILES = {role: list(files) for role, files in ROLE_FILES.items()}


def fake_weight(name: str, content: bytes) -> bytes:
    """A file named ``name`` holding ``content``: for a .safetensors name, a well-framed safetensors file with
    ``content`` as one uint8 tensor (weight files are checked for truncation against their own headers)."""
    if not name.endswith(".safetensors"):
        return content
    from safetensors.torch import save

    return save({"w": torch.frombuffer(bytearray(content), dtype=torch.uint8)})


def _fake_model_folder(root: Path) -> Path:
    """sd/, dino/, clip/ with a few bytes in files named like weights (never loaded, only hashed)."""
    for role, files in WEIGHT_FILES.items():
        for i, rel in enumerate(files):
            f = root / role / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(fake_weight(rel, bytes([i, 1, 2, 3, 4, 5, 6, 7]) + role.encode()))
    return root


# --- resolve_models ------------------------------------------------------------------------------------------------


def test_resolve_named_sets():
    tiny = resolve_models("tiny")
    assert tiny.name == "tiny" and not tiny.meaningful
    assert (tiny.image_size, tiny.grid) == (64, 8)
    assert set(tiny.components) == {"sd", "dino", "clip", "cutler"}
    # Built in-process from configs: no hub repo, no folder.
    assert all(c.hub_id is None and c.local is None and c.config for c in tiny.components.values())
    sd15 = resolve_models(" sd15 ")
    assert sd15.name == "sd15" and sd15.meaningful and (sd15.image_size, sd15.grid) == (512, 64)
    assert sd15.components["sd"].revision == SD15_REVISION
    # SD and CLIP are pinned to commits (DINO's could not be verified: see models/sd15.py).
    assert re.fullmatch("[0-9a-f]{40}", sd15.components["clip"].revision)
    assert sd15.components["dino"].hub_id == "timm/vit_base_patch8_224.dino"
    assert sd15.sd_feature_layers == (0, 6, 7, 8, 9, 10, 11, 12, 15)


def test_resolve_folder_layout(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    spec = resolve_models(str(root))
    assert spec.name == str(root)
    # Same architecture as sd15, every component read from its subfolder instead of the hub.
    assert spec.image_size == 512 and spec.sd_feature_layers == resolve_models("sd15").sd_feature_layers
    for role in ("sd", "dino", "clip"):
        comp = spec.components[role]
        assert comp.local == str(root / role)
        assert comp.hub_id is None and comp.revision is None
        assert comp.library == resolve_models("sd15").components[role].library
        assert local_snapshot(comp) == root / role
        assert weight_files(comp)  # found and whole (fake weights: their contents would be "wrong", see below)


def test_resolve_folder_missing_subfolder(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    for f in (root / "clip").iterdir():
        f.unlink()
    (root / "clip").rmdir()
    with pytest.raises(ValueError, match=re.escape(str(root / "clip"))):
        resolve_models(str(root))


def test_resolve_override(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    spec = resolve_models(f"sd15, dino={root / 'dino'}")
    assert spec.name == "sd15"
    assert spec.components["dino"].local == str(root / "dino")
    assert spec.components["dino"].hub_id is None
    # The other networks still come from the hub.
    assert spec.components["sd"] == resolve_models("sd15").components["sd"]
    assert spec.components["clip"] == resolve_models("sd15").components["clip"]
    two = resolve_models(f"sd15,sd={root / 'sd'},clip={root / 'clip'}")
    assert [c.local for c in two.components.values()] == [str(root / "sd"), None, str(root / "clip"), None]


@pytest.mark.parametrize(
    ("arg", "named"),
    [
        ("sd99", "'sd99'"),
        ("", "''"),
        ("sd15,vae=/x", "'vae=/x'"),
        ("sd15,sd", "'sd'"),
        ("sd15,sd=/definitely/not/here", "/definitely/not/here"),
    ],
)
def test_resolve_errors_name_the_bad_value(arg, named):
    with pytest.raises(ValueError) as info:
        resolve_models(arg)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_with_local_unknown_role():
    with pytest.raises(ValueError, match="'vae'"):
        resolve_models("sd15").with_local("vae", "/tmp")


# --- component_hash ------------------------------------------------------------------------------------------------


def _config_digest(comp) -> str:
    blob = json.dumps({"arch": comp.arch, "config": comp.config, "seed": comp.init_seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_tiny_hash_is_config_and_seed_digest():
    comp = resolve_models("tiny").components["dino"]
    h = component_hash(comp)
    assert re.fullmatch(r"[a-z]+-[0-9a-f]{16}", h) and not h.startswith("local-")
    assert h.endswith("-" + _config_digest(comp))
    assert component_hash(comp) == h
    # Key order does not matter; any value or the seed does.
    reordered = replace(comp, config=dict(reversed(list(comp.config.items()))))
    assert list(reordered.config) != list(comp.config)
    assert component_hash(reordered) == h
    assert component_hash(replace(comp, config={**comp.config, "depth": 3})) != h
    assert component_hash(replace(comp, init_seed=comp.init_seed + 1)) != h
    # Four distinct networks (CutLER included), four distinct hashes.
    assert len({component_hash(c) for c in resolve_models("tiny").components.values()}) == 4


def test_local_folder_hash_follows_weight_bytes(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    spec = resolve_models(str(root))
    sd = spec.components["sd"]
    h0 = component_hash(sd)
    assert re.fullmatch(r"local-[0-9a-f]{16}", h0)
    assert component_hash(sd) == h0
    # The other roles hold different bytes, so different digests.
    assert len({component_hash(spec.components[r]) for r in ("sd", "dino", "clip")}) == 3

    # Files that are not weights or configs do not count.
    (root / "sd" / "README.md").write_text("notes")
    (root / "sd" / "unet" / "notes.txt").write_text("more notes")
    assert component_hash(sd) == h0

    # Same size, one byte different: a new digest; restoring the bytes restores it.
    w = root / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    original = w.read_bytes()
    w.write_bytes(original[:-1] + b"X")
    assert w.stat().st_size == len(original)
    h1 = component_hash(sd)
    assert h1 != h0
    w.write_bytes(original)
    assert component_hash(sd) == h0

    # A config change counts too.
    (root / "sd" / "unet" / "config.json").write_text('{"changed": 1}')
    h2 = component_hash(sd)
    assert h2 not in {h0, h1}


def test_local_folder_hash_sees_every_byte_of_big_files(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    comp = resolve_models(str(root)).components["dino"]
    big = root / "dino" / "model.safetensors"
    data = bytearray(fake_weight(big.name, bytes(9 << 20)))  # 9 MiB of tensor data
    big.write_bytes(bytes(data))
    h0 = component_hash(comp)
    for where in (-5, 5 << 20):  # the tail, and the middle (a swapped tensor of the same shape)
        data[where] ^= 1
        big.write_bytes(bytes(data))
        h1 = component_hash(comp)
        assert h1 != h0
        h0 = h1


def test_missing_or_empty_weight_file_is_named(tmp_path):
    root = _fake_model_folder(tmp_path / "models")
    spec = resolve_models(f"sd15,clip={root / 'clip'}")
    (root / "clip" / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match=r"weight file open_clip_model\.safetensors is missing"):
        weight_files(spec.components["clip"])
    assert presence(spec.components["clip"]) == f"missing: open_clip_model.safetensors is missing in {root / 'clip'}"
    with pytest.raises(ModelUnavailable):
        Models(spec, torch.device("cpu")).check_available(["clip"])
    (root / "clip" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match=r"open_clip_model\.safetensors is empty"):
        component_hash(spec.components["clip"])
    # Cut short: found from the file's own framing, before anything is loaded.
    whole = fake_weight("x.safetensors", bytes(1000))
    (root / "clip" / "open_clip_model.safetensors").write_bytes(whole[:-10])
    with pytest.raises(ModelUnavailable, match=r"open_clip_model\.safetensors is truncated \([\d,]+ bytes where"):
        weight_files(spec.components["clip"])
    (root / "clip" / "open_clip_model.safetensors").write_bytes(whole[:5])
    with pytest.raises(ModelUnavailable, match=r"is truncated .*shorter than its own header"):
        weight_files(spec.components["clip"])
    (root / "clip" / "open_clip_model.safetensors").write_bytes(whole)
    assert weight_files(spec.components["clip"])
    # A zip-format torch checkpoint (CutLER's .pth) without its central directory.
    ckpt = tmp_path / "cutler.pth"
    torch.save({"model": {"w": torch.zeros(100)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-30])
    cutler = resolve_models(f"tiny,cutler={ckpt}").components["cutler"]
    with pytest.raises(ModelUnavailable, match=r"cutler\.pth is truncated .*zip directory is missing"):
        weight_files(cutler)


def test_missing_local_folder_is_unavailable(tmp_path):
    comp = resolve_models("sd15").with_local("dino", str(tmp_path / "gone")).components["dino"]
    assert presence(comp) == "missing"
    with pytest.raises(ModelUnavailable, match=re.escape(str(tmp_path / "gone"))):
        component_hash(comp)


def _fake_snapshot(cache: Path, repo: str, sha: str, files: list[str], ref: str | None = "main") -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    for name in files:
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(fake_weight(name, b"not really weights"))
    if ref:
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / ref).write_text(sha)
    return snap


def test_missing_hub_weights_explain_how_to_get_them(hub_cache):
    comp = resolve_models("sd15").components["dino"]
    assert presence(comp) == "missing"
    with pytest.raises(ModelUnavailable) as info:
        local_snapshot(comp)
    msg = str(info.value)
    assert "\n" not in msg
    assert "DINO ViT" in msg and "timm/vit_base_patch8_224.dino@main" in msg
    assert str(hub_cache) in msg
    assert "ovdiff models fetch" in msg
    assert "--models NAME,dino=PATH" in msg
    assert "--models tiny" in msg
    with pytest.raises(ModelUnavailable):
        component_hash(comp)
    with pytest.raises(ModelUnavailable):
        Models(resolve_models("sd15"), torch.device("cpu")).check_available(["dino"])


def test_hub_snapshot_found_offline(hub_cache):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = _fake_snapshot(hub_cache, "timm/vit_base_patch8_224.dino", sha, ["model.safetensors", "config.json"])
    spec = resolve_models("sd15")
    dino = spec.components["dino"]
    # revision "main" is resolved through refs/main, without the network.
    assert Path(local_snapshot(dino)).resolve() == snap.resolve()
    assert re.fullmatch(sha + r"-[0-9a-f]{12}", component_hash(dino))
    assert weight_files(dino) and presence(dino).startswith("wrong: config.json is not a JSON file")  # fake files
    # The pinned SD revision is a commit sha: its snapshot folder is found without any ref.
    sd_snap = _fake_snapshot(
        hub_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_REVISION, list(ROLE_FILES["sd"]), ref=None
    )
    assert Path(local_snapshot(spec.components["sd"])).resolve() == sd_snap.resolve()
    assert component_hash(spec.components["sd"]).startswith(SD15_REVISION + "-")
    # CLIP is still missing.
    assert presence(spec.components["clip"]) == "missing"
    assert weight_files(spec.components["sd"])


def test_tiny_presence_is_built_in():
    assert {presence(c) for c in resolve_models("tiny").components.values()} == {"built-in"}


# --- Models ------------------------------------------------------------------------------------------------------


def test_hashes_load_nothing(tmp_path):
    m = Models(resolve_models("tiny"), torch.device("cpu"))
    hashes = m.hashes
    assert hashes == {role: component_hash(c) for role, c in m.spec.components.items()}
    assert all(hashes[role].endswith("-" + _config_digest(c)) for role, c in m.spec.components.items())
    assert m._loaded == {}
    assert m.hashes is hashes  # computed once
    m.check_available(["sd", "dino", "clip"])
    assert m._loaded == {}
    # A local folder of fake weights: loading it would fail, hashing it must not try.
    local = Models(resolve_models(str(_fake_model_folder(tmp_path / "models"))), torch.device("cpu"))
    assert all(h.startswith("local-") for h in local.hashes.values())
    assert local._loaded == {}
    assert local.dtype("sd") == local.dtype("dino") == torch.float32


def test_get_loads_lazily_and_once(monkeypatch, caplog):
    calls = []

    def fake_loader(comp, device, dtype):
        calls.append((comp.role, device, dtype))
        return object()

    monkeypatch.setitem(loading._LOADERS, "dino", fake_loader)
    monkeypatch.setitem(loading._LOADERS, "clip", fake_loader)
    monkeypatch.setattr(loading, "_NOTICE_SHOWN", False)
    m = Models(resolve_models("tiny"), torch.device("cpu"))
    assert calls == []
    first = m.get("dino")
    assert m.get("dino") is first
    assert calls == [("dino", torch.device("cpu"), torch.float32)]
    assert set(m._loaded) == {"dino"}
    assert m.get("clip") is not first
    assert [c[0] for c in calls] == ["dino", "clip"]
    # Random weights are announced once per process, as a warning of ovdiff's logger (the CLI prints it on stderr,
    # and hides it with -q).
    notes = [r for r in caplog.records if r.name == "ovdiff" and "not meaningful" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "WARNING" and "'tiny'" in notes[0].getMessage()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone():
    spec = resolve_models("tiny")
    cpu, f32 = torch.device("cpu"), torch.float32
    with torch.random.fork_rng(devices=[]):  # leave the session's RNG as it was for other tests
        _check_seeded_builds(spec, cpu, f32)


def _check_seeded_builds(spec, cpu, f32):
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    gen_a = loading.load_generator(spec.components["sd"], cpu, f32)
    dino_a = loading.load_dino(spec.components["dino"], cpu, f32)
    clip_a = loading.load_clip(spec.components["clip"], cpu, f32)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.rand(10)  # move the global RNG: the second build must not care
    gen_b = loading.load_generator(spec.components["sd"], cpu, f32)
    dino_b = loading.load_dino(spec.components["dino"], cpu, f32)
    clip_b = loading.load_clip(spec.components["clip"], cpu, f32)
    for a, b in [
        (gen_a.unet, gen_b.unet),
        (gen_a.vae, gen_b.vae),
        (gen_a.text_encoder, gen_b.text_encoder),
        (dino_a, dino_b),
        (clip_a, clip_b),
    ]:
        _assert_same_weights(a, b)
        assert not a.training and not any(p.requires_grad for p in a.parameters())
    # A different seed gives different weights (the seed is really used).
    dino_c = loading.load_dino(replace(spec.components["dino"], init_seed=99), cpu, f32)
    assert not torch.equal(dino_a.patch_embed.proj.weight, dino_c.patch_embed.proj.weight)


# --- tokenizer ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer()


def test_tokenizer_layout(tokenizer):
    assert (tokenizer.sot, tokenizer.eot) == (SOT, EOT)
    enc = tokenizer._tok.encoder
    assert tokenizer.encode("a cat") == [enc["a</w>"], enc["cat</w>"]]
    ids = tokenizer(["a cat", "", "A  CAT"])
    assert ids.shape == (3, CONTEXT_LENGTH) == (3, 77) and ids.dtype == torch.int64
    assert ids[0, :4].tolist() == [SOT, enc["a</w>"], enc["cat</w>"], EOT]
    assert (ids[0, 3:] == EOT).all()  # end token then end-padding
    assert ids[1, 0] == SOT and (ids[1, 1:] == EOT).all()
    assert torch.equal(ids[2], ids[0])  # lower-cased, whitespace collapsed


def test_tokenizer_truncates_keeping_the_end_token(tokenizer):
    text = " ".join(["cat", "dog"] * 60)
    tokens = tokenizer.encode(text)
    assert len(tokens) == 120
    ids = tokenizer([text, "cat"])[0]
    assert ids.shape == (77,)
    assert ids[0] == SOT and ids[76] == EOT
    assert ids[1:76].tolist() == tokens[:75]
    assert EOT not in ids[:76].tolist()


# --- devices -----------------------------------------------------------------------------------------------------


def test_resolve_device_auto_is_cpu_here():
    accelerated = torch.cuda.is_available() or torch.backends.mps.is_available()
    assert (
        resolve_device("auto").type
        == resolve_device().type
        == ("cpu" if not accelerated else "cuda" if torch.cuda.is_available() else "mps")
    )
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps", "tpu", "gpu"])
def test_resolve_device_unavailable_or_unknown(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    assert name in str(info.value)


def test_local_override_on_a_random_weight_set_reads_the_folder(tmp_path):
    (tmp_path / "sd").mkdir()
    comp = resolve_models(f"tiny,sd={tmp_path / 'sd'}").components["sd"]
    assert comp.local == str(tmp_path / "sd") and comp.library == "diffusers" and not comp.builtin


def test_hub_hash_follows_the_blobs_a_snapshot_links_to(hub_cache):
    """In a real hub cache a snapshot file links to a blob named by its content's sha256: swapping a file for
    another (same name, other blob) changes the hash, though the commit is the same."""
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub_cache / "models--timm--vit_base_patch8_224.dino"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, blob in (("config.json", "a" * 64), ("model.safetensors", "b" * 64), ("other", "c" * 64)):
        (repo / "blobs" / blob).write_bytes(fake_weight("blob.safetensors", name.encode()))
    (snap / "config.json").symlink_to(repo / "blobs" / ("a" * 64))
    (snap / "model.safetensors").symlink_to(repo / "blobs" / ("b" * 64))
    dino = resolve_models("sd15").components["dino"]
    h0 = component_hash(dino)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(repo / "blobs" / ("c" * 64))
    h1 = component_hash(dino)
    assert h0 != h1 and h0.startswith(sha) and h1.startswith(sha)


# --- the CutLER component (issue 12) ------------------------------------------------------------------------------


def test_cutler_is_a_component_of_every_set_and_overridable(tmp_path):
    from ovdiff_cli import masks, pipeline

    assert resolve_models("sd15").components["cutler"].url.endswith("/cutler_cascade_final.pth")
    for name in ("tiny", "sd15-random"):
        assert resolve_models(name).components["cutler"].builtin
    # ROLE=PATH works for every set, tiny included, with a checkpoint file or a folder holding one.
    ckpt = cutler_checkpoint(tmp_path / "cutler_cascade_final.safetensors")
    spec = resolve_models(f"tiny,cutler={ckpt}")
    comp = spec.components["cutler"]
    assert comp.local == str(ckpt) and comp.library == "detectron2" and not comp.builtin
    models = Models(spec, torch.device("cpu"))
    assert models.hashes["cutler"].startswith("file-") and models.hashes["sd"].startswith("random-")
    assert pipeline.effective_masker(pipeline.SynthOptions(), models) == "cutler"
    # Without the checkpoint, auto falls back to maskcut and says so once; an explicit cutler is refused.
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = Models(resolve_models(f"tiny,cutler={empty}"), torch.device("cpu"))
    assert "cutler" not in bare.hashes
    assert pipeline.effective_masker(pipeline.SynthOptions(), bare) == masks.resolve_masker_name("maskcut")
    note = pipeline.masker_note(pipeline.SynthOptions(), bare)
    assert "not the paper's recipe" in note and "ovdiff models fetch sd15" in note
    assert pipeline.masker_note(pipeline.SynthOptions(masker="maskcut"), bare) is None
    assert pipeline.masker_note(pipeline.SynthOptions(), models) is None
    with pytest.raises(ModelUnavailable, match="no checkpoint"):
        bare.check_available(["cutler"])
    with pytest.raises(ValueError, match="not a folder or a checkpoint file"):
        resolve_models(f"tiny,cutler={tmp_path / 'nope.pth'}")


def test_precision_choices(monkeypatch):
    from ovdiff_cli.models.loading import resolve_precision

    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    roles = ("sd", "clip", "prefilter", "dino", "cutler", "match")
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert set(cpu) == set(roles) and set(cpu.values()) == {f32}
    assert resolve_precision("fast", torch.device("cpu")) == cpu  # no fast half precision on the CPU
    assert resolve_precision("bf16", torch.device("cpu"))["sd"] == b16
    assert resolve_precision("bf16", torch.device("cpu"))["cutler"] == f32  # box math stays fp32
    assert resolve_precision("bf16", torch.device("cpu"))["match"] == f32
    # CUDA under auto: the reference's numerics (REFERENCE 1, 4, 6), written out role by role.
    cuda = torch.device("cuda")
    reference = {"sd": f16, "clip": f32, "prefilter": f16, "dino": f32, "cutler": f32, "match": f32}
    assert resolve_precision("auto", cuda) == reference
    assert resolve_precision("fp32", cuda) == dict.fromkeys(roles, f32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fast = {"sd": b16, "clip": b16, "prefilter": b16, "dino": f32, "cutler": f32, "match": f16}
    assert resolve_precision("fast", cuda) == fast
    assert resolve_precision("fp16", cuda) == dict.fromkeys(roles, f16) | {"cutler": f32}
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_bad_weight_files_never_make_or_reuse_a_cached_entry(tmp_path):
    """A real (tiny) CLIP folder loads; truncated or missing, the same command fails with one line, exit 2, and
    caches nothing; swapped for other weights of the same shape, it gets a new hash, so nothing is reused."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from ovdiff_cli.cache import Cache
    from ovdiff_cli.cli import app
    from ovdiff_cli.models.tiny import TINY_CLIP

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    tiny = Models(resolve_models("tiny"), torch.device("cpu")).get("clip")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, folder / "open_clip_model.safetensors")
    cache_dir = tmp_path / "cache"
    args = ["synth", "cat", "--models", f"tiny,clip={folder}", "--n", "1", "--steps", "1", "--k", "2"]
    args += ["--extractors", "clip", "--cache-dir", str(cache_dir), "--json", "-q"]
    runner = CliRunner()
    good = runner.invoke(app, args)
    assert good.exit_code == 0, good.output
    first = json.loads(good.stdout)
    assert first["models"]["hashes"]["clip"].startswith("local-")

    def banks() -> int:
        with Cache(cache_dir) as cache:
            return cache.info().get("bank", {}).get("entries", 0)

    assert banks() == 1
    weights = folder / "open_clip_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated: found before any work, from its header
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
    assert "CLIP ViT: weight file open_clip_model.safetensors is truncated" in bad.output
    # Whole but not what the network needs (another model's tensors): found before any work too, one line.
    save_file({"unrelated": torch.zeros(3)}, weights)
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
    assert "CLIP ViT: weight file open_clip_model.safetensors has no tensor 'positional_embedding'" in bad.output
    weights.unlink()  # missing
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "open_clip_model.safetensors is missing" in bad.output
    assert banks() == 1  # neither failure cached anything
    # Other weights of the same shape: a new hash, a new bank (the old one is not reused).
    swapped = {k: v + 1 if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    save_file({k: v.contiguous() for k, v in swapped.items()}, weights)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["models"]["hashes"]["clip"] != first["models"]["hashes"]["clip"]
    assert second["classes"][0]["digest"] != first["classes"][0]["digest"] and banks() == 2


# --- downloads that cannot hang (issue 13, item 2) -----------------------------------------------------------------


def test_downloads_give_up_on_a_silent_server(silent_server, monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import get_session
    from huggingface_hub.utils._http import default_client_factory

    from ovdiff_cli.cli.models import _download_failure
    from ovdiff_cli.models.fetching import _hub_client_with_timeouts, fetch, fetch_timeouts
    from ovdiff_cli.models.registry import Component

    monkeypatch.setenv("OVDIFF_FETCH_TIMEOUT", "0.5")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # loopback only: the silent server
    assert fetch_timeouts() == (0.5, 0.5)
    # The hub client: a request made with timeout=None, as huggingface_hub makes them, still gives up.
    _hub_client_with_timeouts()
    t0 = time.perf_counter()
    try:
        with pytest.raises(Exception) as info:
            get_session().get(silent_server + "/api/models/x", timeout=None)
    finally:
        set_client_factory(default_client_factory)
    assert time.perf_counter() - t0 < 5 and "timeout" in type(info.value).__name__.lower()
    # A checkpoint URL (CutLER's): urllib with the same bound; nothing half-written is left as the file.
    comp = Component("cutler", "detectron2", "cutler", url=silent_server + "/cutler_cascade_final.pth")
    t0 = time.perf_counter()
    with pytest.raises(OSError) as info:
        fetch(comp)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "weights" / "cutler" / "cutler_cascade_final.pth").exists()
    message = _download_failure(comp, info.value)
    assert "\n" not in message and "127.0.0.1" in message and "no answer within 0.5 s" in message
    monkeypatch.setenv("OVDIFF_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OVDIFF_FETCH_TIMEOUT='soon'"):
        fetch_timeouts()


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    from ovdiff_cli.models.loading import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OVDIFF_THREADS", raising=False)
        assert set_threads() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OVDIFF_THREADS", "2")
        assert set_threads() == 2 == torch.get_num_threads()
        assert set_threads(1) == 1  # --threads wins over the variable
        for bad, named in (("0", "OVDIFF_THREADS '0'"), ("two", "OVDIFF_THREADS 'two'")):
            monkeypatch.setenv("OVDIFF_THREADS", bad)
            with pytest.raises(ValueError, match=named):
                set_threads()
        with pytest.raises(ValueError, match="--threads 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_masker_auto_refuses_a_broken_cutler_checkpoint_instead_of_falling_back(tmp_path):
    """A CutLER checkpoint that is not there means MaskCut with a note; one that is there but cut short is an
    error naming it (falling back would hide it), unless the run does not use CutLER at all."""
    from typer.testing import CliRunner

    from ovdiff_cli.cli import app

    ckpt = tmp_path / "cutler.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-40])
    args = ["synth", "cat", "--models", f"tiny,cutler={ckpt}", "--n", "1", "--steps", "1", "--k", "2", "-q"]
    broken = CliRunner().invoke(app, args)
    assert broken.exit_code == 2 and broken.output.strip().splitlines() == [
        f"error: CutLER detector: weight file {ckpt} is truncated ({ckpt.stat().st_size:,} bytes; the checkpoint's"
        " zip directory is missing): pass a complete file with --models NAME,cutler=PATH"
    ]
    assert CliRunner().invoke(app, [*args, "--masker", "maskcut"]).exit_code == 0


# --- issue 16: other names, hints, incomplete folders, fetch --to -------------------------------------------------


def test_sd_commit_is_found_under_the_repository_s_other_names(hub_cache):
    spec = resolve_models("sd15")
    sd = spec.components["sd"]
    with pytest.raises(ModelUnavailable) as info:
        local_snapshot(sd)
    msg = str(info.value)
    assert "nor under runwayml/stable-diffusion-v1-5 or sd-legacy/stable-diffusion-v1-5" in msg
    assert "run `ovdiff models fetch sd15`" in msg  # the hint names the set to fetch
    snap = _fake_snapshot(hub_cache, "runwayml/stable-diffusion-v1-5", SD15_REVISION, list(ROLE_FILES["sd"]), ref=None)
    assert Path(local_snapshot(sd)).resolve() == snap.resolve()
    assert component_hash(sd).startswith(SD15_REVISION + "-")


def test_an_incomplete_folder_is_listed_as_incomplete_with_its_file(tmp_path):
    root = tmp_path / "clip"
    _tiny_clip_folder(root)
    comp = resolve_models(f"tiny,clip={root}").components["clip"]
    assert presence(comp) == "present"
    weights = root / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    status = presence(comp)
    assert status.startswith("incomplete: open_clip_model.safetensors is truncated (") and str(root) in status
    weights.unlink()
    assert presence(comp) == f"missing: open_clip_model.safetensors is missing in {root}"


def test_models_list_piped_prints_whole_values():
    from typer.testing import CliRunner

    from ovdiff_cli.cli import app

    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    sd = next(r for r in rows if r[:2] == ["sd15", "Stable Diffusion"])
    assert sd == ["sd15", "Stable Diffusion", f"stable-diffusion-v1-5/stable-diffusion-v1-5@{SD15_REVISION}", "missing"]


def test_fetch_to_hard_links_or_copies_and_replaces_dangling_links(hub_cache, tmp_path):
    from ovdiff_cli.models.fetching import lay_out

    dino = resolve_models("sd15").components["dino"]
    snap = _fake_snapshot(hub_cache, "timm/vit_base_patch8_224.dino", "ab" * 20, ["model.safetensors", "config.json"])
    target = tmp_path / "layout" / "dino"
    target.parent.mkdir()
    target.symlink_to(tmp_path / "gone", target_is_directory=True)  # left by an older `--to`: points nowhere
    said = lay_out(dino, snap, target)
    assert said == f"{target}: 2 files (2 hard-linked)"
    assert not target.is_symlink() and all(not (target / n).is_symlink() for n in ("model.safetensors", "config.json"))
    assert (target / "model.safetensors").read_bytes() == (snap / "model.safetensors").read_bytes()
    assert lay_out(dino, snap, target) == f"{target}: 2 files (2 already there)"
    linked = tmp_path / "linked"
    assert lay_out(dino, snap, linked, link=True) == f"{linked}: 2 files (2 symlinked)"
    assert (linked / "config.json").is_symlink() and (linked / "config.json").exists()
    # The laid-out folder is a model folder: --models NAME,dino=PATH reads it.
    assert weight_files(resolve_models(f"sd15,dino={target}").components["dino"])


def test_clip_from_a_folder_runs_quickgelu_even_when_its_config_forgets_it(tmp_path, monkeypatch):
    """OpenAI's CLIP weights were trained with QuickGELU: a folder holding them (known by the weight file's sha256,
    as sd15 registers its pinned file) whose config lacks `quick_gelu` must not load them under plain GELU."""
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    from ovdiff_cli.models.registry import QUICK_GELU_WEIGHTS
    from ovdiff_cli.models.tiny import TINY_CLIP

    folder = tmp_path / "clip"
    folder.mkdir()
    assert "quick_gelu" not in TINY_CLIP
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    tiny = Models(resolve_models("tiny"), torch.device("cpu")).get("clip")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, folder / "open_clip_model.safetensors")
    digest = hashlib.sha256((folder / "open_clip_model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setitem(QUICK_GELU_WEIGHTS, digest, "OpenAI's, for this test")
    clip = Models(resolve_models(f"tiny,clip={folder}"), torch.device("cpu")).get("clip")
    acts = [type(m) for m in clip.modules() if isinstance(m, QuickGELU | torch.nn.GELU)]
    assert acts and set(acts) == {QuickGELU}


# --- issue 15: real weights straight from their files, without a random initialisation first -----------------------


def _tiny_clip_folder(folder: Path) -> torch.nn.Module:
    """A CLIP folder (open_clip's config and safetensors) holding the tiny set's CLIP; returns that CLIP."""
    from safetensors.torch import save_file

    from ovdiff_cli.models.tiny import TINY_CLIP

    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    tiny = Models(resolve_models("tiny"), torch.device("cpu")).get("clip")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, folder / "open_clip_model.safetensors")
    return tiny


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert list(sa) == list(sb)
    for name in sa:
        assert not sa[name].is_meta and sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clip_from_a_folder_equals_open_clips_own_loading(tmp_path, precision):
    """Built without initialisation and filled by open_clip's own loader: the same parameters, buffers (the causal
    mask, which no checkpoint holds) and, to rounding, embeddings as open_clip's create_model gives."""
    import open_clip

    _tiny_clip_folder(tmp_path / "clip")
    models = Models(resolve_models(f"tiny,clip={tmp_path / 'clip'}"), torch.device("cpu"), precision)
    clip = models.get("clip")
    lp = {"fp32": "fp32", "bf16": "pure_bf16"}[precision]
    # Its config says no quick_gelu: both follow it (GELU), as open_clip does for any folder.
    ref = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}", precision=lp).eval()
    _assert_same_state(clip, ref)
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    ids = torch.randint(0, 49408, (2, 77))
    images = torch.rand(2, 3, 64, 64, dtype=models.dtype("clip"))
    # Not bit for bit: our weights are the checkpoint's tensors (assign=True), not 64-byte aligned like open_clip's
    # copies, so kernels may round otherwise (1e-6 in fp32, a bf16 ulp); GELU for QuickGELU moves fp32 ones by 1e-2,
    # dropping the causal mask moves either by 2.
    tol = {"fp32": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 2e-2}}[precision]
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(ids), ref.encode_text(ids), **tol)
        torch.testing.assert_close(clip.encode_image(images), ref.encode_image(images), **tol)


def test_dino_from_a_folder_equals_timms_own_loading_and_initialises_nothing(tmp_path, monkeypatch):
    """A timm ViT read from its safetensors file into a model built on the meta device: every Linear layer's random
    initialisation runs on meta tensors (free), and the result equals timm's own pretrained loading."""
    import timm
    from safetensors.torch import save_file

    from ovdiff_cli.extractors.dino import vit_keys
    from ovdiff_cli.models.registry import Component

    arch = "vit_small_patch16_224.dino"
    torch.manual_seed(0)
    source = timm.create_model(arch, pretrained=False, num_classes=0)
    (tmp_path / "dino").mkdir()
    weights = tmp_path / "dino" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    comp = Component("dino", "timm", arch, local=str(tmp_path / "dino"))

    initialised: list[bool] = []
    reset = torch.nn.Linear.reset_parameters

    def recording_reset(self: torch.nn.Linear) -> None:
        initialised.append(not self.weight.is_meta)
        reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", recording_reset)
    vit = loading.load_dino(comp, torch.device("cpu"), torch.float32)
    assert initialised and not any(initialised)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", reset)
    ref = timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, num_classes=0, dynamic_img_size=True
    ).eval()
    _assert_same_state(vit, ref)
    _assert_same_state(vit, source)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    images = torch.rand(2, 3, 96, 128)
    # Not bit for bit: our weights are the file's tensors (assign=True), not 64-byte aligned like timm's copies, so
    # kernels may round otherwise (1e-6); 1.01 x block 0's LayerNorm weight moves these keys (up to 1.5) by 6e-3.
    with torch.no_grad():
        torch.testing.assert_close(vit_keys(vit, images), vit_keys(ref, images), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_that_leaves_a_parameter_empty_is_refused():
    """A library loader that skipped a parameter would leave it on the meta device (no values at all): refused,
    naming it, instead of failing later in a forward pass."""
    model = without_init(lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)))
    partial_state = {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"toy: the checkpoint has no values for 1\.weight, 1\.bias"):
        loading._assign_from(model, lambda m: m.load_state_dict(partial_state, strict=False), "toy")
    full = {**partial_state, "1.weight": torch.full((1, 2), 2.0), "1.bias": torch.ones(1)}
    model = loading._assign_from(model, lambda m: m.load_state_dict(full, strict=True), "toy")
    assert torch.equal(model(torch.ones(1, 3)), torch.tensor([[13.0]]))  # hidden units 3 and 3, then 2 * 3 + 2 * 3 + 1
    assert "load_state_dict" not in vars(model)  # the instance is left as it was
