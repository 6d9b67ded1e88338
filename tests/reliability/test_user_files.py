"""A user's files and finished work come first: no output ever replaces an input or a file ovdiff did not write,
old output folders are not read as photos, output paths are checked before any work, a result that cannot be
saved at the end still reaches the user, stdout carries one document, and an absurd --n stops at once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from planted import TINY_SEGMENT
from typer.testing import CliRunner

from ovdiff_cli import defaults as D
from ovdiff_cli import outputs, pipeline
from ovdiff_cli.cli import app
from ovdiff_cli.cli.common import RichProgress
from ovdiff_cli.inputs import find_images

runner = CliRunner()
LOUD = [a for a in TINY_SEGMENT if a != "--quiet"]  # notes are part of what these tests check
SYNTH = ["--models", "tiny", "--n", "2", "--steps", "2", "--k", "3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One cache for the module: the first test that needs prototypes synthesises them."""
    return str(tmp_path_factory.mktemp("user-files-cache"))


def invoke(cache_dir: str, *args: str):
    return runner.invoke(app, [*args, "--cache-dir", cache_dir])


def segment(cache_dir: str, *args: str):
    return invoke(cache_dir, "segment", *LOUD, "--classes", "cat", *args)


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (40, 56)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- item 2: an output never replaces an input or a file ovdiff did not write ------------------------------------


def test_out_equal_to_the_input_folder_is_refused_and_the_photo_kept(cache_dir, tmp_path):
    before = photo(tmp_path / "same2" / "photo.png")
    result = segment(cache_dir, str(tmp_path / "same2"), "--out", str(tmp_path / "same2"))
    assert result.exit_code == 2 and errors(result) == [
        f"error: --out {tmp_path / 'same2'}: is an input folder; outputs would mix with the images (and be read as"
        " images next time): choose another folder (a subfolder of it is fine: it is never searched)"
    ]
    assert tree(tmp_path / "same2") == {"photo.png": before}  # no label map over it, no legend beside it


def test_an_output_over_an_input_file_is_refused(cache_dir, tmp_path):
    before = photo(tmp_path / "d" / "photo.png")
    result = segment(cache_dir, str(tmp_path / "d" / "photo.png"), "--out", str(tmp_path / "d"))
    assert result.exit_code == 2
    assert errors(result) == [
        f"error: --out {tmp_path / 'd'}: would write {tmp_path / 'd' / 'photo.png'} over the input"
        f" {tmp_path / 'd' / 'photo.png'}; choose another folder"
    ]
    assert tree(tmp_path / "d") == {"photo.png": before}


def test_a_users_file_at_an_output_path_is_never_replaced(cache_dir, tmp_path):
    photo(tmp_path / "in" / "a.jpg")
    mine = photo(tmp_path / "pictures" / "a.png", seed=5)  # the user's own a.png, where a.jpg's labels would go
    result = segment(cache_dir, str(tmp_path / "in"), "--out", str(tmp_path / "pictures"))
    assert result.exit_code == 2 and "would replace a.png, which ovdiff did not write" in errors(result)[0]
    assert tree(tmp_path / "pictures") == {"a.png": mine}
    (tmp_path / "other" / "legend.json").parent.mkdir()
    (tmp_path / "other" / "legend.json").write_text('{"my": "own legend"}')
    result = segment(cache_dir, str(tmp_path / "in"), "--out", str(tmp_path / "other"))
    assert result.exit_code == 2 and "its legend.json was not written by ovdiff" in errors(result)[0]
    assert (tmp_path / "other" / "legend.json").read_text() == '{"my": "own legend"}'


# --- item 3: an earlier run's output folder inside the inputs is not read as photos -------------------------------


