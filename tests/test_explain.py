"""explain on planted prototypes with known provenance, and through the CLI with the tiny models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from planted import TINY_SEGMENT, PixelExtractor
from typer.testing import CliRunner

from ovdiff_cli import explain as X
from ovdiff_cli import outputs, pipeline
from ovdiff_cli import segmentation as S
from ovdiff_cli.cache import Cache
from ovdiff_cli.classes import ClassSpec
from ovdiff_cli.cli import app
from ovdiff_cli.inputs import find_images
from ovdiff_cli.prototypes import build_bank

SIZE = 16  # support images are 16 x 16 and the bank grid is 16 x 16: one cell per pixel
# Class 'a': support image n is blue with a square of colour (1, n/2, 0); class 'b': grey with a green square.
SQUARES = {0: (2, 3, 7, 8), 1: (8, 1, 14, 6), 2: (5, 9, 11, 15)}  # x0, y0, x1, y1 (end exclusive)


def support_set(cls: str) -> tuple[np.ndarray, np.ndarray]:
    images, fg = [], []
    for n, (x0, y0, x1, y1) in SQUARES.items():
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[:] = (0, 0, 255) if cls == "a" else (128, 128, 128)
        img[y0:y1, x0:x1] = (255, round(255 * n / 2), 0) if cls == "a" else (0, 255, 0)
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y0:y1, x0:x1] = True
        images.append(img)
        fg.append(mask)
    return np.stack(images), np.stack(fg)


@pytest.fixture
def planted(tmp_path):
    """A segmenter whose banks were built from planted support images stored in a real cache."""
    cache = Cache(tmp_path / "cache")
    banks = []
    for cls in ("a", "b"):
        images, fg = support_set(cls)
        keys = [f"{cls}-support-{n}" for n in range(len(images))]
        for n, key in enumerate(keys):
            zeros = np.zeros_like(images[n])
            cache.put("support", key, pipeline.encode_support(images[n], zeros, np.zeros((SIZE, SIZE)), cls, n))
        feats = PixelExtractor(torch.eye(3))(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        fg_t = torch.from_numpy(fg)
        banks.append(build_bank(cls, {"x": feats}, fg_t, ~fg_t, k=1, support_keys=keys))
    ps = S.build_prototype_set(banks, [ClassSpec("a"), ClassSpec("b")])
    opts = S.SegmentOptions(scales=(32, 16), stride=16, short_side=32, prefilter=False)
    yield S.Segmenter(ps, {"x": PixelExtractor(torch.eye(3))}, opts), cache
    cache.close()


def query() -> np.ndarray:
    """32 x 48: left third = a's support image 2 colour, middle = green, right = blue."""
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :16] = (255, 255, 0)
    img[:, 16:32] = (0, 255, 0)
    img[:, 32:] = (0, 0, 255)
    return img


def test_the_reported_prototype_and_support_pixels_are_the_planted_ones(planted):
    segmenter, _ = planted
    expl = X.explain(segmenter, query(), x=5, y=20, support_size=SIZE, top=3)
    assert (expl.label_id, expl.label) == (1, "a")
    assert expl.score == pytest.approx(1.0, abs=2e-3)
    first = expl.prototypes[0]
    # the exact match: the instance prototype of a's support image 2, pooled from exactly its square
    assert (first.class_name, first.kind, first.region, first.image) == ("a", "instance", "fg", 2)
    assert first.extractor == "x" and first.similarity == pytest.approx(1.0, abs=2e-3)
    assert [r.index for r in first.support] == [2]
    x0, y0, x1, y1 = SQUARES[2]
    planted_mask = np.zeros((SIZE, SIZE), bool)
    planted_mask[y0:y1, x0:x1] = True
    assert np.array_equal(first.support[0].mask, planted_mask)
    assert first.support[0].box == SQUARES[2] and first.support[0].key == "a-support-2"
    assert first.wins[:, :16].all() and not first.wins[:, 16:].any()  # it wins a's whole region
    sims = [p.similarity for p in expl.prototypes]
    assert sims == sorted(sims, reverse=True) and len(expl.prototypes) == 3
    # asking for more than the class has gives all of it: class + 3 instances + 1 part (k=1), each with provenance
    everything = X.explain(segmenter, query(), x=5, y=20, support_size=SIZE, top=50).prototypes
    assert sorted(p.kind for p in everything) == ["class", "instance", "instance", "instance", "part"]
    squares = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in SQUARES.values())
    for p in everything:
        if p.kind in ("class", "part"):  # pooled from every fg mask (one cluster): all three squares
            assert sorted(r.index for r in p.support) == [0, 1, 2] and sum(r.cells for r in p.support) == squares
        else:
            assert [r.index for r in p.support] == [p.image] and p.support[0].box == SQUARES[p.image]


