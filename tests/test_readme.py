"""The README's commands and paths exist: every `llm SUBCOMMAND` is in `llm --help`, every
`make TARGET` is a Makefile target, every docs/, presets/, benchmarks/ (and llm/, tests/) path it
names is in the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = {"", "bash", "sh", "shell", "console"}  # a fence marked text, yaml, python, ... holds no commands
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|[\s$(;&|])(llm|make)\s+([a-z][\w-]*)")  # `llm STAGE`: a placeholder
REPO_PATH = re.compile(r"^(?:docs|presets|benchmarks|llm|tests)/[\w./-]*$")


def code_of(text: str) -> list[str]:
    """The shell blocks (less their `# ...` comments) and the inline code spans of a markdown text."""
    shell = [body for lang, body in FENCE.findall(text) if lang.strip() in SHELL]
    blocks = [re.sub(r"(^|\s)#.*$", "", line) for body in shell for line in body.splitlines()]
    return blocks + SPAN.findall(FENCE.sub("", text))


def commands(text: str) -> set[tuple[str, str]]:
    """("llm", "train"), ("make", "run"), ... as the text's code writes them; `VAR=value` arguments skipped."""
    return {(m[1], m[2]) for code in code_of(text) for m in COMMAND.finditer(code) if "=" not in m[2]}


def repo_paths(text: str) -> set[str]:
    """Paths in backticks or markdown links that look like files of the repository."""
    candidates = SPAN.findall(text) + LINK.findall(text) + re.findall(r"\b(?:docs|presets|benchmarks)/[\w./-]*\w", text)
    return {c.split("#")[0] for c in candidates if REPO_PATH.match(c.split("#")[0])}


def llm_subcommands() -> set[str]:
    cmd = [sys.executable, "-m", "llm.cli", "--help"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^ {4}([a-z][\w-]*)(?:\s|$)", out, re.M))


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


def problems(text: str, subcommands: set[str], targets: set[str], root: Path = REPO) -> list[str]:
    """What in `text` does not exist: an unknown command, a missing Makefile target or file."""
    out = []
    for tool, name in sorted(commands(text)):
        if tool == "llm" and name not in subcommands:
            out.append(f"`llm {name}`: not a subcommand in `llm --help`")
        if tool == "make" and name not in targets:
            out.append(f"`make {name}`: no such target in the Makefile")
    out += [f"`{p}`: no such file or directory" for p in sorted(repo_paths(text)) if not (root / p).exists()]
    return out


def test_every_command_and_path_in_the_readme_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert commands(text), "no commands found: the parser is broken"
    assert problems(text, llm_subcommands(), make_targets()) == []


def test_the_checker_finds_a_bogus_command_target_and_path():
    text = (REPO / "README.md").read_text(encoding="utf-8") + (
        "\n```\nllm frobnicate --params params.yaml\nmake deploy-everything FOO=1\n```\n"
        "Read `docs/no-such-page.md` and `presets/nope.yaml`.\n"
    )
    found = problems(text, llm_subcommands(), make_targets())
    assert "`llm frobnicate`: not a subcommand in `llm --help`" in found
    assert "`make deploy-everything`: no such target in the Makefile" in found
    assert "`docs/no-such-page.md`: no such file or directory" in found
    assert "`presets/nope.yaml`: no such file or directory" in found


def test_the_checker_reads_inline_commands_and_skips_comments_and_variables():
    text = ("Run `llm train` or `make run ENGINE=dagster`.\n```\ndvc repro   # not llm bogus, not make bogus\n```\n"
            "```text\nROMEO: I will not\nmake a line.\n```\n")
    assert commands(text) == {("llm", "train"), ("make", "run")}
    assert problems(text, {"train"}, {"run"}) == []
    assert problems(text, set(), {"run"}) == ["`llm train`: not a subcommand in `llm --help`"]


def test_make_run_refuses_an_engine_it_does_not_have():
    """A typo (ENGINE=dagsterr) must not quietly run the other engine."""
    proc = subprocess.run(["make", "-n", "run", "ENGINE=dagsterr"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "make run: ENGINE=dagsterr is not an engine; use ENGINE=dvc (the default) or ENGINE=dagster" in proc.stderr
    for engine, command in (("dvc", "dvc repro"), ("dagster", "dagster asset materialize")):
        dry = subprocess.run(["make", "-n", "run", f"ENGINE={engine}"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert dry.returncode == 0 and command in dry.stdout, dry.stderr
