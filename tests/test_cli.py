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
        "for args in (['--version'], ['--help'], ['synth', '--help'], ['segment', '--help'], ['models', 'list']):\n"
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
    assert table.exit_code == 0 and "no prototype banks for 'dog'" in table.stdout
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
    """`make readme` rewrites the README's real outputs between markers; every block it makes must be marked."""
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
