"""File outputs never replace what is at their path: regular files atomically, links written through, streams
written into (segment's label maps, overlays and scores, explain's picture, eval's and every --save document, cache
export all go through outputs.atomic_path)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ovdiff_cli import outputs


def _write(path, data: bytes) -> None:
    with outputs.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def test_regular_file_is_replaced_atomically_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    _write(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_link_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "labels.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    outputs.write_labels(link, labels, 256)  # segment's label map, through the link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert np.array_equal(np.array(Image.open(target)), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "real"]  # no temp left beside either
    assert sorted(p.name for p in target.parent.iterdir()) == ["labels.png"]


def test_dash_writes_to_stdout(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(Path("-"), b'{"a": 1}\n')
    assert capfd.readouterr().out == '{"a": 1}\n' and not (tmp_path / "-").exists()


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    _write(fifo, b"payload")
    reader.join(10)
    assert got == [b"payload"] and fifo.is_fifo()


def test_a_character_device_is_a_stream():
    # /dev/null is a character device: written into, never renamed over (a run as root once replaced /dev/stdout).
    assert outputs.is_stream(Path("/dev/null")) and outputs.is_stream(Path("-"))
    assert not outputs.is_stream(Path("/no/such/file"))


# --- overlay rendering: legible outlines, a legend strip of whole names --------------------------------------------


def _strip_font(width: int):
    """The font render_overlay uses for an image ``width`` pixels wide, and its legend line height."""
    font = outputs.load_font(max(10, min(24, width // 40)))
    return font, font.getbbox("Ag")[3] + 8


def test_halo_colour_contrasts_with_the_outline():
    white, black = (255, 255, 255), (0, 0, 0)
    # VOC's dark colours (background black, dark red, dark green, dark blue) get a white halo, light ones black.
    assert [outputs.halo_colour(outputs.colour(i)) for i in (0, 1, 2, 4)] == [white] * 4
    assert outputs.colour(15) == (192, 128, 128) and outputs.halo_colour(outputs.colour(15)) == black
    assert outputs.halo_colour((255, 255, 255)) == black


def test_an_overlay_outline_on_a_black_photo_has_a_white_halo():
    image = np.zeros((60, 60, 3), np.uint8)  # a black photo
    labels = np.zeros((60, 60), np.int64)
    labels[10:50, 10:50] = 1  # dark red (128, 0, 0): the outline alone would barely show on black
    out = np.array(outputs.render_overlay(image, labels, outputs.build_legend(["cat"], [False]), alpha=0.7))
    assert out[30, 10].tolist() == [128, 0, 0]  # the rim: the pure colour, the region's outermost pixel
    assert out[30, 11].tolist() == [255, 255, 255]  # the halo just inside it: white beside a dark colour
    assert out[10, 30].tolist() == [128, 0, 0] and out[11, 30].tolist() == [255, 255, 255]
    assert out[14, 20].tolist() == [90, 0, 0]  # the fill, 0.7 x 128 (the name is written at the centre)
    assert (out[:60, :10] == 0).all()  # background: neither filled nor outlined
    # A light colour gets a black halo on a white photo.
    light = np.where(labels == 1, 15, 0)
    out = np.array(outputs.render_overlay(np.full_like(image, 255), light, outputs.build_legend(["x"] * 15, [0] * 15)))
    assert out[30, 10].tolist() == [192, 128, 128] and out[30, 11].tolist() == [0, 0, 0]


def test_draw_outlines_dashes_alternate_colour_and_halo():
    pixels = np.full((20, 20, 3), 100, np.uint8)
    colours = np.array([(0, 0, 0), (0, 0, 128)])
    outputs.draw_outlines(pixels, np.zeros((20, 20), np.int64), 2, colours, dashed=np.array([True, False]), frame=True)
    rim = pixels[0].tolist() + pixels[1].tolist()  # the top rim, 2 pixels wide
    assert {tuple(p) for p in rim} == {(0, 0, 0), (255, 255, 255)}  # dashes of black and white
    assert pixels[0, :4].tolist() == [[0, 0, 0]] * 4 and pixels[0, 4:8].tolist() == [[255, 255, 255]] * 4
    assert (pixels[2:-2, 2:-2] == 100).all()  # a dashed outline has no halo inside it


def test_a_narrow_overlay_widens_its_canvas_to_show_whole_names(tmp_path):
    # 16 pixels wide: the strip once read "log" for "dog" (the canvas cut the name).
    image = np.full((40, 16, 3), 90, np.uint8)
    labels = np.zeros((40, 16), np.int64)
    labels[20:] = 1
    legend = outputs.build_legend(["dog"], [False])
    overlay = outputs.render_overlay(image, labels, legend)
    font, line = _strip_font(16)
    name_end = 4 + line + font.getlength("dog")  # the first entry: swatch at x = 4, then the name
    assert overlay.width >= name_end + 4 and overlay.height > 40
    out = np.array(overlay)
    # The image keeps its place and size, the canvas is padded with white on its right.
    assert out[:16, :16].tolist() == image[:16].tolist() and (out[:16, 16:] == 255).all()  # (a name lower down)
    # The strip's entry is exactly the swatch and the whole name, as drawn on a canvas wide enough for it.
    from PIL import ImageDraw

    want = Image.new("RGB", (overlay.width, line), (255, 255, 255))
    draw = ImageDraw.Draw(want)
    draw.rectangle([4, 2, 4 + line - 6, line - 4], fill=outputs.colour(1), outline=(0, 0, 0))
    draw.text((4 + line, 0), "dog", fill=(0, 0, 0), font=font)
    assert np.array_equal(out[40 + 4 : 40 + 4 + line], np.array(want))
    assert (np.array(want)[:, int(4 + line) :] < 128).any()  # (the name has dark pixels, all inside the canvas)
    # The label map keeps the image's size; only the overlay grows.
    paths = outputs.output_paths(tmp_path, "dog.png", overlay=True, scores=False)
    outputs.write_image_outputs(paths, image, labels, legend, num_ids=2)
    assert Image.open(paths["labels"]).size == (16, 40) and Image.open(paths["overlay"]).width == overlay.width


def test_overlay_strip_has_no_black_swatch_for_untouched_background():
    image = np.full((60, 200, 3), 100, np.uint8)
    labels = np.zeros((60, 200), np.int64)
    labels[:, 100:] = 1
    legend = outputs.build_legend(["cat"], [False])
    with_bg = np.array(outputs.render_overlay(image, labels, legend))
    only_cat = np.array(outputs.render_overlay(image, np.ones_like(labels), legend))
    # Background's pixels are left as they are, so it has no swatch: the strip is the one of an all-cat image.
    assert np.array_equal(with_bg[60:], only_cat[60:])
    strip = with_bg[60:].astype(int).sum(-1)
    windows = np.lib.stride_tricks.sliding_window_view(strip, (5, 5))
    assert not (windows.max(axis=(-1, -2)) < 60).any()  # no filled black square anywhere in the strip
    _, line = _strip_font(200)
    assert with_bg[60 + 4 + line // 2, 4 + line // 2].tolist() == list(outputs.colour(1))  # cat's swatch first
