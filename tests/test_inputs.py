"""Finding, reading and sharding inputs; writing outputs (no models)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from ovdiff_cli import inputs, outputs


def save(path: Path, arr: np.ndarray | Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    img.save(path, **kw)
    return path


def rgb(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# --- discovery ----------------------------------------------------------------------------------------------------


def test_find_images_in_a_folder_tree(tmp_path):
    root = tmp_path / "photos"
    save(root / "a.jpg", rgb())
    save(root / "sub" / "deeper" / "b.png", rgb())
    save(root / "noext", rgb(), format="JPEG")  # found by content
    (root / "notes.txt").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")  # kept by extension: reported later, not silently ignored
    save(root / ".hidden.jpg", rgb())
    save(root / ".git" / "c.png", rgb())
    save(root / "out" / "old.png", rgb())  # the output folder inside the input: never an input
    found = inputs.find_images([str(root)], exclude=root / "out")
    assert [str(i.rel) for i in found] == ["a", "empty", "noext", "sub/deeper/b"]
    assert found[0].path == root / "a.jpg"


def test_names_relative_to_the_common_folder_and_clashes(tmp_path):
    save(tmp_path / "x" / "img.jpg", rgb())
    save(tmp_path / "y" / "img.jpg", rgb())
    save(tmp_path / "x" / "a.jpg", rgb())
    save(tmp_path / "x" / "a.png", rgb())
    found = inputs.find_images([str(tmp_path / "x"), str(tmp_path / "y")])
    assert [str(i.rel) for i in found] == ["x/a.jpg", "x/a.png", "x/img", "y/img"]
    # files named one by one (as a shell glob would) name their outputs like the folder does
    files = inputs.find_images([str(tmp_path / "x" / "img.jpg"), str(tmp_path / "x" / "a.jpg")])
    assert [str(i.rel) for i in files] == ["a", "img"]
    assert all(isinstance(i.rel, PurePosixPath) and not i.rel.is_absolute() for i in found + files)


def test_glob_patterns(tmp_path):
    save(tmp_path / "p" / "a.jpg", rgb())
    save(tmp_path / "p" / "q" / "b.jpg", rgb())
    found = inputs.find_images([str(tmp_path / "p" / "**" / "*.jpg")])
    assert sorted(str(i.rel) for i in found) == ["a", "q/b"]
    with pytest.raises(ValueError, match="matches no image"):
        inputs.find_images([str(tmp_path / "p" / "*.gif")])


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: [str(d / "missing")], "no such file or folder"),
        (lambda d: [str(d)], "no image files found"),
        (lambda d: [], "no INPUT"),
    ],
)
def test_find_images_errors(tmp_path, make, needle):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=needle):
        inputs.find_images(make(tmp_path))


# --- reading ------------------------------------------------------------------------------------------------------


def test_modes_are_converted(tmp_path):
    base = rgb(6, 9)
    grey = np.arange(54, dtype=np.uint8).reshape(6, 9)
    got = inputs.load_image(save(tmp_path / "rgb.png", base))
    assert got.dtype == np.uint8 and np.array_equal(got, base)
    assert np.array_equal(inputs.load_image(save(tmp_path / "l.png", grey)), np.repeat(grey[..., None], 3, 2))
    deep = grey.astype(np.uint16) * 257
    assert np.array_equal(inputs.load_image(save(tmp_path / "16.png", deep))[..., 0], grey)  # 16-bit: scaled
    rgba = np.dstack([base, np.full((6, 9), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    got = inputs.load_image(save(tmp_path / "rgba.png", rgba))
    assert got[0, 0].tolist() == [255, 255, 255] and np.array_equal(got[1:], base[1:])  # transparent -> white
    pal = Image.fromarray(base).convert("P")
    assert np.array_equal(inputs.load_image(save(tmp_path / "p.png", pal)), np.array(pal.convert("RGB")))
    cmyk = inputs.load_image(save(tmp_path / "c.jpg", Image.new("CMYK", (9, 6), (0, 255, 255, 0))))
    assert cmyk.shape == (6, 9, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1].max() < 60  # red


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(rgb(6, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = save(tmp_path / "r.jpg", img, exif=exif)
    assert inputs.load_image(path).shape == (10, 6, 3)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        ("truncate", "corrupt or truncated"),
    ],
)
def test_unreadable_files_raise_image_error(tmp_path, content, needle):
    path = tmp_path / "x.png"
    if content == "truncate":
        save(tmp_path / "full.jpg", rgb(64, 64))
        data = (tmp_path / "full.jpg").read_bytes()
        path = tmp_path / "t.jpg"
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(inputs.ImageError, match=needle):
        inputs.load_image(path)


# --- shards -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_shards_partition_every_item_exactly_once(n):
    items = list(range(23))
    parts = [inputs.Shard(k, n).take(items) for k in range(n)]
    assert sorted(x for p in parts for x in p) == items
    assert all(p == items[k::n] for k, p in enumerate(parts))


def test_resolve_shard_sources():
    assert inputs.resolve_shard("1/4", {}) == inputs.Shard(1, 4, "--shard", "--shard 1/4")
    assert inputs.resolve_shard(None, {}) == inputs.Shard(0, 1, "none")
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    origin = "SLURM array (SLURM_ARRAY_TASK_ID=3, SLURM_ARRAY_TASK_COUNT=4, SLURM_ARRAY_TASK_MIN=1)"
    assert inputs.resolve_shard(None, slurm) == inputs.Shard(2, 4, "SLURM array", origin)
    assert inputs.resolve_shard(None, slurm).describe(3, 10) == f"shard 2/4 from {origin}: 3 of 10 images"
    torchrun = inputs.Shard(1, 2, "torchrun", "torchrun (RANK=1, WORLD_SIZE=2)")
    assert inputs.resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == torchrun
    assert inputs.resolve_shard(None, {}).describe(10, 10) == ""  # not sharded: nothing to say
    assert inputs.resolve_shard("0/1", slurm).source == "--shard"  # the flag wins over the environment


@pytest.mark.parametrize(
    ("value", "env", "needle"),
    [
        ("4/4", {}, "--shard 4/4: shard 4 of 4 does not exist"),
        ("1-4", {}, "--shard '1-4': expected K/N"),
        ("a/b", {}, "expected K/N"),
        (None, {"RANK": "x", "WORLD_SIZE": "2"}, "torchrun (RANK=x, WORLD_SIZE=2): expected whole numbers"),
        (None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, "shard 5 of 4"),
    ],
)
def test_resolve_shard_errors(value, env, needle):
    with pytest.raises(ValueError) as info:
        inputs.resolve_shard(value, env)
    assert needle in str(info.value)


# --- outputs ------------------------------------------------------------------------------------------------------


def test_voc_palette_known_colours():
    pal = outputs.voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # VOC "person"
    assert pal[255].tolist() == [224, 224, 192]  # VOC's ignore colour
    assert len({tuple(c) for c in pal.tolist()}) == 256


def test_label_png_palette_and_sixteen_bit(tmp_path):
    labels = np.array([[0, 1, 2], [3, 2, 1]])
    outputs.write_labels(tmp_path / "l.png", labels, num_ids=4)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P" and np.array_equal(np.array(img), labels)
    assert img.getpalette()[3:6] == [128, 0, 0]
    big = np.array([[0, 300], [999, 1]])
    outputs.write_labels(tmp_path / "b.png", big, num_ids=1001)
    assert np.array_equal(np.array(Image.open(tmp_path / "b.png")), big)
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_legend_and_refusing_another_vocabulary(tmp_path):
    legend = outputs.build_legend(["cat", "sky"], [False, True])
    assert legend["0"]["type"] == "background" and legend["2"] == {"name": "sky", "color": [0, 128, 0], "type": "stuff"}
    assert "0" not in outputs.build_legend(["cat"], [False], background=False)
    path = outputs.write_legend(tmp_path, legend)
    assert json.loads(path.read_text()) == legend
    outputs.write_legend(tmp_path, legend)  # same vocabulary: fine
    other = outputs.build_legend(["dog"], [False])
    with pytest.raises(ValueError, match="holds results for other classes"):
        outputs.write_legend(tmp_path, other)
    outputs.write_legend(tmp_path, other, overwrite=True)
    assert json.loads(path.read_text()) == other


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError), outputs.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    stale = tmp_path / f".x.png{outputs.TEMP_MARK}123-abc"
    stale.write_bytes(b"left by a killed run")
    (tmp_path / ".other.png.tmp-1").write_bytes(b"not ours")
    outputs.remove_stale_temps(target)
    assert not stale.exists() and (tmp_path / ".other.png.tmp-1").exists()


def test_overlay_tints_labels_and_adds_a_legend_strip():
    image = np.full((40, 60, 3), 100, np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 1
    legend = outputs.build_legend(["cat"], [False])
    out = np.array(outputs.render_overlay(image, labels, legend, alpha=0.5))
    assert out.shape[1] == 60 and out.shape[0] > 40
    assert out[5, 5].tolist() == [100, 100, 100]  # background untinted
    assert out[5, 45].tolist() == [114, 50, 50]  # (100 + 128) / 2, 100 / 2, 100 / 2
    assert out[5, 30].tolist() == [128, 0, 0]  # the region's rim: its pure colour, the swatch's
    assert out[5, 29].tolist() == [100, 100, 100]  # ... drawn inside the region, not over the background
    no_bg = outputs.build_legend(["cat", "dog"], [False, False], background=False)
    labels[:, :30] = 2
    assert np.array(outputs.render_overlay(image, labels, no_bg, 0.5))[5, 5].tolist() == [50, 114, 50]


def test_overlay_names_large_regions_at_their_most_interior_point():
    labels = np.zeros((200, 300), np.int64)
    labels[40:160, 50:150] = 1  # a 100 x 120 box: 20% of the image
    labels[:, 200:] = 2  # a band at the right edge
    labels[0:3, 0:3] = 1  # a speck: under 2% of the image, not named
    # The box's centre and the band's; one anchor for label 1 (the speck is too small); background has one too.
    assert [a for a in outputs.region_anchors(labels) if a[0]] == [(1, 99, 99), (2, 99, 249)]
    image = np.full((200, 300, 3), 100, np.uint8)
    legend = outputs.build_legend(["cat", "sky"], [False, True])
    out = np.array(outputs.render_overlay(image, labels, legend, alpha=0.5))
    fill = [114, 50, 50]
    around = out[90:110, 85:115].astype(int).sum(-1)
    assert around.max() > 3 * 230 and around.min() < 3 * 30  # the name, white with a black rim (antialiased)
    assert out[60, 60].tolist() == fill  # elsewhere in the region: the plain fill
    assert (out[150:200, 160:200] == 100).all()  # background (its anchor is here) is not named


def test_scores_npz_loads_without_pickle(tmp_path):
    scores = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    outputs.write_scores(tmp_path / "s.npz", scores, [0, 1, 2], ["background", "cat", "sky"], np.array([1, 1, 0]))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as d:
        assert d["scores"].dtype == np.float16 and np.allclose(d["scores"], scores, atol=1e-3)
        assert d["names"].tolist() == ["background", "cat", "sky"] and d["kept"].tolist() == [True, True, False]
        assert d["ids"].tolist() == [0, 1, 2]
