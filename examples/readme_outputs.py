"""Regenerate the docs' real outputs (``make readme``), so their digests, counts and timings never go stale.

Each generated block sits between ``<!-- readme_outputs: NAME -->`` and ``<!-- /readme_outputs -->`` in one of
README.md and docs/*.md (each block in exactly one file). This script runs the commands the block shows, offline
with the tiny models in a scratch folder, and writes their output there. Everything else is left as it is.

    python examples/readme_outputs.py [FILE ...] [--check]

FILE defaults to README.md and every docs/*.md. ``--check`` rewrites nothing and exits 1 if a block's marker is
missing, unknown or repeated (the outputs themselves hold timings, so they are expected to differ from run to run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = ["--models", "tiny"]


def ovdiff(work: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``ovdiff ARGS`` in ``work`` with its own cache there; stop on failure."""
    env = {**os.environ, "OVDIFF_CACHE": str(work / "cache"), "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "ovdiff_cli", *args], cwd=work, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise SystemExit(f"ovdiff {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def compact(value: object, indent: int = 0, lead: int = 0, width: int = 116) -> str:
    """JSON laid out for reading: a value that fits on its line stays on one line, a longer object or list gets
    one member per line (what the README's hand-wrapped examples looked like). ``lead``: characters already on
    the value's first line."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(flat) + max(indent, lead) <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k)}: {compact(v, indent + 2, indent + 4 + len(json.dumps(k)), width)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + compact(v, indent + 2, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def fenced(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def synth_json(work: Path) -> str:
    """The offline synth example: two classes, first run."""
    proc = ovdiff(work, "synth", "cat", "potted plant", *TINY, "--n", "4", "--steps", "4", "--json")
    return fenced(compact(json.loads(proc.stdout)), "json")


def synth_table(work: Path) -> str:
    """The same example's second run (everything cached), piped: the tab-separated summary."""
    args = ["synth", "cat", "potted plant", *TINY, "--n", "4", "--steps", "4"]
    ovdiff(work, *args, "-q")
    return fenced(
        "\n".join(
            [
                f"$ ovdiff {' '.join(a if ' ' not in a else repr(a) for a in args)} | cat",
                ovdiff(work, *args, "-q").stdout.rstrip(),
            ]
        )
    )


def _demo(work: Path) -> list[str]:
    """The demo's scenes and classes synthesised, as `make demo` does; returns the segment arguments."""
    subprocess.run([sys.executable, str(HERE / "draw_scenes.py"), str(work / "images"), "--count", "4"], check=True)
    classes = ["--classes-file", str(HERE / "scene_classes.txt")]
    ovdiff(work, "synth", *classes, *TINY, "--n", "8", "--steps", "10", "-q")
    return ["segment", "images", "--out", "demo-out/segment", *classes, *TINY, "--n", "8", "--steps", "10"]


def segment_json(work: Path) -> str:
    """The demo's segment step with --scores --json (the pre-filter on)."""
    proc = ovdiff(work, *_demo(work), "--scores", "--json", "-q")
    return fenced(compact(json.loads(proc.stdout)), "json")


def segment_line(work: Path) -> str:
    """The same step without --json: its one summary line."""
    proc = ovdiff(work, *_demo(work), "--overwrite", "-q")
    return fenced(proc.stdout.strip())


def eval_demo_line(work: Path) -> str:
    """`make eval-demo`'s unsharded run, quiet: its summary line."""
    subprocess.run([sys.executable, str(HERE / "synthetic_voc.py"), str(work / "data"), "--count", "20"], check=True)
    args = ["eval", "voc", "--root", "data", *TINY, "--n", "8", "--steps", "10", "--short-side", "128"]
    proc = ovdiff(work, *args, "--scales", "128,96", "--stride", "64", "--quiet")
    return fenced(proc.stdout.strip())


def no_silent_work(work: Path) -> str:
    """segment telling what it synthesises, after synth runs with other settings."""
    small = [*TINY, "--steps", "2", "--k", "3"]
    ovdiff(work, "synth", "cat", *small, "--n", "2", "-q")
    ovdiff(work, "synth", "cat", *small, "--n", "3", "--masker", "maskcut", "-q")
    subprocess.run([sys.executable, str(HERE / "draw_scenes.py"), str(work / "one"), "--count", "1"], check=True)
    args = ["segment", "one/scene_00.jpg", "--classes", "cat", *small, "--n", "4", "--out", "out"]
    proc = ovdiff(work, *args)
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: synth") or "other settings" in line]
    return fenced("\n".join([f"$ ovdiff {' '.join(args)}", *notes, proc.stdout.strip()]))


def photo_demo(work: Path) -> str:
    """`make demo`'s photo class: synth from the drawn kite photos (its table), then explain a kite pixel."""
    subprocess.run([sys.executable, str(HERE / "draw_photos.py"), str(work / "demo-out" / "photos")], check=True)
    demo = [*TINY, "--n", "8", "--steps", "10"]
    synth = ["synth", "kite", "--photos", "demo-out/photos/kite", "--photo-masks", "demo-out/photos/kite-masks"]
    synth += [*demo, "--n", "0"]
    # The classes file names the photo folders relative to itself: a copy beside demo-out/ finds them there.
    (work / "examples").mkdir()
    (work / "examples" / "photo_classes.txt").write_text((HERE / "photo_classes.txt").read_text(encoding="utf-8"))
    explain = ["explain", "demo-out/photos/scene_kite.jpg", "--xy", "330,60", "--out", "demo-out/explain_kite.png"]
    explain += ["--classes-file", "examples/photo_classes.txt", *demo, "--no-filter"]
    lines = []
    for args in (synth, explain):
        lines += [f"$ ovdiff {' '.join(args)}", ovdiff(work, *args, "-q").stdout.rstrip()]
    return fenced("\n".join(lines))


BLOCKS: dict[str, Callable[[Path], str]] = {
    "synth-json": synth_json,
    "synth-table": synth_table,
    "segment-json": segment_json,
    "segment-line": segment_line,
    "eval-demo-line": eval_demo_line,
    "no-silent-work": no_silent_work,
    "photo-demo": photo_demo,
}
MARKED = re.compile(r"(<!-- readme_outputs: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /readme_outputs -->)", re.S)


def marked_files(files: list[Path]) -> dict[Path, str]:
    """The text of every file that holds markers, after checking that each block is marked exactly once."""
    texts = {path: path.read_text(encoding="utf-8") for path in files}
    where: dict[str, list[str]] = {}
    for path, text in texts.items():
        for m in MARKED.finditer(text):
            where.setdefault(m["name"], []).append(str(path))
    problems = [
        *(f"block {name!r} has no markers" for name in sorted(set(BLOCKS) - set(where))),
        *(
            f"markers {name!r} ({', '.join(paths)}) name no block"
            for name, paths in where.items()
            if name not in BLOCKS
        ),
        *(
            f"block {name!r} is marked more than once: {', '.join(paths)}"
            for name, paths in where.items()
            if len(paths) > 1
        ),
    ]
    if problems:
        raise SystemExit(f"in {', '.join(map(str, files))}: " + "; ".join(problems))
    return {path: text for path, text in texts.items() if MARKED.search(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="markdown files to scan (default: README.md, docs/*.md)")
    parser.add_argument("--check", action="store_true", help="only check that every block has its markers")
    args = parser.parse_args()
    files = args.files or [HERE.parent / "README.md", *sorted((HERE.parent / "docs").glob("*.md"))]
    texts = marked_files(files)
    if args.check:
        return
    outputs = {}
    for name, make in BLOCKS.items():
        with tempfile.TemporaryDirectory() as tmp:
            print(f"== {name}", flush=True)
            outputs[name] = make(Path(tmp))
    for path, text in texts.items():
        path.write_text(MARKED.sub(lambda m: m[1] + outputs[m["name"]] + m[4], text), encoding="utf-8")
        print(f"rewrote {len(MARKED.findall(text))} blocks in {path}")


if __name__ == "__main__":
    main()