def test_background_pixel_names_the_class_its_prototype_came_from(planted):
    segmenter, _ = planted
    expl = X.explain(segmenter, query(), x=40, y=3, support_size=SIZE)
    assert (expl.label_id, expl.label) == (0, "background")
    first = expl.prototypes[0]
    assert first.region == "bg" and first.class_name == "a"  # a's supports have blue backgrounds
    assert expl.runner_up is not None and expl.runner_up[1] in {"a", "b"}


def test_same_label_as_segment_writes(planted, tmp_path):
    segmenter, _ = planted
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(query()).save(src / "q.png")
    legend = outputs.build_legend(["a", "b"], [False, False])
    pipeline.segment_files(pipeline.plan_outputs(find_images([str(src)]), tmp_path / "out"), segmenter, legend)
    written = np.array(Image.open(tmp_path / "out" / "q.png"))
    for x, y in [(5, 20), (20, 10), (40, 3), (15, 0), (16, 31), (31, 16)]:
        expl = X.explain(segmenter, query(), x, y, SIZE, top=1)
        assert expl.label_id == written[y, x] and expl.label == legend[str(written[y, x])]["name"]


def test_picture_rows_and_json_round_trip(planted):
    segmenter, cache = planted
    expl = X.explain(segmenter, query(), x=20, y=10, support_size=SIZE, top=2)
    assert expl.label == "b" and len(expl.prototypes) == 2
    picture = X.render(expl, query(), lambda key: pipeline.load_support(cache, key)[0], "planted")
    assert picture.height == X.HEADER_H + 2 * X.ROW_H
    px = np.array(picture)
    # The header's outlines are drawn in each region's class colour (the query is fitted 10x: 480 x 320 at 8, 8),
    # with a halo just inside (white beside these dark colours); background's dashed black and white.
    lab = np.kron(expl.labels, np.ones((10, 10), dtype=expl.labels.dtype))
    assert set(np.unique(lab)) == {0, 1, 2}  # a | b | background
    edges = outputs.boundaries(lab, width=2)
    ring = outputs.boundaries(lab, width=3) & ~edges
    away = np.abs(np.arange(480)[None] - (20 * 10 + 5)) + np.abs(np.arange(320)[:, None] - (10 * 10 + 5)) > 30
    head = px[8 : 8 + 320, 8 : 8 + 480]
    for v in (1, 2):
        rim, halo = edges & (lab == v) & away, ring & (lab == v) & away
        assert rim.sum() > 100 and (head[rim] == outputs.colour(v)).all()
        assert (head[halo] == outputs.halo_colour(outputs.colour(v))).all()
    dashes = {tuple(c) for c in head[edges & (lab == 0) & away]}
    assert dashes == {(0, 0, 0), (255, 255, 255)}
    # Each row's caption starts right after its region map (240 x 160 here): no empty gap between them.
    top = X.HEADER_H
    assert (px[top : top + 160, 8 + 240 : 8 + 248] == 255).all()  # the 8-pixel margin
    assert (px[top : top + 14, 256:300] < 100).any()  # then the caption's text
    # A prototype that wins no pixel says so instead of showing an all-dimmed map.
    none = dataclasses.replace(expl.prototypes[0], wins=np.zeros_like(expl.prototypes[0].wins))
    lonely = X.render(dataclasses.replace(expl, prototypes=[none]), query(), lambda key: None, "")
    region = np.array(lonely)[top : top + 160, 8 : 8 + 240].astype(int)
    assert region.mean() > 150 and (region < 60).any()  # faded query with dark words on it
    doc = expl.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["pixel"] == [20, 10] and doc["label"] == "b" and doc["size"] == [48, 32]
    proto = doc["prototypes"][0]
    assert set(proto) >= {"kind", "region", "similarity", "support", "class", "wins_pixels"}
    assert all(set(s) == {"index", "key", "box", "cells"} for s in proto["support"])
    assert proto["support"][0]["key"].startswith("b-support-")


