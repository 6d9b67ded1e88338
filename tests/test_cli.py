"""The command line, driven through Typer's CliRunner and real subprocesses (CPU, tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovdiff_cli import __version__
from ovdiff_cli.cli import app

runner = CliRunner()
TINY = ["--models", "tiny", "--n", "2", "--steps", "2", "--batch-size", "2", "--k", "3"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from ovdiff_cli.cli import app\n"
        "for args in (['--version'], ['--help'], ['-h'], ['synth', '--help'], ['segment', '-h'], ['eval', 'voc', '-h'],"
        " ['cache', 'ls', '-h'], ['models', 'list']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO-TORCH")
    assert f"ovdiff {__version__}" in out.stdout


def test_synth_json_cold_then_warm():
    cold = invoke("synth", "cat", "potted plant", *TINY, "--json")
    assert cold.exit_code == 0, cold.output
    doc = json.loads(cold.stdout)
    assert doc["models"]["name"] == "tiny" and doc["models"]["meaningful"] is False
    assert doc["scheduler"] == "dpmsolver++" and doc["masker"] == "cutler"  # tiny has a (random) CutLER
    assert [c["name"] for c in doc["classes"]] == ["cat", "potted plant"]
    for c in doc["classes"]:
        assert c["images_generated"] == 2 and c["images_cached"] == 0
        # per extractor: one class prototype per non-empty region (fg, and bg unless refinement emptied it), at
        # most N instances each
        assert set(c["prototypes"]) == {"sd", "dino", "clip"}
        for counts in c["prototypes"].values():
            assert counts["class"] in (0, 1, 2) and counts["instance"] <= 4
        assert len(c["digest"]) == 64
    warm = json.loads(invoke("synth", "cat", "potted plant", *TINY, "--json").stdout)
    assert [c["images_cached"] for c in warm["classes"]] == [2, 2]
    assert [c["digest"] for c in warm["classes"]] == [c["digest"] for c in doc["classes"]]


def test_synth_table_and_stuff_file(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\ncat\nsky\tstuff\n\n")
    result = invoke("synth", "--classes-file", str(classes), *TINY)
    assert result.exit_code == 0, result.output
    assert "sky (stuff)" in result.stdout and "cat" in result.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("no classes",)),
        (("cat", "Cat "), ("listed twice",)),
        (("cat", "d\x07og"), ("control character",)),
        (("cat", "--stuff", "sky"), ("--stuff 'sky'",)),
        (("cat", "--masker", "magic"), ("magic", "maskcut")),
        (("cat", "--extractors", "sd,surf"), ("surf", "dino")),
        (("cat", "--n", "0"), ("--n 0",)),
        (("cat", "--models", "nonexistent"), ("nonexistent", "tiny")),
        (("cat", "--device", "tpu"), ("tpu",)),
        (("cat", "--masker", "cutler", "--models", "tiny,cutler=/nonexistent.pth"), ("cutler", "checkpoint file")),
        (("cat", "--scheduler", "euler"), ("--scheduler 'euler'", "dpmsolver++", "ddim")),
        (("cat", "--precision", "fp8"), ("--precision 'fp8'", "fp32")),
        (("cat", "--stuff-table", "mine"), ("--stuff-table 'mine'", "paper")),
    ],
)
def test_synth_usage_errors(args, needles):
    extra = [] if "--models" in args else ["--models", "tiny"]
    one_line_error(invoke("synth", *args, *extra), *needles)


def test_explicit_cutler_without_its_checkpoint_fails_at_once(tmp_path):
    empty = tmp_path / "cutler"
    empty.mkdir()
    result = invoke("synth", "cat", "--masker", "cutler", "--models", f"tiny,cutler={empty}")
    one_line_error(result, "CutLER detector", "no checkpoint")


def test_sd15_offline_fails_at_once_naming_the_model():
    result = invoke("synth", "cat", "--models", "sd15")
    one_line_error(result, "stable-diffusion-v1-5", "ovdiff models fetch", "--models tiny")


def test_models_list_offline():
    result = invoke("models", "list", "--json")
    assert result.exit_code == 0, result.output
    sets = {s["name"]: s for s in json.loads(result.stdout)}
    assert {c["status"] for c in sets["tiny"]["components"].values()} == {"built-in"}
    assert {c["status"] for c in sets["sd15"]["components"].values()} == {"missing"}
    assert "451f4fe" in sets["sd15"]["components"]["sd"]["source"]


def test_models_fetch_unknown_and_tiny():
    one_line_error(invoke("models", "fetch", "sd99"), "sd99", "sd15")
    assert "nothing to fetch" in invoke("models", "fetch", "tiny").stdout


def test_cache_info_and_clear(tmp_path):
    assert invoke("synth", "cat", *TINY).exit_code == 0
    info = json.loads(invoke("cache", "info", "--json").stdout)
    assert info["stages"]["support"]["entries"] == 2 and info["stages"]["bank"]["entries"] == 1
    cleared = invoke("cache", "clear", "--stage", "bank")
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.stdout
    info = json.loads(invoke("cache", "info", "--json").stdout)
    assert "bank" not in info["stages"] and info["stages"]["support"]["entries"] == 2
    one_line_error(invoke("cache", "clear", "--stage", "banks"), "'banks'", "support, proposals, bank")


def test_cache_clear_asks_on_a_terminal(tmp_path, monkeypatch):
    from ovdiff_cli.cli import cache as cache_cli

    assert invoke("synth", "cat", *TINY).exit_code == 0
    monkeypatch.setattr(cache_cli, "_on_a_terminal", lambda: True)

    def clear(answer: str, *extra: str):
        return runner.invoke(app, ["cache", "clear", "--stage", "support", *extra], input=answer)

    no = clear("n\n")
    assert no.exit_code == 1 and "delete 2 entries" in no.output and "nothing deleted" in no.output
    assert json.loads(invoke("cache", "info", "--json").stdout)["stages"]["support"]["entries"] == 2
    yes = clear("", "--yes")  # no question asked
    assert yes.exit_code == 0 and "delete" not in yes.output and "removed 2 entries" in yes.stdout


def test_not_a_cache_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    one_line_error(invoke("cache", "info", "--cache-dir", str(folder)), str(folder))


def test_real_subprocess_synth_json_stdout_is_pure(tmp_path):
    """Logs and notes go to stderr: stdout parses as JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", "synth", "cat", *TINY, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["classes"][0]["images_generated"] == 2
    assert "not meaningful" in proc.stderr
    # -q: nothing but errors, the random-weights note included; -v: the load times too.
    quiet = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", "synth", "dog", *TINY, "--json", "-q"], capture_output=True, text=True
    )
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", "synth", "cow", *TINY, "--json", "-v"], capture_output=True, text=True
    )
    assert loud.returncode == 0 and "loaded Stable Diffusion in " in loud.stderr and "(fp32, cpu)" in loud.stderr


