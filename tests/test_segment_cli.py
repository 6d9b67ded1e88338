"""``ovdiff segment`` end to end on CPU with the tiny models, through CliRunner and a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from planted import TINY_SEGMENT
from typer.testing import CliRunner

from ovdiff_cli.cli import app

runner = CliRunner()
FAST = TINY_SEGMENT


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One cache for the module: prototypes are synthesised by the first test that needs them."""
    return str(tmp_path_factory.mktemp("segment-cache"))


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder with a subfolder, a CMYK JPEG, a 16-bit PNG and a corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8)).save(root / "sub" / "b.png")
    Image.new("CMYK", (40, 64), (0, 200, 200, 0)).save(root / "sub" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (48, 48), dtype=np.uint16)).save(root / "sub" / "deep.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def segment(cache_dir: str, *args: str, env: dict | None = None):
    return runner.invoke(app, ["segment", *FAST, "--cache-dir", cache_dir, *args], env=env)  # args override FAST


def outputs_of(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


EXPECTED = {"a", "sub/b", "sub/cmyk", "sub/deep"}


def test_folder_end_to_end(cache_dir, photos, tmp_path):
    out = tmp_path / "out"
    result = segment(cache_dir, str(photos), "--classes", "cat,sky", "--out", str(out), "--scores", "--json")
    assert result.exit_code == 1, result.output  # one file failed, the rest were segmented
    doc = json.loads(result.stdout)
    assert doc["images"] == {"total": 5, "done": 4, "skipped": 0, "failed": 1}
    assert doc["failed"][0]["path"].endswith("broken.jpg") and "corrupt" in doc["failed"][0]["reason"]
    assert sum(doc["time_fractions"].values()) == pytest.approx(1, abs=0.01)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "1 of 5 images failed" in errors[1]

    suffixes = (".png", "_overlay.jpg", "_scores.npz")
    assert outputs_of(out) == {"legend.json"} | {name + s for name in EXPECTED for s in suffixes}
    legend = json.loads((out / "legend.json").read_text())
    assert [v["name"] for v in legend.values()] == ["background", "cat", "sky"]
    assert legend["2"]["type"] == "stuff" and legend["1"]["type"] == "thing"
    for name, source in [("a", "a.jpg"), ("sub/b", "sub/b.png"), ("sub/cmyk", "sub/cmyk.jpg")]:
        labels = Image.open(out / f"{name}.png")
        assert labels.mode == "P" and labels.size == Image.open(photos / source).size
        lab = np.array(labels)
        assert set(np.unique(lab)) <= {0, 1, 2}
        with np.load(out / f"{name}_scores.npz") as d:
            assert d["scores"].shape == (3, *lab.shape) and d["names"].tolist() == ["background", "cat", "sky"]
            # the label map is the argmax of the scores (float16 storage can only break near-exact ties)
            assert (d["scores"].astype(np.float32).argmax(0) == lab).mean() > 0.99
            assert all(d["kept"][i] for i in np.unique(lab))  # only kept classes win
        # as wide as the image, or wider where a legend name would not fit (cmyk.jpg is 40 pixels wide)
        assert Image.open(out / f"{name}_overlay.jpg").size[0] >= labels.size[0]


def test_rerun_skips_existing_and_overwrite_redoes(cache_dir, photos, tmp_path):
    out = tmp_path / "out"
    args = [str(photos), "--classes", "cat,sky", "--out", str(out), "--json"]
    assert segment(cache_dir, *args).exit_code == 1
    before = {p: (out / p).stat().st_mtime_ns for p in outputs_of(out)}
    (out / "sub" / ".b.png.tmp-999-deadbeef").write_bytes(b"half-written by a killed run")
    again = json.loads(segment(cache_dir, *args).stdout)
    assert again["images"] == {"total": 5, "done": 0, "skipped": 4, "failed": 1}
    assert {p: (out / p).stat().st_mtime_ns for p in outputs_of(out)} == before  # temp file removed, rest untouched
    (out / "a.png").unlink()
    assert json.loads(segment(cache_dir, *args).stdout)["images"]["done"] == 1  # only the incomplete image
    redo = json.loads(segment(cache_dir, *args, "--overwrite").stdout)
    assert redo["images"]["done"] == 4 and redo["images"]["skipped"] == 0


def test_shards_cover_every_image_once(cache_dir, photos, tmp_path):
    seen = []
    for k in range(3):
        out = tmp_path / f"out{k}"
        result = segment(cache_dir, str(photos), "--classes", "cat,sky", "--out", str(out), "--shard", f"{k}/3")
        assert result.exit_code in (0, 1), result.output
        seen += [p.removesuffix(".png") for p in outputs_of(out) if p.endswith(".png")]
    assert sorted(seen) == sorted(EXPECTED)  # broken.jpg belongs to one shard and fails there
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    out = tmp_path / "slurm"
    slurm = segment(cache_dir, str(photos), "--classes", "cat,sky", "--out", str(out), env=env)
    assert outputs_of(out) - {"legend.json"} == outputs_of(tmp_path / "out1") - {"legend.json"}
    # The summary says where the shard came from.
    origin = "SLURM array (SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=3)"
    assert f"; shard 1/3 from {origin}: 2 of 5 images" in slurm.stdout, slurm.stdout


def test_no_background_pamr_and_no_overlay(cache_dir, photos, tmp_path):
    out = tmp_path / "out"
    args = ["--classes", "cat,sky", "--out", str(out), "--no-background", "--pamr", "--no-overlay", "--no-filter"]
    result = segment(cache_dir, str(photos / "a.jpg"), str(photos / "sub"), *args)
    assert result.exit_code == 0, result.output
    assert "4 segmented, 0 skipped, 0 failed of 4 images" in result.stdout
    assert not any(p.endswith("_overlay.jpg") for p in outputs_of(out))
    assert "0" not in json.loads((out / "legend.json").read_text())
    assert set(np.unique(np.array(Image.open(out / "a.png")))) <= {1, 2}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["{photos}", "--classes", "cat", "--scales", "450"], ["--scales 450", "multiples of 16"]),
        (["{photos}", "--classes", "cat", "--short-side", "32"], ["--scales 64", "--short-side 32"]),
        (["{photos}/nope", "--classes", "cat"], ["nope", "no such file"]),
        (["{photos}"], ["no classes"]),
        (["{photos}", "--classes", "cat,,dog"], ["empty item"]),
        (["{photos}", "--classes", "cat", "--shard", "3/2"], ["--shard 3/2"]),
        (["{photos}", "--classes", "cat", "--extractors", "sift"], ["sift"]),
    ],
)
def test_usage_errors_are_one_line(cache_dir, photos, tmp_path, args, needles):
    args = [a.replace("{photos}", str(photos)) for a in args]
    result = segment(cache_dir, *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(n in lines[0] for n in needles), lines[0]


def test_out_is_a_file_and_other_vocabulary(cache_dir, photos, tmp_path):
    (tmp_path / "file").write_text("x")
    result = segment(cache_dir, str(photos / "a.jpg"), "--classes", "cat", "--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "not a folder" in result.output
    out = tmp_path / "out"
    assert segment(cache_dir, str(photos / "a.jpg"), "--classes", "cat,sky", "--out", str(out)).exit_code == 0
    other = segment(cache_dir, str(photos / "a.jpg"), "--classes", "dog", "--out", str(out))
    assert other.exit_code == 2 and "other classes" in other.output
    # --overwrite with the new classes: the image's files all come from the new run, none left from the old one.
    one = segment(cache_dir, str(photos / "a.jpg"), "--classes", "cat,sky", "--out", str(out), "--scores")
    assert one.exit_code == 0 and outputs_of(out) == {"legend.json", "a.png", "a_overlay.jpg", "a_scores.npz"}
    args = ["--classes", "dog", "--out", str(out), "--overwrite", "--no-overlay"]
    new = segment(cache_dir, str(photos / "a.jpg"), *args)
    assert new.exit_code == 0 and outputs_of(out) == {"legend.json", "a.png"}
    assert [v["name"] for v in json.loads((out / "legend.json").read_text()).values()] == ["background", "dog"]


def test_real_subprocess_json(cache_dir, photos, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ovdiff_cli", "segment", str(photos / "sub"), "--classes", "cat,sky"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), *FAST, "--cache-dir", cache_dir, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["images"]["done"] == 3 and doc["images_per_second"] > 0
    assert outputs_of(out) == {"legend.json"} | {
        f"{n}{s}" for n in ("b", "cmyk", "deep") for s in (".png", "_overlay.jpg")
    }


SLOTS = """
import sys, torch, torch.nn.functional as F
from ovdiff_cli.cli import _environment
if sys.argv[1] == "cli":
    _environment(["ovdiff", "segment"])
torch.manual_seed(0)
torch.set_num_threads(2)
q = torch.randn(1, 8, 1, 8).expand(8, -1, -1, -1).contiguous()
k = torch.randn(1, 8, 77, 8).expand(8, -1, -1, -1).contiguous()
o = F.scaled_dot_product_attention(q, k, k)
print(all(torch.equal(o[b], o[0]) for b in range(8)))
"""


def test_the_cli_makes_attention_round_the_same_in_every_batch_slot():
    """The cause of two copies of an image getting scores 1e-7 apart: torch's fused CPU attention splits a batch
    between threads, each with a scratch buffer at its own alignment, and MKL's default small matrix products round
    by alignment (here: one query, as in the tiny UNet's 1x1 middle block). The CLI's environment turns on MKL's
    strict reproducible mode before torch loads; a fresh process shows the effect with and without it."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    runs = {
        mode: subprocess.run([sys.executable, "-c", SLOTS, mode], capture_output=True, text=True, timeout=120, env=env)
        for mode in ("cli", "bare")
    }
    assert runs["cli"].returncode == 0, runs["cli"].stderr
    assert runs["cli"].stdout.split() == ["True"]
    if runs["bare"].stdout.split() == ["True"]:
        pytest.skip("this torch build rounds the same in every slot even without MKL's strict mode")


def test_two_copies_of_an_image_in_other_batch_slots_get_the_same_labels(cache_dir, tmp_path):
    """End to end: eight 64x85 images make one group; each adds (2, 6, 1) windows of sizes 64, 48 and whole, so
    the whole-image windows share one batch of 8 in file order, and the copies s3 and s7 sit in slots 3 and 7 (on
    two threads, the two threads' halves of the batch). Their label maps and stored scores are equal."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "eight"
    folder.mkdir()
    images = [rng.integers(0, 255, (64, 85, 3), dtype=np.uint8) for _ in range(8)]
    images[7] = images[3]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"s{i}.png")
    cmd = [sys.executable, "-m", "ovdiff_cli", "segment", str(folder), "--classes", "cat,sky", "--no-filter"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [*cmd, "--out", str(out), *FAST, "--cache-dir", cache_dir, "--scores", "--no-overlay"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(out / "s3_scores.npz") as a, np.load(out / "s7_scores.npz") as b:
        assert np.array_equal(a["scores"], b["scores"])
    assert np.array_equal(np.array(Image.open(out / "s3.png")), np.array(Image.open(out / "s7.png")))