def _find(picture: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """(y, x) of every place where ``tile`` (h, w, 3) appears exactly in ``picture`` (H, W, 3)."""
    h, w = tile.shape[:2]
    rows = np.lib.stride_tricks.sliding_window_view(picture[: picture.shape[0] - h + 1], w, axis=1)  # (., ., 3, w)
    top = (rows == tile[0].T).all(axis=(-2, -1))  # where the tile's top row starts
    places = zip(*np.nonzero(top), strict=True)
    return [(int(y), int(x)) for y, x in places if np.array_equal(picture[y : y + h, x : x + w], tile)]


def test_picture_legend_has_an_entry_per_label_shown(planted):
    segmenter, cache = planted
    expl = X.explain(segmenter, query(), x=20, y=10, support_size=SIZE, top=1)
    assert expl.names == ["background", "a", "b"] and set(np.unique(expl.labels)) == {0, 1, 2}
    font = outputs.load_font(12)

    def entries(picture, expl):
        """label -> (y, x) of its outline sample in the header, beside its name's (dark) pixels."""
        px = np.array(picture)
        found = {}
        for label in np.unique(expl.labels).tolist():
            header = px[: picture.height - X.ROW_H * len(expl.prototypes), 8 + 480 :]  # right of the query
            (y, x), *more = _find(header, np.array(X._swatch(label)))
            assert not more
            x += 8 + 480
            assert not more
            name = expl.names[label]
            text = px[y : y + X.SWATCH, x + X.SWATCH + 6 : x + X.SWATCH + 6 + int(font.getlength(name))]
            assert text.shape[1] > 0 and (text.astype(int).sum(-1) < 300).any()  # the name, written beside it
            found[label] = (y, x)
        return found

    picture = X.render(expl, query(), lambda key: pipeline.load_support(cache, key)[0], "planted")
    assert sorted(entries(picture, expl)) == [0, 1, 2]
    # Background's sample is dashed black and white, a class's solid in its colour (white halo on white inside).
    assert {tuple(c) for c in np.array(X._swatch(0))[0]} == {(0, 0, 0), (255, 255, 255)}
    assert {tuple(c) for c in np.array(X._swatch(2))[0]} == {outputs.colour(2)}
    items, _ = X._legend(expl, font, 0, 0, 560)
    assert [(label, text) for _, _, label, text in items if label is not None] == [
        (0, "background"),
        (1, "a"),
        (2, "b"),
    ]
    assert any("dashed: background" in text for _, _, label, text in items if label is None)
    # Forty labels with long names: the header grows to hold every entry, the rows move down below it.
    many = np.arange(32 * 48).reshape(32, 48) % 40
    names = ["background"] + [f"a rather long class name {i}" for i in range(1, 40)]
    crowded = dataclasses.replace(expl, labels=many, names=names)
    picture = X.render(crowded, query(), lambda key: None, "")
    assert len(entries(picture, crowded)) == 40 and picture.height > X.HEADER_H + X.ROW_H


def test_background_rows_are_outlined_dashed_and_outlines_show_on_a_dark_photo(planted):
    segmenter, cache = planted
    expl = X.explain(segmenter, query(), x=40, y=3, support_size=SIZE, top=1)
    assert expl.label == "background" and expl.prototypes[0].region == "bg"
    px = np.array(X.render(expl, query(), lambda key: pipeline.load_support(cache, key)[0], ""))
    # The first crop (a 16 x 16 support image fitted to 160 x 160, after the 240-wide map and the caption): the
    # support image's background, outlined in dashes of black and white, not in black alone.
    crop = px[X.HEADER_H : X.HEADER_H + X.THUMB, 16 + 240 + X.TEXT_W :][:, : X.THUMB]
    assert {tuple(c) for c in crop[:2].reshape(-1, 3)} == {(0, 0, 0), (255, 255, 255)}
    # On a photo darkened to 10%, a class's outline (dark green for b) still shows: a white halo beside it.
    dark = (query() * 0.1).astype(np.uint8)
    expl = X.explain(segmenter, query(), x=20, y=10, support_size=SIZE, top=1)
    px = np.array(X.render(expl, dark, lambda key: None, ""))
    region_map = px[X.HEADER_H : X.HEADER_H + 160, 8 : 8 + 240]
    assert (region_map == outputs.colour(2)).all(-1).sum() > 100
    assert (region_map == 255).all(-1).sum() > 100  # the halo; the dimmed dark photo has no light pixel


def test_outside_pixel_is_refused(planted):
    with pytest.raises(ValueError, match="outside"):
        X.explain(planted[0], query(), x=48, y=0, support_size=SIZE)


# --- CLI (tiny models) ----------------------------------------------------------------------------------------------

runner = CliRunner()
FAST = [*TINY_SEGMENT, "--no-filter"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    path = folder / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
    return path, str(folder / "cache")


def cli(cache_dir: str, *args: str):
    return runner.invoke(app, [*args, *FAST, "--cache-dir", cache_dir])


def test_cli_json_png_and_segment_agree(photo, tmp_path):
    path, cache_dir = photo
    out_png = tmp_path / "why" / "p.png"
    result = cli(
        cache_dir, "explain", str(path), "--xy", "70,9", "--classes", "cat,sky", "--out", str(out_png), "--json"
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pixel"] == [70, 9] and doc["out"] == str(out_png) and doc["models"]["name"] == "tiny"
    # --top (2 by default) per extractor: at most 6 rows for sd, dino and clip, grouped by extractor
    assert 1 <= len(doc["prototypes"]) <= 6
    extractors = [p["extractor"] for p in doc["prototypes"]]
    assert extractors == sorted(extractors) and all(extractors.count(e) <= 2 for e in extractors)
    assert Image.open(out_png).height == X.HEADER_H + X.ROW_H * len(doc["prototypes"])
    seg = cli(cache_dir, "segment", str(path), "--classes", "cat,sky", "--out", str(tmp_path / "seg"))
    assert seg.exit_code == 0, seg.output
    written = np.array(Image.open(tmp_path / "seg" / "p.png"))[9, 70]
    legend = json.loads((tmp_path / "seg" / "legend.json").read_text())
    assert doc["label"] == legend[str(written)]["name"] and doc["label_id"] == written


@pytest.mark.parametrize(
    ("xy", "needle"),
    [
        ("80,5", "outside the image, which is 80 x 60"),
        ("5", "expected two whole numbers"),
        ("a,b", "X,Y"),
        ("-1,2", "X,Y"),
    ],
)
def test_cli_bad_coordinates(photo, xy, needle):
    path, cache_dir = photo
    result = cli(cache_dir, "explain", str(path), "--xy", xy, "--classes", "cat", "--json")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_cli_without_outputs_prints_the_summary_and_needs_a_readable_image(photo, tmp_path):
    path, cache_dir = photo
    plain = cli(cache_dir, "explain", str(path), "--xy", "1,1", "--classes", "cat")
    assert plain.exit_code == 0, plain.output
    assert (
        plain.stdout.startswith(f"pixel (1, 1) of {path}: ") and "#1 " in plain.stdout and "wrote" not in plain.stdout
    )
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    result = cli(cache_dir, "explain", str(bad), "--xy", "1,1", "--classes", "cat", "--json")
    assert result.exit_code == 2 and "empty file" in result.output
