"""The command line, driven through Typer's CliRunner and real subprocesses (CPU, tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
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


def test_environment_is_offline_and_quiet_unless_asked(monkeypatch):
    import logging

    from ovdiff_cli.cli import _environment

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    _environment(["ovdiff", "synth", "cat"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # weights are never fetched implicitly: no network at all
    assert os.environ["TRANSFORMERS_VERBOSITY"] == os.environ["DIFFUSERS_VERBOSITY"] == "error"
    assert root.level == logging.ERROR
    # -v shows the libraries' own messages; models fetch may use the network.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(name)
    root.setLevel(logging.WARNING)
    _environment(["ovdiff", "models", "fetch", "sd15", "-v"])
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_VERBOSITY" not in os.environ
    assert root.level == logging.WARNING
