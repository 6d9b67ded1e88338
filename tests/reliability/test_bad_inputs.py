"""Odd files and odd class lists: one line naming the problem; exit 2 for usage, exit 1 for per-file failures
while the other files are still processed."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from planted import TINY_SEGMENT, PixelExtractor, protoset
from typer.testing import CliRunner

from ovdiff_cli import outputs, pipeline
from ovdiff_cli import segmentation as S
from ovdiff_cli.classes import build_class_list
from ovdiff_cli.cli import app
from ovdiff_cli.inputs import find_images

runner = CliRunner()
FAST = TINY_SEGMENT


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("bad-inputs-cache"))


def segment(cache_dir: str, *args: str):
    return runner.invoke(app, ["segment", *FAST, "--cache-dir", cache_dir, *args])


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels but holds almost no data (what a decompression bomb looks like
    to a reader that trusts its header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def odd_files(folder: Path) -> dict[str, str | None]:
    """Write one of each odd input; name -> expected failure reason (None = must be segmented)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    folder.mkdir(parents=True)
    (folder / "zero.jpg").write_bytes(b"")
    Image.fromarray(rgb).save(folder / "full.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "text.png").write_text("this is not a picture")
    Image.new("CMYK", (56, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 56), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "one.png")
    png_header_only(folder / "bomb.png", 20000, 20000)
    exif_img = Image.fromarray(rgb)
    exif = exif_img.getexif()
    exif[0x0112] = 6
    exif_img.save(folder / "rotated.jpg", exif=exif)
    raw = os.fsencode(folder) + b"/caf\xe9-latin1.png"  # not valid UTF-8
    Image.fromarray(rgb).save(raw.decode(errors="surrogateescape"))
    return {
        "zero": "empty file",
        "truncated": "corrupt or truncated",
        "text": "not an image",
        "bomb": "more than --max-pixels",
        "full": None,
        "cmyk": None,
        "sixteen": None,
        "rgba": None,
        "palette": None,
        "one": None,
        "rotated": None,
        os.fsdecode(b"caf\xe9-latin1"): None,
    }


def test_odd_files_in_one_folder(cache_dir, tmp_path):
    expected = odd_files(tmp_path / "odd")
    out = tmp_path / "out"
    result = segment(cache_dir, str(tmp_path / "odd"), "--classes", "cat,sky", "--out", str(out), "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    failures = {Path(f["path"]).stem: f["reason"] for f in doc["failed"]}
    bad = {k: v for k, v in expected.items() if v}
    assert set(failures) == set(bad)
    for name, needle in bad.items():
        assert needle in failures[name], (name, failures[name])
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(bad) + 1 and f"{len(bad)} of {len(expected)} images failed" in errors[-1]
    for name in (k for k, v in expected.items() if v is None):
        labels = out / f"{name}.png"
        assert labels.exists(), name
    assert Image.open(out / "rotated.png").size == (40, 56)  # EXIF orientation applied: 56 x 40 stored sideways
    assert Image.open(out / "one.png").size == (1, 1)


def test_bigger_limit_flag_is_named_and_usable(tmp_path):
    from ovdiff_cli.inputs import ImageError, load_image

    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageError, match="400,000,000 pixels, more than --max-pixels 100,000,000"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="corrupt or truncated"):  # past the guard, the fake data is found out
        load_image(tmp_path / "bomb.png", max_pixels=500_000_000)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{tmp}/empty-dir"], "no image files found"),
        (["{tmp}/missing"], "no such file or folder"),
        (["{tmp}/odd-one", "--out", "{tmp}/a-file"], "not a folder"),
        (["{tmp}/odd-one", "--out", "{tmp}/read-only/out"], "cannot write in"),
        (["{tmp}/odd-one", "--out", "{tmp}/read-only"], "--out"),
        (["{tmp}/odd-one", "--max-pixels", "0"], "--max-pixels 0"),
    ],
)
def test_usage_errors(cache_dir, tmp_path, args, needle):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "odd-one").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "odd-one" / "a.png")
    (tmp_path / "a-file").write_text("x")
    # A folder nobody may write to: chmod 555, or for root (who ignores permissions) the kernel's /proc.
    read_only = Path("/proc") if os.geteuid() == 0 else tmp_path / "read-only"
    if read_only != Path("/proc"):
        read_only.mkdir()
        os.chmod(read_only, 0o555)
    try:
        full = [a.replace("{tmp}/read-only", str(read_only)).replace("{tmp}", str(tmp_path)) for a in args]
        if "--out" not in full:
            full += ["--out", str(tmp_path / "out")]
        result = segment(cache_dir, *full, "--classes", "cat")
    finally:
        if read_only != Path("/proc"):
            os.chmod(read_only, 0o755)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("classes", "needle"),
    [
        ("", "no classes"),
        (",,,", "empty item"),
        ("cat,dog,Cat", "listed twice"),
        ("cat,d\x01og", "control character"),
        ("cat,sky\tstuff", "class 'sky\\tstuff' in --classes: contains control character '\\t'"),  # README
        ("cat, sky ,", "empty item"),
    ],
)
def test_class_list_errors(cache_dir, tmp_path, classes, needle):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    result = segment(cache_dir, *args, *(["--classes", classes] if classes else []))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output


def test_very_long_class_name_says_it_is_truncated(cache_dir, tmp_path):
    long = " ".join(f"word{i}" for i in range(90))
    result = runner.invoke(app, ["synth", long, *FAST[:8], "--cache-dir", cache_dir])
    assert result.exit_code == 0, result.output
    assert "exceeds the 75-token limit: only its first 70 tokens are used" in result.stderr


def test_names_with_slashes_and_dots_stay_names(cache_dir, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "deep" / "out"
    names = "../../escape,/etc/passwd,a/b"
    result = segment(cache_dir, str(tmp_path / "a.png"), "--classes", names, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [v["name"] for v in json.loads((out / "legend.json").read_text()).values()] == [
        "background",
        "../../escape",
        "/etc/passwd",
        "a/b",
    ]
    everything = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert everything == {
        "a.png",
        "deep",
        "deep/out",
        "deep/out/a.png",
        "deep/out/a_overlay.jpg",
        "deep/out/legend.json",
    }


def test_nul_bytes_are_refused_in_one_line(cache_dir, tmp_path):
    result = segment(cache_dir, str(tmp_path / "a\0b.png"), "--classes", "cat", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    result = segment(cache_dir, str(tmp_path), "--classes", "c\0at", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "control character" in result.output


def test_a_thousand_classes(tmp_path):
    names = [f"class {i}" for i in range(1000)]
    specs = build_class_list(names)
    assert len(specs) == 1000
    # eq. 4 over 1000 classes (planted prototypes: one colour direction per class), label map in 16 bits
    directions = torch.nn.functional.normalize(torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    ps = protoset({"x": directions.tolist()}, channel=list(range(1, 1001)), source=list(range(1, 1001)), names=names)
    seg = S.Segmenter(ps, {"x": PixelExtractor(torch.eye(3))}, S.SegmentOptions(scales=(16,), stride=16, short_side=16))
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "x.png")
    legend = outputs.build_legend(names, [False] * 1000)
    run = pipeline.segment_files(
        pipeline.plan_outputs(find_images([str(tmp_path / "in")]), tmp_path / "out"), seg, legend
    )
    assert run.done == 1
    labels = np.array(Image.open(tmp_path / "out" / "x.png"))
    assert labels.dtype == np.uint16 and labels.max() > 255  # ids beyond a palette's 0..255