def test_environment_is_offline_and_quiet_unless_asked(monkeypatch):
    import logging

    from ovdiff_cli.cli import _environment

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    ours = logging.getLogger("ovdiff")
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(ours, "propagate", True)  # restored after the test, as the level and handlers are
    _environment(["ovdiff", "synth", "cat"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # weights are never fetched implicitly: no network at all
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # never spin-wait on a shared machine
    assert ours.level == logging.WARNING  # notes by default; load times only with -v
    assert os.environ["TRANSFORMERS_VERBOSITY"] == os.environ["DIFFUSERS_VERBOSITY"] == "error"
    assert root.level == logging.ERROR
    # -v shows the libraries' own messages; models fetch may use the network.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(name)
    root.setLevel(logging.WARNING)
    _environment(["ovdiff", "models", "fetch", "sd15", "-v"])
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_VERBOSITY" not in os.environ
    assert root.level == logging.WARNING
    assert len(ours.handlers) == 1 and ours.level == logging.INFO
    _environment(["ovdiff", "segment", "x", "-q"])
    assert len(ours.handlers) == 1 and ours.level == logging.ERROR  # quiet is quiet: errors only


def test_threads_option_is_checked(tmp_path):
    result = CliRunner().invoke(app, ["synth", "cat", "--models", "tiny", "--threads", "0"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: --threads 0: expected a whole number of threads, at least 1"
    ]


def test_a_folder_where_a_file_is_expected_says_so(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    f = str(folder)
    one_line_error(invoke("explain", f, "--xy", "1,1", "--classes", "cat", "--models", "tiny"), "is a folder")
    one_line_error(invoke("synth", "--classes-file", f, "--models", "tiny"), f"--classes-file {f}: is a folder")
    one_line_error(invoke("cache", "import", f), f"{f}: is a folder")
    one_line_error(invoke("eval", "merge", f), f"{f}: is a folder")
    one_line_error(invoke("models", "convert", "cutler", f), f"{f}: is a folder")


def test_cache_ls_and_segment_says_what_it_synthesises(tmp_path):
    """No silent work: segment names the classes it must synthesise for its settings and the settings the cache
    holds for them, and its summary counts that time; `cache ls` lists every bank with its settings."""
    small = ["--models", "tiny", "--steps", "2", "--k", "3"]
    assert invoke("synth", "cat", *small, "--n", "2").exit_code == 0
    assert invoke("synth", "cat", *small, "--n", "3", "--masker", "maskcut").exit_code == 0
    listing = json.loads(invoke("cache", "ls", "--json").stdout)["banks"]
    assert [(b["class"], b["n"], b["steps"], b["masker"], b["model_set"], b["precision"]) for b in listing] == [
        ("cat", 2, 2, "cutler", "tiny", "fp32"),
        ("cat", 3, 2, "maskcut", "tiny", "fp32"),
    ]
    assert all(b["extractors"] == ["clip", "dino", "sd"] and b["bytes"] > 0 for b in listing)
    table = invoke("cache", "ls", "--class", "dog")
    assert table.exit_code == 0 and "no prototype banks for 'dog'" in table.stderr  # stdout: the TSV header only
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(img)
    seg = invoke("segment", str(img), "--classes", "cat", *small, "--n", "4", "--out", str(tmp_path / "out"))
    assert seg.exit_code == 0, seg.output
    notes = [ln for ln in seg.stderr.splitlines() if ln.startswith("note:")]
    assert notes[0] == (
        "note: synthesising 1 class first (4 images each; no cached prototypes for tiny, n 4, steps 2, seed 42,"
        " masker cutler, batch_size 4, precision fp32, clip+dino+sd): cat"
    )
    assert notes[1] == (
        "note: cached for cat with other settings: tiny, n 2, steps 2, seed 42, masker cutler, batch_size 2,"
        " precision fp32, clip+dino+sd; tiny, n 3, steps 2, seed 42, masker maskcut, batch_size 3, precision fp32,"
        " clip+dino+sd (pass those options to use them)"
    )
    assert "; before that, synthesised cat in " in seg.stdout
    again = invoke("segment", str(img), "--classes", "cat", *small, "--n", "4", "--out", str(tmp_path / "o2"))
    assert "synthesising" not in again.output and "before that" not in again.stdout  # nothing to make this time


def test_readme_generated_blocks_have_their_markers():
    """`make readme` rewrites the real outputs between markers in README.md and docs/*.md; every block it makes must
    be marked, exactly once."""
    script = Path(__file__).resolve().parents[1] / "examples" / "readme_outputs.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_progress_off_a_terminal_is_plain_lines_and_quiet_has_none():
    """Logs and batch jobs (stderr not a terminal) get plain progress lines: one when a stage starts, then as it
    advances; -q prints none."""
    result = invoke("synth", "cat", *TINY)
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert "cat: images: 0/2" in lines and any(ln.startswith("cat: images: 2/2 (") for ln in lines)
    assert any(ln.startswith("cat: prototypes: 1/1 (") for ln in lines)
    quiet = invoke("synth", "dog", *TINY, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


# --- issue 22: tables, read-only cache commands, option names, -h, -q/-v, class names ------------------------------


def tsv(text: str) -> list[list[str]]:
    """Rows of tab-separated output; every row has the header's number of fields."""
    rows = [line.split("\t") for line in text.splitlines()]
    assert rows and all(len(r) == len(rows[0]) for r in rows), text
    return rows


LONG = "a very long class name that a narrow table would cut"


def test_tables_off_a_terminal_are_tab_separated_whole_values():
    """Piped or logged (CliRunner's stdout is no terminal): a header line and one tab-separated line per row, every
    value whole: never the rich box table squeezed to 80 columns."""
    synth = invoke("synth", "cat", LONG, *TINY)
    assert synth.exit_code == 0, synth.output
    rows = tsv(synth.stdout)
    assert rows[0] == [
        "class",
        "images new",
        "images cached",
        "photos",
        "prototypes class/instance/part",
        "digest",
        "seconds",
    ]
    assert [r[0] for r in rows[1:]] == ["cat", LONG]
    assert all(len(r[5]) == 64 for r in rows[1:])  # the whole digest (the terminal shows 12 characters)
    assert rows[1][1:4] == ["2", "0", "0"] and rows[1][4].startswith("clip ")
    listing = invoke("cache", "ls")
    assert listing.exit_code == 0 and "…" not in listing.stdout and "┃" not in listing.stdout
    rows = tsv(listing.stdout)
    assert rows[0][:4] == ["class", "models", "generated", "photos"] and rows[0][-2:] == ["stored", "size"]
    by_class = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert set(by_class) == {"cat", LONG}
    assert by_class[LONG]["masker"] == "cutler" and by_class[LONG]["extractors"] == "clip,dino,sd"
    stored = json.loads(invoke("cache", "ls", "--json").stdout)["banks"][0]["stored"]
    assert by_class[LONG]["stored"] == stored  # the whole ISO time, seconds and zone included
    info = tsv(invoke("cache", "info").stdout)
    assert info[0] == ["stage", "entries", "size"] and info[-1][:2] == ["total", "10"]
    assert {r[0]: r[1] for r in info[1:]} == {"bank": "2", "proposals": "4", "support": "4", "total": "10"}
    models = tsv(invoke("models", "list").stdout)
    assert models[0] == ["set", "network", "source", "status"]
    assert ["tiny", "Stable Diffusion", "built in-process (seed 0)", "built-in"] in models
    assert any(r[2].startswith("stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe") for r in models)
    empty = invoke("cache", "ls", "--class", "dog")  # no rows: the header alone on stdout, the note on stderr
    assert empty.stdout.splitlines() == ["\t".join(rows[0])] and "no prototype banks for 'dog'" in empty.stderr


def test_tables_on_a_terminal_stay_tables(monkeypatch):
    import io

    from rich.console import Console

    from ovdiff_cli.cli import common

    screen = Console(file=io.StringIO(), force_terminal=True, width=100, highlight=False)
    monkeypatch.setattr(common, "out", screen)
    common.print_table(
        ("set", "class", "digest"),
        [("A", "[bold]cat", "0123456789abcdef"), ("A", "dog", "fedcba9876543210"), ("B", "cow", "00")],
        title="where",
        shown={"digest": lambda d: d[:4]},
        style=lambda column, value: "red" if column == "class" else None,
        group=True,
    )
    text = screen.file.getvalue()
    assert "┃" in text and "where" in text and "\t" not in text
    assert "[bold]cat" in text  # values are text, never markup
    assert "0123" in text and "0123456789" not in text  # the short form on a terminal
    assert text.count(" A ") == 1 and " B " in text  # the group's name once


def test_real_subprocess_piped_table_is_tsv(tmp_path):
    """`ovdiff cache ls | head`: a real pipe."""
    cache = str(tmp_path / "c")
    assert invoke("synth", LONG, *TINY, "--cache-dir", cache).exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", "cache", "ls", "--cache-dir", cache],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = tsv(proc.stdout)
    assert rows[1][0] == LONG and len(rows) == 2


@pytest.mark.parametrize("command", [["ls"], ["info"], ["clear", "--yes"], ["export", "x.ovd"]])
def test_read_only_cache_commands_refuse_a_missing_folder(tmp_path, command, monkeypatch):
    typo = tmp_path / "cahce"
    one_line_error(invoke("cache", *command, "--cache-dir", str(typo)), f"--cache-dir {typo}: no such folder")
    assert not typo.exists()  # not created
    monkeypatch.setenv("OVDIFF_CACHE", str(typo))
    one_line_error(invoke("cache", *command), f"$OVDIFF_CACHE {typo}: no such folder")
    assert not typo.exists()


def test_writing_commands_still_create_the_cache(tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    assert invoke("synth", "cat", *TINY, "--cache-dir", str(fresh)).exit_code == 0
    assert json.loads(invoke("cache", "info", "--json", "--cache-dir", str(fresh)).stdout)["stages"]["bank"]


def test_option_errors_name_the_option_typed(tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    seg = ["segment", str(img), "--classes", "cat", "--models", "tiny", "--out", str(tmp_path / "out")]
    one_line_error(invoke(*seg, "--window-batch", "0"), "--window-batch 0: must be at least 1")
    one_line_error(invoke(*seg, "--batch-size", "0"), "--batch-size 0: must be at least 1")
    one_line_error(invoke("synth", "cat", "--models", "tiny", "--batch-size", "0"), "--batch-size 0")
    from ovdiff_cli.segmentation import SegmentOptions

    assert SegmentOptions.option("batch_size") == "--window-batch" and SegmentOptions.option("eta") == "--eta"


def _commands(group, path=()):
    """Every command and subcommand of the app, as argument lists."""
    for name, cmd in group.commands.items():
        yield [*path, name]
        if hasattr(cmd, "commands"):  # a group
            yield from _commands(cmd, (*path, name))


def test_dash_h_is_help_everywhere():
    import typer

    commands = [[], *_commands(typer.main.get_command(app))]
    assert ["eval", "merge"] in commands and ["cache", "ls"] in commands and ["segment"] in commands
    for words in commands:
        short, long = invoke(*words, "-h"), invoke(*words, "--help")
        assert short.exit_code == 0 and short.stdout == long.stdout, (words, short.output)
        assert short.stdout.startswith("Usage: ") and "-h, --help" in short.stdout
    assert invoke("eval", "voc", "-h").stdout == invoke("eval", "run", "--help").stdout


@pytest.mark.parametrize("command", [["synth", "cat"], ["segment", "x.png", "--out", "o"], ["eval", "voc"]])
@pytest.mark.parametrize("flags", [["-q", "-v"], ["--verbose", "--quiet"]])
def test_quiet_and_verbose_together_is_a_usage_error(command, flags):
    one_line_error(invoke(*command, *flags, "--models", "tiny"), "-q/--quiet and -v/--verbose: give one of them")


def test_verbose_shows_options_as_key_value_text():
    loud = invoke("synth", "cat", *TINY, "-v")
    assert loud.exit_code == 0, loud.output
    line = next(ln for ln in loud.stderr.splitlines() if ln.startswith("models tiny on cpu;"))
    assert "SynthOptions(" not in line and "(" not in line.split(";")[2]
    assert "; n=2, steps=2, scheduler=dpmsolver++, guidance=8, seed=42, batch-size=2, masker=auto," in line
    assert "extractors=sd,dino,clip, k=3," in line
    from ovdiff_cli.cli.common import options_text
    from ovdiff_cli.segmentation import SegmentOptions

    text = options_text(SegmentOptions(scales="64,48", batch_size=4, pamr=True))
    assert text.startswith("scales=64,48, stride=224, whole-image=on,") and "pamr=on" in text
    assert "window-batch=4" in text and "batch-size" not in text


def an_image(tmp_path: Path) -> str:
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    return str(img)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["synth", "potted\tplant"], "class 'potted\\tplant' in the arguments: contains control character '\\t'"),
        (["synth", "cat", "d\x07og"], "class 'd\\x07og' in the arguments: contains control character '\\x07'"),
        (
            ["segment", "IMG", "--out", "o", "--classes", "cat,potted\tplant"],
            "class 'potted\\tplant' in --classes: contains control character '\\t'",
        ),
    ],
)
def test_a_control_character_inside_a_class_name_stops_the_run(tmp_path, args, shown):
    args = [an_image(tmp_path) if a == "IMG" else a for a in args]
    one_line_error(invoke(*args, "--models", "tiny"), shown)


def test_classes_file_control_character_and_tab_column(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("dog\nsky\tstuff\nd\x07g\n", encoding="utf-8")
    one_line_error(
        invoke("synth", "--classes-file", str(bad), "--models", "tiny"),
        f"class 'd\\x07g' in {bad} line 3: contains control character '\\x07'",
    )
    good = tmp_path / "good.txt"
    good.write_text("potted, plant\tthing\nsky\tstuff\n", encoding="utf-8")  # the tab separates the column
    result = invoke("synth", "--classes-file", str(good), *TINY)
    assert result.exit_code == 0, result.output
    assert [r[0] for r in tsv(result.stdout)[1:]] == ["potted, plant", "sky (stuff)"]


def test_a_class_listed_twice_names_both_places(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("dog\nsky\tstuff\nCat\n", encoding="utf-8")
    seg = ["segment", an_image(tmp_path), "--out", str(tmp_path / "o"), "--models", "tiny"]
    one_line_error(
        invoke(*seg, "--classes", "cat", "--classes-file", str(f)),
        f"class 'Cat' is listed twice: in --classes as 'cat' and in {f} line 3",
    )
    one_line_error(
        invoke("synth", "dog", "--classes-file", str(f), "--models", "tiny"),
        f"class 'dog' is listed twice: in the arguments and in {f} line 1",
    )
    one_line_error(invoke(*seg, "--classes", "cat,dog,CAT"), "class 'CAT' is listed twice in --classes (also as 'cat')")


def test_messages_list_names_as_text_not_python_lists():
    from ovdiff_cli import cache as cachelib
    from ovdiff_cli import sharing
    from ovdiff_cli.extractors.base import parse_extractors

    payload = cachelib.encode_arrays({"image_png": np.zeros(1, np.uint8), "mask": np.zeros(1, np.uint8)})
    with pytest.raises(ValueError) as info:
        sharing._check_payload("support", payload, "cat")
    assert str(info.value) == "a support entry holds image_png, mask, expected attribution, image_png, residual"
    with pytest.raises(ValueError) as info:
        parse_extractors(("sd", "sd"))
    assert str(info.value) == "--extractors 'sd,sd': an extractor is listed twice"
