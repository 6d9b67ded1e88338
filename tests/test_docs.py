"""The docs cannot drift from the code: every `ovdiff` example in README.md and docs/*.md parses, every relative
link points at a file (and a heading) that exists.

Examples are checked at `--help` level: the command path is resolved through the click commands Typer builds, and
every option and the number of positional arguments are compared with what the command declares. No command body
runs, so this takes well under a second. No example needs skipping: the only placeholders, optional parts in
`[...]`, are checked as if given. Lines that start with another program (`sbatch --wrap "ovdiff ..."`, `torchrun
-m ovdiff_cli ...`) are not examined.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core

from ovdiff_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# Where a shell line stops being the ovdiff command: a pipe, a redirection, a second command.
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<"}


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced code block."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and current is None:
            lang, current = fence["lang"], []
        elif line.startswith("```") and current is not None:
            blocks.append((lang, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def ovdiff_examples(text: str) -> list[str]:
    """Every shell line of a fenced block that runs `ovdiff` (a `$ ` prompt allowed), continuation lines joined."""
    examples = []
    for lang, lines in fenced_blocks(text):
        if lang not in SHELL_FENCES:
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.strip().removeprefix("$ ")
            if command.startswith("ovdiff "):
                examples.append(command)
    return examples


def argv(example: str) -> list[str]:
    """The arguments of an example's `ovdiff` command: comments, pipes and redirections cut off. Square brackets
    mark optional parts (`[--with-support]`, `[SET]`); they are dropped, so the optional parts are checked too."""
    lexer = shlex.shlex(example, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token in SHELL_OPERATORS:
            break
        tokens.append(token.removeprefix("[").removesuffix("]"))
    assert tokens[0] == "ovdiff", example
    return tokens[1:]


def _problem_with_options(
    command: typer.core.TyperCommand | typer.core.TyperGroup, ctx: Any, args: list[str]
) -> str | None:
    """What is wrong with ARGS for a command that takes no sub-command: an option it does not declare, an option
    without its value, too few or too many positional arguments. None when they parse. (CTX is a click context of
    the click Typer vendors, which exports no type for it.)"""
    params = command.get_params(ctx)  # with the help option, -h included
    options = {name: p for p in params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}
    positional = 0
    rest = list(args)
    while rest:
        token = rest.pop(0)
        if not token.startswith("-") or token == "-":
            positional += 1
            continue
        name, has_value, _ = token.partition("=")
        option = options.get(name)
        if option is None:
            return f"{ctx.command_path}: no option {name}"
        values = 0 if option.is_flag or option.count else option.nargs
        if has_value:
            values -= 1
        if values < 0 or len(rest) < values:
            return f"{ctx.command_path}: {name} takes {option.nargs if values >= 0 else 'no'} value(s)"
        del rest[:values]
    arguments = [p for p in params if p.param_type_name == "argument"]
    fewest = sum(max(p.nargs, 1) for p in arguments if p.required)
    most = float("inf") if any(p.nargs == -1 for p in arguments) else sum(p.nargs for p in arguments)
    if not fewest <= positional <= most:
        return f"{ctx.command_path}: {positional} positional arguments, expected {fewest} to {most}"
    return None


def problem(args: list[str]) -> str | None:
    """What is wrong with `ovdiff ARGS` at `--help` level, or None: the sub-command path is walked as click would
    (a group's own options first, then its `resolve_command`, which also knows `ovdiff eval voc` = `eval run voc`),
    and the last command's options and positional arguments are checked. Nothing is invoked."""
    command = CLI
    ctx = command.context_class(command, info_name="ovdiff", **command.context_settings)
    rest = list(args)
    while hasattr(command, "resolve_command"):
        leading = 0
        while leading < len(rest) and rest[leading].startswith("-"):
            leading += 1
        issue = _problem_with_options(command, ctx, rest[:leading])
        if issue or leading == len(rest):  # `ovdiff --version`, or a group's own help
            return issue
        try:
            name, command, rest = command.resolve_command(ctx, rest[leading:])
        except Exception as error:  # click's UsageError, whose class Typer's vendored click does not export
            return f"{ctx.command_path}: {error}"
        ctx = command.context_class(command, info_name=name, parent=ctx, **command.context_settings)
    return _problem_with_options(command, ctx, rest)


CLI = typer.main.get_command(app)  # the click command tree, built once
EXAMPLES = [(page, example) for page in PAGES for example in ovdiff_examples(page.read_text(encoding="utf-8"))]


def test_the_docs_have_examples():
    """The scan finds the examples: every command page shows its command (a broken scan would pass vacuously)."""
    assert len(EXAMPLES) > 40
    shown = {argv(example)[0] for _, example in EXAMPLES}
    assert {"synth", "segment", "explain", "eval", "models", "cache"} <= shown


@pytest.mark.parametrize(("page", "example"), EXAMPLES, ids=[f"{p.name}:{e[:60]}" for p, e in EXAMPLES])
def test_every_example_parses(page: Path, example: str):
    assert problem(argv(example)) is None, f"{page.relative_to(ROOT)}: {example}"


def test_the_checker_refuses_what_the_cli_refuses():
    """A made-up option, sub-command or missing value, and a wrong positional count, are each caught."""
    ok = argv("ovdiff segment 'photos/**/*.jpg' --classes cat,dog --out out/ --no-filter -h | cat  # comment")
    assert ok == ["segment", "photos/**/*.jpg", "--classes", "cat,dog", "--out", "out/", "--no-filter", "-h"]
    assert problem(ok) is None
    assert problem(argv("ovdiff eval voc --root data --json")) is None  # the DATASET form of `eval run`
    assert problem(argv("ovdiff cache export banks.ovd [--classes cat,dog] [--with-support]")) is None
    assert problem(["--version"]) is None
    assert "no option --made-up" in problem(["synth", "cat", "--made-up", "1"])
    assert "no option --out" in problem(["synth", "cat", "--out=x"])
    assert "No such command" in problem(["synthesize", "cat"])
    assert "No such command" in problem(["models", "download", "sd15"])
    assert "takes" in problem(["segment", "photos/", "--classes", "cat", "--out"])
    assert "positional" in problem(["explain", "--xy", "1,2", "--classes", "cat"])
    assert "positional" in problem(["explain", "a.jpg", "b.jpg", "--xy", "1,2"])
    assert "positional" in problem(["models", "list", "sd15"])
    shown = ovdiff_examples("```bash\novdiff synth cat \\\n  --n 4\n```\n```python\novdiff = 1\n```")
    assert [argv(example) for example in shown] == [["synth", "cat", "--n", "4"]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    code = {line for _, lines in fenced_blocks(text) for line in lines}
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#") and line not in code}


def broken_links(page: Path) -> list[str]:
    """Relative links of PAGE (outside code blocks) whose file, or heading after `#`, does not exist."""
    text = page.read_text(encoding="utf-8")
    for _, lines in fenced_blocks(text):
        text = text.replace("\n".join(lines), "")
    broken = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_at_existing_files(page: Path):
    assert broken_links(page) == []


def test_the_link_checker_catches_a_broken_link(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading: `with code`\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x)\n"
        "[gone](missing.md) ![gone](img/none.jpg) [bad](there.md#no-such)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "img/none.jpg: no such file",
        "there.md#no-such: no such heading",
    ]