def test_output_folders_inside_the_inputs_are_left_out_with_one_note(cache_dir, tmp_path):
    photos = tmp_path / "photos"
    photo(photos / "a.jpg")
    photo(photos / "b.jpg", seed=1)
    first = segment(cache_dir, str(photos), "--out", str(photos / "seg"), "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["images"]["done"] == 2
    assert {"seg/a.png", "seg/a_overlay.jpg", "seg/legend.json"} <= set(tree(photos))
    for args in ([str(photos)], [str(photos / "**" / "*.*")]):  # a folder search and a glob
        again = segment(cache_dir, *args, "--out", str(tmp_path / "o9"), "--overwrite", "--json")
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["images"] == {"total": 2, "done": 2, "skipped": 0, "failed": 0}
        notes = [line for line in again.stderr.splitlines() if "holds ovdiff outputs" in line]
        assert notes == [f"note: left out {photos / 'seg'}: holds ovdiff outputs (its legend.json); name the files"
                         " to segment them"]  # fmt: skip
        assert set(tree(tmp_path / "o9")) == {"a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg", "legend.json"}
    # Named files are always taken; a folder that is all outputs says why it found nothing.
    assert [i.rel.name for i in find_images([str(photos / "seg" / "a.png")])] == ["a"]
    with pytest.raises(ValueError, match=r"no image files found \(left out .*seg: holds ovdiff outputs"):
        find_images([str(photos / "seg")])


def test_only_ovdiffs_own_legend_marks_an_output_folder(tmp_path):
    legend = outputs.build_legend(["cat"], [False])
    (tmp_path / "legend.json").write_text(json.dumps(legend))
    assert outputs.read_legend(tmp_path / "legend.json") == legend
    for other in ('{"0": "background"}', "[]", "{}", '{"x": {"name": "a", "type": "thing"}}', "not json"):
        (tmp_path / "legend.json").write_text(other)
        assert outputs.read_legend(tmp_path / "legend.json") is None, other


# --- item 4: every output path is checked before any work; a late failure still delivers the result -----------


@pytest.mark.parametrize(
    "command, bad, needle",
    [
        ("segment", ["--save", "/proc/x.json"], "--save /proc/x.json: cannot write in /proc"),
        ("segment", ["--save", "{tmp}"], "is a folder; give a file name"),
        ("segment", ["--save", "{tmp}/in/a.jpg"], "is an input file; writing the result there would replace it"),
        ("segment", ["--out", "{tmp}/in/a.jpg/x"], "is a file, so no folder can be made there"),
        ("explain", ["--out", "{tmp}"], "is a folder; give a file name"),
        ("explain", ["--out", "/proc/why.png"], "cannot write in /proc"),
        ("explain", ["--out", "{tmp}/in/a.jpg"], "is an input file"),
        ("explain", ["--out", "{tmp}/why.gif"], "expected a file name ending in .png, .jpg or .jpeg"),
        ("explain", ["--save", "/proc/x.json"], "cannot write in /proc"),
        ("synth", ["--save", "/proc/x.json"], "cannot write in /proc"),
        ("cache", ["/proc/banks.ovd"], "FILE /proc/banks.ovd: cannot write in /proc"),
    ],
)
def test_output_paths_are_checked_before_any_work(tmp_path, command, bad, needle):
    photo(tmp_path / "in" / "a.jpg")
    cache = tmp_path / "fresh-cache"
    args = {
        "segment": ["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *LOUD, "--classes", "cat"],
        "explain": ["explain", str(tmp_path / "in" / "a.jpg"), "--xy", "1,1", *LOUD, "--classes", "cat"],
        "synth": ["synth", "cat", *SYNTH],
        "cache": ["cache", "export"],
    }[command]
    result = runner.invoke(app, [*args, *[b.format(tmp=tmp_path) for b in bad], "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert len(errors(result)) == 1 and needle in errors(result)[0] and result.stdout == ""
    assert not list(cache.rglob("*.val")) and not (tmp_path / "out").exists()  # nothing generated, nothing written


def test_eval_checks_save_and_save_pred_before_any_work(tmp_path):
    from test_eval import make_dataset

    make_dataset(tmp_path, "voc", n=2, size=(64, 48))
    labels = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    before = tree(labels)
    common = ["eval", "voc", "--root", str(tmp_path), *TINY_SEGMENT, "--cache-dir", str(tmp_path / "c")]
    for bad, needle in (
        (["--save", "/proc/x.json"], "--save /proc/x.json: cannot write in /proc"),
        (["--save", str(tmp_path)], "is a folder"),
        (["--save-pred", str(labels)], "a prediction would replace the dataset's"),
    ):
        result = runner.invoke(app, [*common, *bad])
        assert result.exit_code == 2 and needle in result.output, result.output
    assert tree(labels) == before and not (tmp_path / "c").exists()


def failing_save(monkeypatch, target: str) -> None:
    """Make the final write of ``target`` fail as a full disk would, after the early check passed."""
    real = outputs.save_atomically

    def save(path, write, what):
        if str(path) == target:
            raise ValueError(f"{what}: cannot write it (No space left on device)")
        return real(path, write, what)

    monkeypatch.setattr(outputs, "save_atomically", save)


def test_a_result_that_cannot_be_saved_at_the_end_goes_to_stdout(cache_dir, tmp_path, monkeypatch):
    target = str(tmp_path / "r.json")
    failing_save(monkeypatch, target)
    result = invoke(cache_dir, "synth", "cat", *SYNTH, "--save", target)
    assert result.exit_code == 1
    assert errors(result) == [f"error: --save {target}: cannot write it (No space left on device); the result"
                              " follows on stdout"]  # fmt: skip
    assert json.loads(result.stdout)["classes"][0]["name"] == "cat"  # the finished work, whole


def test_an_explain_picture_that_cannot_be_saved_goes_to_a_named_file(cache_dir, tmp_path, monkeypatch):
    photo(tmp_path / "a.jpg")
    target = str(tmp_path / "why.png")
    failing_save(monkeypatch, target)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = invoke(
        cache_dir, "explain", str(tmp_path / "a.jpg"), "--xy", "1,1", *LOUD, "--classes", "cat", "--out", target
    )
    assert result.exit_code == 1 and "pixel (1, 1)" in result.stdout
    fallback = list((tmp_path / "tmp").glob("ovdiff-explain-*.png"))
    assert len(fallback) == 1 and Image.open(fallback[0]).format == "PNG"
    assert errors(result) == [f"error: --out {target}: cannot write it (No space left on device); the picture was"
                              f" written to {fallback[0]} instead"]  # fmt: skip


def test_explain_writes_jpeg_for_a_jpg_name(cache_dir, tmp_path):
    photo(tmp_path / "a.jpg")
    result = invoke(
        cache_dir, "explain", str(tmp_path / "a.jpg"), "--xy", "1,1", *LOUD, "--classes", "cat",
        "--out", str(tmp_path / "why.jpg"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "why.jpg").format == "JPEG"


# --- item 5: a folder never mixes vocabularies -------------------------------------------------------------------


def test_overwrite_with_other_classes_refuses_to_leave_mislabelled_images(cache_dir, tmp_path):
    photo(tmp_path / "in" / "a.jpg")
    photo(tmp_path / "in" / "normal.jpg", seed=1)
    out = tmp_path / "out"
    assert segment(cache_dir, str(tmp_path / "in"), "--out", str(out)).exit_code == 0
    before = tree(out)
    plain = segment(cache_dir, str(tmp_path / "in" / "a.jpg"), "--out", str(out), "--classes", "cat,dog")
    assert plain.exit_code == 2
    assert errors(plain) == [f"error: --out {out}: holds results for other classes (background, cat); use"
                             " --overwrite or another --out"]  # fmt: skip
    partial = segment(cache_dir, str(tmp_path / "in" / "a.jpg"), "--out", str(out), "--classes", "cat,dog",
                      "--overwrite")  # fmt: skip
    assert partial.exit_code == 2
    assert "--overwrite would leave normal.png, normal_overlay.jpg of images not in this run labelled with the old" \
        " classes (background, cat)" in errors(partial)[0]  # fmt: skip
    assert tree(out) == before  # nothing changed
    whole = segment(cache_dir, str(tmp_path / "in"), "--out", str(out), "--classes", "cat,dog", "--overwrite")
    assert whole.exit_code == 0, whole.output
    legend = json.loads((out / "legend.json").read_text())
    assert [v["name"] for v in legend.values()] == ["background", "cat", "dog"]
    assert all(tree(out)[f] != before[f] for f in ("legend.json",))


# --- item 6: stdout carries one document ---------------------------------------------------------------------------


def test_stdout_gets_one_json_document(cache_dir, tmp_path):
    both = invoke(cache_dir, "synth", "cat", *SYNTH, "--json", "--save", "-")
    assert both.exit_code == 0, both.output
    assert json.loads(both.stdout)["classes"][0]["name"] == "cat"  # parses: printed once, not twice
    photo(tmp_path / "a.jpg")
    explain = ["explain", str(tmp_path / "a.jpg"), "--xy", "1,1", *LOUD, "--classes", "cat"]
    png_and_json = invoke(cache_dir, *explain, "--json", "--out", "-")
    assert png_and_json.exit_code == 2 and png_and_json.stdout == ""
    assert errors(png_and_json) == ["error: --out - and --json: only one of them can write to stdout; give the"
                                    " others a file name"]  # fmt: skip
    once = invoke(cache_dir, *explain, "--json", "--save", "-")
    assert once.exit_code == 0 and json.loads(once.stdout)["label"] in {"cat", "background"}


# --- item 7: an absurd --n stops at once; a large one says what it costs -------------------------------------------


def test_an_absurd_n_is_one_line_and_a_large_one_a_warning(tiny_models):
    result = runner.invoke(app, ["synth", "cat", "--models", "tiny", "--n", "100000000"])
    assert result.exit_code == 2 and errors(result) == [
        "error: --n 100,000,000: more than 10,000 support images per class (the paper uses 32); a class's"
        " prototypes hold every image's features in memory at once"
    ]
    assert pipeline.support_size_note(pipeline.SynthOptions(), tiny_models) is None
    n = D.N_WARN + 88
    note = pipeline.support_size_note(pipeline.SynthOptions(n=n), tiny_models)
    size = n * tiny_models.spec.image_size**2 * D.SUPPORT_BYTES_PER_PIXEL / 1e6
    assert note is not None and note.startswith(f"--n {n}: about {size:.0f} MB of cache per class")


def test_plain_progress_says_the_time_left(capsys, monkeypatch):
    clock = iter([100.0, 104.0, 112.0])
    monkeypatch.setattr("ovdiff_cli.cli.common.time.monotonic", lambda: next(clock))
    progress = RichProgress(True)
    progress.terminal, progress.PLAIN_EVERY = False, 0.0
    progress.start("cat: images", 4)
    progress.advance()  # 1 of 4 in 4 s: 12 s left
    progress.advance(3)
    assert capsys.readouterr().err.splitlines() == [
        "cat: images: 0/4",
        "cat: images: 1/4 (4 s, about 12 s left)",
        "cat: images: 4/4 (12 s)",
    ]
