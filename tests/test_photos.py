"""The user's own photos in a class's support set (``--photos`` / ``--photo-masks``): the three routes to their
masks, keys by content, mixed support sets, explain, and bad input (CPU, tiny models)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from ovdiff_cli import photos, pipeline
from ovdiff_cli.cache import Cache
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.cli import app
from ovdiff_cli.explain import _support_regions
from ovdiff_cli.masks import MaskCutMasker
from ovdiff_cli.pipeline.keys import photo_key
from ovdiff_cli.pipeline.support import load_entry
from ovdiff_cli.pipeline.synth import cached_banks, photo_sets
from ovdiff_cli.prototypes import PrototypeBank, masks_on_grid

runner = CliRunner()
# Photos only, one cheap extractor, masks from the user or a masker that needs no detector.
FAST = ["--models", "tiny", "--k", "3", "--n", "0", "--extractors", "dino", "--masker", "maskcut"]
LIB = {"n": 0, "k": 3, "extractors": ("dino",), "masker": "maskcut"}
SIZE, GRID = 64, 8  # the tiny models' support images and feature grid
NO_MASK = "no mask found (the masker found no object on it); give it a mask with --photo-masks"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(folder: Path, name: str, rect: tuple[int, int, int, int], masks: Path | None = None, seed: int = 0):
    """A 96 x 72 noise photo with a red rectangle (rows y0:y1, cols x0:x1), and its mask (255 = the rectangle)."""
    y0, y1, x0, x1 = rect
    image = np.random.default_rng(seed).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    image[y0:y1, x0:x1] = (220, 30, 30)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)
    if masks is not None:
        mask = np.zeros((72, 96), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 255
        masks.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(masks / f"{Path(name).stem}.png")


def synth_lib(cache: Cache, models, folder: Path, masks: Path | None = None, **opts):
    """synthesize one class "mug" with these photos, as the CLI does (photos listed first)."""
    options = pipeline.SynthOptions(**{**LIB, **opts})
    [spec] = photo_sets([ClassSpec("mug", photos=folder, photo_masks=masks)], options, models)
    return pipeline.synthesize([spec], options, models, cache)[0], spec, options


def banks(cache_dir: Path, name: str = "mug") -> list[PrototypeBank]:
    with Cache(cache_dir) as cache:
        return [PrototypeBank.from_bytes(cache.get("bank", b.key)) for b in cached_banks(cache, name)]


def stored(cache_dir: Path, stage: str) -> int:
    """How many entries of ``stage`` the cache holds (0 when it was never created)."""
    if not cache_dir.exists():
        return 0
    with Cache(cache_dir) as cache:
        return len(cache.listing(stage))


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def tsv(text: str) -> list[list[str]]:
    rows = [line.split("\t") for line in text.splitlines()]
    assert rows and all(len(r) == len(rows[0]) for r in rows), text
    return rows


def cells(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    out = torch.zeros(GRID, GRID, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


# --- route 1: the user's masks ---------------------------------------------------------------------------------------

# Rectangles on the 96 x 72 photo and, worked out by hand, their cells on the 8 x 8 grid. Fitting to 64 x 64 with
# nearest neighbour takes source row floor((y + .5) * 1.125) and column floor((x + .5) * 1.5): a.png's object is
# support rows 20..43 and columns 16..47, b.png's rows 8..39 and columns 36..63 (the right border). A grid cell i
# samples pixels 8i+3 and 8i+4 (bilinear, weight 1/2 each) and is on where any sampled pixel is set (threshold 0).
# a.png's object begins on row 20 = 8*2+4 and ends on row 43 = 8*5+3, b.png's begins on column 36 = 8*4+4: the bg
# pixels next to them (rows 19 and 44, column 35) are what the erosion removes, so those cells are fg only.
PLANTED = {
    "a.png": ((22, 49, 24, 72), cells(2, 6, 2, 6)),
    "b.png": ((9, 45, 54, 96), cells(1, 5, 4, 8)),
}


def test_user_masks_are_the_banks_fg_and_their_eroded_complement_its_bg(tmp_path, tiny_models):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    for seed, (name, (rect, _)) in enumerate(PLANTED.items()):
        plant(folder, name, rect, masks, seed=seed)
    with Cache(tmp_path / "c") as cache:
        result, _, _ = synth_lib(cache, tiny_models, folder, masks, extractors=("sd", "dino", "clip"))
    bank = result.bank
    # support-set order is by content: sha256 of the bytes
    expected = sorted(
        ({"file": n, "sha256": sha(folder / n), "route": "user", "mask": "user"} for n in PLANTED),
        key=lambda m: m["sha256"],
    )
    assert bank.meta["photos"] == expected and bank.meta["n"] == 0
    assert (result.generated, result.photos, result.photos_computed, result.photos_skipped) == (0, 2, 2, [])
    for i, record in enumerate(bank.meta["photos"]):
        want = PLANTED[record["file"]][1]
        # The same by computation: the mask fitted with nearest, the rest eroded once with a 3x3 cross (border set).
        raw = np.array(Image.open(masks / record["file"])) != 0
        fitted = np.asarray(Image.fromarray(raw.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.NEAREST))
        fg = torch.from_numpy(fitted == 1)
        bg = torch.from_numpy(
            ndimage.binary_erosion(fitted == 0, ndimage.generate_binary_structure(2, 1), border_value=1)
        )
        fg_grid, bg_grid = masks_on_grid(fg[None], (GRID, GRID))[0], masks_on_grid(bg[None], (GRID, GRID))[0]
        assert torch.equal(fg_grid, want) and torch.equal(bg_grid, ~want)
        assert bool((masks_on_grid(~fg[None], (GRID, GRID))[0] & want).any())  # without the erosion they would touch
        for name, protos in bank.extractors.items():
            assert protos.grid == (GRID, GRID), name
            assert torch.equal(protos.fg_masks[i], want), (name, record["file"])
            assert torch.equal(protos.bg_masks[i], ~want), (name, record["file"])
            instances = protos.select(kinds="instance")
            assert sorted(set(protos.image[instances].tolist())) == [0, 1]  # both photos gave prototypes


# --- route 2: attribution on the photo -------------------------------------------------------------------------------


def test_photos_without_masks_get_the_attribution_of_the_photo_itself(tmp_path, tiny_models):
    folder = tmp_path / "mug"
    plant(folder, "a.png", (10, 40, 20, 60), seed=1)
    plant(folder, "b.png", (30, 70, 0, 50), seed=2)
    with Cache(tmp_path / "c") as cache:
        result, spec, opts = synth_lib(cache, tiny_models, folder, masker="threshold")
        keys = pipeline.class_keys(tiny_models, spec, opts)[0]
        entries = [load_entry(cache, k) for k in keys]
    assert keys == result.bank.support_keys and len(keys) == 2
    assert [m["mask"] for m in result.bank.meta["photos"]] == ["attribution", "attribution"]
    gen = tiny_models.get("sd", decoder=False)
    for entry, record in zip(entries, result.bank.meta["photos"], strict=True):
        fitted = np.array(
            Image.open(folder / record["file"]).convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        )
        assert entry.photo and entry.mask is None and np.array_equal(entry.image, fitted)
        assert not entry.residual.any()  # a photo's bytes are exact
        attr = entry.attribution
        assert attr.shape == (GRID, GRID) and attr.dtype == np.float32
        assert attr.min() == 0 and attr.max() == 1  # min-max normalised
        direct = photos.attribute(gen, "mug", torch.from_numpy(fitted).permute(2, 0, 1)[None])[0].numpy()
        # The run attributed both photos in one batch, this one alone: CPU kernels change the last bits (~4e-6).
        np.testing.assert_allclose(attr, direct, rtol=0, atol=1e-4)


# --- route 3: no object proposal -------------------------------------------------------------------------------------


def test_a_photos_map_does_not_depend_on_the_photos_attributed_with_it(tmp_path, tiny_models):
    """Attribution runs one photo at a time: a photo added later gets the same bytes as when it came with the
    others (in a batch its map's last bits would depend on its slot), and so does the bank."""
    folder = tmp_path / "mug"
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        plant(folder, name, (10 + 5 * i, 50, 20, 70), seed=10 + i)
    with Cache(tmp_path / "together") as cache:
        together, spec, _ = synth_lib(cache, tiny_models, folder, batch_size=4)
        keys = pipeline.class_keys(tiny_models, spec, pipeline.SynthOptions(**{**LIB, "batch_size": 4}))[0]
        entries = {k: cache.get("support", k) for k in keys}
    assert together.photos_computed == 3
    (folder / "c.png").rename(tmp_path / "c.png")
    with Cache(tmp_path / "apart") as cache:
        assert synth_lib(cache, tiny_models, folder, batch_size=4)[0].photos_computed == 2
        (tmp_path / "c.png").rename(folder / "c.png")
        apart = synth_lib(cache, tiny_models, folder, batch_size=4)[0]
        assert apart.photos_computed == 1
        assert {k: cache.get("support", k) for k in keys} == entries  # byte for byte
    assert apart.digest == together.digest


def test_a_photo_without_any_proposal_is_named_and_left_out(tmp_path, monkeypatch):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    plant(folder, "masked.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "bare.png", (30, 70, 0, 50), seed=2)  # no mask: attribution, then MaskCut's proposals

    def nothing(self, attribution, features=None, images=None):
        return [torch.zeros((0, *attribution.shape[1:]), dtype=torch.bool) for _ in range(attribution.shape[0])]

    monkeypatch.setattr(MaskCutMasker, "propose", nothing)
    result = invoke("synth", "mug", "--photos", str(folder), "--photo-masks", str(masks), *FAST, "--json")
    assert result.exit_code == 1, result.output
    assert f"warning: mug: photo bare.png left out: {NO_MASK}" in lines(result.stderr)
    assert "masked.png" not in result.stderr
    [doc] = json.loads(result.stdout)["classes"]
    assert doc["support"] == {"generated": 0, "photos": 1} and doc["photos_computed"] == 2
    assert doc["photos_skipped"] == [{"file": "bare.png", "reason": NO_MASK}]
    [bank] = banks(tmp_path / "cache")
    records = {m["file"]: (i, m) for i, m in enumerate(bank.meta["photos"])}
    assert records["bare.png"][1] == {
        "file": "bare.png",
        "sha256": sha(folder / "bare.png"),
        "route": "attribution",
        "mask": "none",
    }
    assert records["masked.png"][1]["mask"] == "user"
    bare, masked = records["bare.png"][0], records["masked.png"][0]
    protos = bank["dino"]
    assert not protos.fg_masks[bare].any() and not protos.bg_masks[bare].any()
    assert protos.image[protos.select(kinds="instance")].tolist() == [masked, masked]  # its fg and bg instance
    # The closing line counts one photo as one photo (outputs.count_noun), not "1 photos were".
    assert lines(result.stderr)[-1].startswith("error: 1 photo was left out"), result.stderr


# --- keys by content -------------------------------------------------------------------------------------------------


def test_photos_are_keyed_by_content_not_by_name(tmp_path, tiny_models):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        plant(folder, name, (10 + 5 * seed, 50, 20, 70), masks, seed=seed)
    with Cache(tmp_path / "c") as cache:
        first, _, _ = synth_lib(cache, tiny_models, folder, masks)
        assert (first.photos_computed, first.photos, first.bank_cached) == (3, 3, False)

        # Renamed (photo and mask): nothing is computed, the same bank, shown under the new name.
        (folder / "a.png").rename(folder / "renamed.png")
        (masks / "a.png").rename(masks / "renamed.png")
        moved, _, _ = synth_lib(cache, tiny_models, folder, masks)
        assert (moved.photos_computed, moved.bank_cached, moved.digest) == (0, True, first.digest)
        names = [m["file"] for m in moved.bank.meta["photos"]]
        assert sorted(names) == ["b.png", "c.png", "renamed.png"]
        index = names.index("renamed.png")
        assert [m["sha256"] for m in moved.bank.meta["photos"]] == [m["sha256"] for m in first.bank.meta["photos"]]
        protos = moved.bank["dino"]
        [own] = [p for p in protos.select("fg", "instance").tolist() if int(protos.image[p]) == index]
        [region] = _support_regions(protos.support_pixels(own), moved.bank, SIZE)
        assert (region.photo, region.sha256, region.label) == (
            "renamed.png",
            sha(folder / "renamed.png"),
            "photo renamed.png",
        )

        # One pixel of one photo changed: that photo alone is computed again, into a new bank.
        pixels = np.array(Image.open(folder / "b.png"))
        pixels[0, 0, 0] ^= 1
        Image.fromarray(pixels).save(folder / "b.png")
        edited, _, _ = synth_lib(cache, tiny_models, folder, masks)
        assert (edited.photos_computed, edited.bank_cached) == (1, False)
        assert edited.digest != first.digest
        assert sha(folder / "b.png") in [m["sha256"] for m in edited.bank.meta["photos"]]

        # One photo removed: a new bank from the others' cached entries, nothing computed.
        gone = [m["file"] for m in edited.bank.meta["photos"]].index("c.png")
        (folder / "c.png").unlink()
        fewer, _, _ = synth_lib(cache, tiny_models, folder, masks)
        assert (fewer.photos_computed, fewer.bank_cached, fewer.photos) == (0, False, 2)
        assert fewer.digest not in (first.digest, edited.digest)
        assert fewer.bank.support_keys == [k for i, k in enumerate(edited.bank.support_keys) if i != gone]


# --- generated images and photos together ----------------------------------------------------------------------------


def test_generated_images_then_photos(tmp_path, tiny_models):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    plant(folder, "a.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "b.png", (30, 70, 0, 50), masks, seed=2)
    args = ["synth", "mug", "--photos", str(folder), "--photo-masks", str(masks), *FAST, "--n", "2", "--steps", "2"]
    args += ["--batch-size", "2", "--masker", "threshold"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    [doc] = json.loads(result.stdout)["classes"]
    assert doc["support"] == {"generated": 2, "photos": 2}
    assert (doc["images_generated"], doc["photos_computed"], doc["photos_skipped"]) == (2, 2, [])

    opts = pipeline.SynthOptions(n=2, steps=2, batch_size=2, k=3, extractors=("dino",), masker="threshold")
    listed = photos.list_photos(folder, masks)
    assert sorted(p.digest for p in listed.photos) == sorted(sha(folder / n) for n in ("a.png", "b.png"))
    by_content = sorted(listed.photos, key=lambda p: p.digest)
    want = [pipeline.support_key(tiny_models, "mug", i, opts) for i in range(2)]
    want += [photo_key(tiny_models, "mug", p) for p in by_content]
    [bank] = banks(tmp_path / "cache")
    assert bank.support_keys == want and len(set(want)) == 4
    assert [m["file"] for m in bank.meta["photos"]] == [p.name for p in by_content]
    with Cache(tmp_path / "cache") as cache:
        assert [load_entry(cache, k).photo for k in want] == [False, False, True, True]

    listing = invoke("cache", "ls", "--json")
    assert listing.exit_code == 0, listing.output
    [row] = json.loads(listing.stdout)["banks"]
    assert (row["class"], row["n"], row["photos"]) == ("mug", 2, 2)
    table = tsv(invoke("cache", "ls").stdout)
    assert dict(zip(table[0], table[1], strict=True))["photos"] == "2" and "generated" in table[0]

    again = invoke(*args)  # all cached now: the table (off a terminal: tab-separated)
    assert again.exit_code == 0, again.output
    rows = tsv(again.stdout)
    assert "photos" in rows[0]
    row = dict(zip(rows[0], rows[1], strict=True))
    assert (row["class"], row["images new"], row["images cached"], row["photos"]) == ("mug", "0", "2", "2")


# --- classes without support, classes files, several classes ---------------------------------------------------------


def test_photo_options_and_classes_file_columns(tmp_path):
    no_support = invoke("synth", "mug", "--n", "0", "--models", "tiny")
    assert no_support.exit_code == 2 and len(lines(no_support.output)) == 1, no_support.output
    assert lines(no_support.output)[0].startswith("error: class 'mug': no photos and --n 0")

    top = tmp_path / "project"
    plant(top / "pics", "a.png", (10, 40, 20, 60), top / "pic-masks", seed=1)
    plant(top / "pics", "b.png", (30, 70, 0, 50), top / "pic-masks", seed=2)
    by_options = invoke(
        "synth", "mug", "--photos", str(top / "pics"), "--photo-masks", str(top / "pic-masks"), *FAST, "--json"
    )
    assert by_options.exit_code == 0, by_options.output
    classes = top / "classes.txt"
    classes.write_text("# photos only\nmug\tphotos:pics\tmasks:pic-masks\tn:0\n", encoding="utf-8")
    # No --n: the file's n:0 (the default is 32); its folders are relative to the file, not to the working folder.
    no_n = [*FAST[:4], *FAST[6:]]
    assert "--n" not in no_n
    by_file = invoke("synth", "--classes-file", str(classes), *no_n, "--json")
    assert by_file.exit_code == 0, by_file.output
    [a], [b] = json.loads(by_options.stdout)["classes"], json.loads(by_file.stdout)["classes"]
    assert a["support"] == b["support"] == {"generated": 0, "photos": 2}
    assert (b["digest"], b["photos_computed"], b["images_generated"]) == (a["digest"], 0, 0)
    assert len(banks(tmp_path / "cache")) == 1

    two = invoke("synth", "mug", "cup", "--photos", str(top / "pics"), "--models", "tiny")
    assert two.exit_code == 2 and len(lines(two.output)) == 1 and "CLASS=DIR" in two.output, two.output
    # mug= goes to mug only: cup is the class left without any support image
    named = invoke("synth", "mug", "cup", "--photos", f"mug={top / 'pics'}", "--n", "0", "--models", "tiny")
    assert named.exit_code == 2, named.output  # (one line or not: see the "no usable photo" case below)
    assert lines(named.output)[-1].startswith("error: class 'cup': no photos and --n 0"), named.output
    other = invoke("synth", "mug", "cup", "--photos", f"bowl={top / 'pics'}", "--models", "tiny")
    assert other.exit_code == 2 and "'bowl' is not one of the classes (mug, cup)" in other.output, other.output


# --- bad input -------------------------------------------------------------------------------------------------------


def _bad_folder(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(the photo options, the error line's text) of one kind of bad input."""
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    folder.mkdir()
    if case == "empty":
        return ["--photos", str(folder)], f"error: --photos {folder}: no image files in it"
    if case == "no images":
        (folder / "notes.txt").write_text("photos of my mug")
        (folder / "list.json").write_text("[]")
        return ["--photos", str(folder)], f"error: --photos {folder}: no image files in it"
    if case == "missing":
        return ["--photos", str(tmp_path / "nope")], f"error: --photos {tmp_path / 'nope'}: no such folder"
    if case == "no usable photo":
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((7, 30, 3), dtype=np.uint8)).save(folder / name)
        return ["--photos", str(folder)], (
            f"error: class 'mug': none of the 2 files in {folder} is a usable photo (a.png: 30 x 7 pixels, smaller"
            " than the 8 x 8 feature grid) and --n 0 generates no image"
        )
    # Two photos with masks, listed in name order; the bad mask is the first one's or the one listed after a good one.
    plant(folder, "a.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "b.png", (30, 70, 0, 50), masks, seed=2)
    options = ["--photos", str(folder), "--photo-masks", str(masks)]
    if case == "mask size":
        Image.fromarray(np.full((36, 48), 255, dtype=np.uint8)).save(masks / "b.png")
        return options, f"error: --photo-masks {masks}: mask b.png is 48 x 36 but its photo b.png is 96 x 72"
    assert case == "empty mask"
    Image.fromarray(np.zeros((72, 96), dtype=np.uint8)).save(masks / "a.png")
    return options, f"error: --photo-masks {masks}: mask a.png of photo a.png marks no object"


@pytest.mark.parametrize("case", ["empty", "no images", "missing", "mask size", "empty mask", "no usable photo"])
def test_bad_photo_folders_and_masks_are_one_line_before_any_work(tmp_path, case):
    options, message = _bad_folder(tmp_path, case)
    result = invoke("synth", "mug", *options, *FAST)
    assert result.exit_code == 2, result.output
    assert len(lines(result.output)) == 1 and lines(result.output)[0].startswith(message), result.output
    for stage in ("support", "proposals", "bank"):
        assert stored(tmp_path / "cache", stage) == 0, stage


def test_unusable_photos_are_named_and_the_others_used(tmp_path):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    plant(folder, "a.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "b.png", (30, 70, 0, 50), masks, seed=2)
    (folder / "junk.jpg").write_bytes(b"this is not a jpeg")
    whole = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(whole, quality=90)
    (folder / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # its header reads fine
    whole.unlink()
    Image.fromarray(np.zeros((10, 6, 3), dtype=np.uint8)).save(folder / "small.png")
    result = invoke("synth", "mug", "--photos", str(folder), "--photo-masks", str(masks), *FAST, "--json")
    assert result.exit_code == 1, result.output
    warned = {
        ln.split(" left out: ")[0]: ln.split(" left out: ")[1] for ln in lines(result.stderr) if "left out:" in ln
    }
    assert set(warned) == {f"warning: mug: photo {n}" for n in ("junk.jpg", "cut.jpg", "small.png")}, result.stderr
    assert warned["warning: mug: photo junk.jpg"] == "not an image Pillow can read"
    assert warned["warning: mug: photo small.png"] == "6 x 10 pixels, smaller than the 8 x 8 feature grid"
    assert "truncated" in warned["warning: mug: photo cut.jpg"] or "corrupt" in warned["warning: mug: photo cut.jpg"]
    assert lines(result.stderr)[-1].startswith("error: 3 photos were left out of the support sets")
    [doc] = json.loads(result.stdout)["classes"]
    assert doc["support"] == {"generated": 0, "photos": 2} and doc["photos_computed"] == 2
    assert sorted(s["file"] for s in doc["photos_skipped"]) == ["cut.jpg", "junk.jpg", "small.png"]
    [bank] = banks(tmp_path / "cache")
    assert sorted(m["file"] for m in bank.meta["photos"]) == ["a.png", "b.png"]
    assert {m["mask"] for m in bank.meta["photos"]} == {"user"} and len(bank.support_keys) == 2


# --- explain ---------------------------------------------------------------------------------------------------------


def test_explain_names_the_photos_behind_a_prototype(tmp_path):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    plant(folder, "a.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "b.png", (30, 70, 0, 50), masks, seed=2)
    query = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(query)
    segment = ["--short-side", "64", "--scales", "64", "--stride", "32", "--no-filter", "--quiet"]
    result = invoke(
        "explain", str(query), "--xy", "30,20", "--classes", "mug", "--photos", str(folder),
        "--photo-masks", str(masks), *FAST, *segment, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    digests = {n: sha(folder / n) for n in ("a.png", "b.png")}
    mine = [p for p in doc["prototypes"] if p["class"] == "mug"]
    assert mine, doc["prototypes"]
    support = [s for p in mine for s in p["support"]]
    assert support and all(s["photo"] in digests and s["sha256"] == digests[s["photo"]] for s in support)
    for p in mine:
        if p["kind"] == "class":  # a class prototype is pooled from both photos
            assert sorted(s["photo"] for s in p["support"]) == ["a.png", "b.png"]


# --- progress over a large folder ------------------------------------------------------------------------------------


def test_listing_a_large_folder_shows_progress_off_a_terminal(tmp_path):
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[3:9, 3:9] = 1
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"p{i:03d}.png")
        Image.fromarray(mask).save(masks / f"p{i:03d}.png")
    args = ["synth", "mug", "--photos", str(folder), "--photo-masks", str(masks), *FAST, "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", *args, "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert f"photos in {folder}: 0/200" in err
    assert any(ln.startswith(f"photos in {folder}: 200/200 (") for ln in err), proc.stderr
    [doc] = json.loads(proc.stdout)["classes"]
    assert doc["support"] == {"generated": 0, "photos": 200} and doc["photos_computed"] == 200


def test_a_photo_class_travels_with_its_photos_through_export_and_import(tmp_path):
    """`cache export --with-support` carries the photos' entries (their mask or attribution) and `import` accepts
    them: on the other machine synth finds the bank and every photo entry, and computes nothing."""
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    plant(folder, "a.png", (10, 40, 20, 60), masks, seed=1)
    plant(folder, "b.png", (20, 60, 30, 80), seed=2)  # no mask: its entry holds an attribution map
    args = ["synth", "mug", "--photos", str(folder), "--photo-masks", str(masks), *FAST, "--steps", "2"]
    assert invoke(*args, "--cache-dir", str(tmp_path / "here")).exit_code == 0
    exported = invoke(
        "cache", "export", str(tmp_path / "mug.ovd"), "--with-support", "--cache-dir", str(tmp_path / "here")
    )
    assert exported.exit_code == 0, exported.output
    assert "1 prototype banks and 2 support images (mug)" in exported.stdout
    imported = invoke("cache", "import", str(tmp_path / "mug.ovd"), "--cache-dir", str(tmp_path / "there"))
    assert imported.exit_code == 0, imported.output
    again = invoke(*args, "--cache-dir", str(tmp_path / "there"), "--json")
    assert again.exit_code == 0, again.output
    [doc] = json.loads(again.stdout)["classes"]
    assert doc["photos_computed"] == 0 and doc["support"] == {"generated": 0, "photos": 2}
    assert stored(tmp_path / "there", "support") == 2


def test_a_run_without_the_photos_says_the_cache_holds_a_photo_bank(tmp_path, tiny_models):
    """segment/explain/eval without --photos would synthesise the class from its name: the note before that says the
    cache holds the class's bank with photos, and that its --photos folder is what to pass."""
    folder, masks = tmp_path / "mug", tmp_path / "masks"
    for i, name in enumerate(("a.png", "b.png")):
        plant(folder, name, (10, 40, 20 + 10 * i, 60), masks, seed=i)
    with Cache(tmp_path / "cache") as cache:
        synth_lib(cache, tiny_models, folder, masks)
        opts = pipeline.SynthOptions(**{**LIB, "n": 2})
        notes = pipeline.synthesis_notes(["mug"], opts, tiny_models, cache, [ClassSpec("mug")])
    assert notes[0].startswith("synthesising 1 class first (2 images each; no cached prototypes for tiny, n 2,")
    assert "cached for mug with other settings: tiny, n 0 + 2 photos," in notes[1]
    assert notes[1].endswith("(pass those options and its --photos folder to use them)")
