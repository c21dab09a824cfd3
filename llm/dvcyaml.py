"""dvc.yaml's generated parts, rewritten in place: each `llm STAGE` stage's `desc` and code deps.

The `desc:` line comes from llm/stages.py; the list after the `# code:` comment in the stage's deps
is the stage's import closure (llm/codedeps.py). Everything else in dvc.yaml (comments, data deps,
params, outs) is written by hand and kept byte for byte: the rewrite works on lines, and parses
the result to make sure it put each part where YAML reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from llm.codedeps import missing_exceptions, stage_code_files
from llm.errors import UserError
from llm.stages import STAGES

MARKER = "# code:"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[^\s#][^:]*):(?:\s+(?P<rest>.*))?$")
_CODE_ITEM = re.compile(r"^ *- llm/\S*\s*(#.*)?$")


def marker(stage: str) -> str:
    return f"{MARKER} what `llm {stage}` imports (written by `llm stages --write`)"


def scalar(text: str) -> str:
    """text as a one-line YAML scalar: plain when YAML reads it back unchanged, else quoted."""
    try:
        plain = yaml.safe_load(f"k: {text}") == {"k": text}
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _sections(lines: list[str]) -> dict[str, tuple[int, int]]:
    """{stage: (first line after its name, end)} for the stages under the top-level `stages:`."""
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "stages:"), None)
    if start is None:
        raise UserError("dvc.yaml has no top-level `stages:`")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and _indent(lines[i]) == 0
                and not lines[i].startswith("#")), len(lines))
    body = [i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    if not body:
        return {}
    width = _indent(lines[body[0]])
    heads = [i for i in body if _indent(lines[i]) == width]
    names = [match["key"] if (match := _KEY.match(lines[h])) else "" for h in heads]
    return {name: (h + 1, nxt) for name, h, nxt in zip(names, heads, [*heads[1:], end]) if name}


def _rewrite_stage(lines: list[str], name: str, first: int, end: int, root: Path) -> list[str]:
    """The lines of one stage's body, its desc and code list generated."""
    body = lines[first:end]
    keys = [i for i, line in enumerate(body) if _KEY.match(line) and not line.lstrip().startswith("-")]
    if not keys:
        raise UserError(f"dvc.yaml: stage {name} is empty")
    width = _indent(body[keys[0]])
    out: list[str] = []
    at_marker = [i for i, line in enumerate(body) if line.strip().startswith(MARKER)]
    if len(at_marker) != 1:
        raise UserError(f"dvc.yaml: stage {name} needs one `{MARKER}` line in its deps, where its code files go "
                        f"(it has {len(at_marker)})")
    desc = " " * width + f"desc: {scalar(STAGES[name].description)}\n"
    i = 0
    if not any(_KEY.match(body[k])["key"] == "desc" and _indent(body[k]) == width for k in keys):
        out.append(desc)
    while i < len(body):
        line = body[i]
        match = _KEY.match(line)
        if match and match["key"] == "desc" and _indent(line) == width:
            out.append(desc)
            i += 1
            while i < len(body) and body[i].strip() and _indent(body[i]) > width:  # a desc folded over lines
                i += 1
        elif i == at_marker[0]:
            pad = " " * _indent(line)
            out += [pad + marker(name) + "\n"] + [f"{pad}- {f}\n" for f in stage_code_files(name, root)]
            i += 1
            while i < len(body) and _CODE_ITEM.match(body[i]) and _indent(body[i]) == len(pad):
                i += 1
        else:
            out.append(line)
            i += 1
    return out


def generate(text: str, root: Path) -> tuple[str, list[str]]:
    """dvc.yaml's text with its generated parts written from the code under root, and the stages
    whose parts changed."""
    if not (Path(root) / "llm" / "__init__.py").is_file():
        raise UserError(f"{root}: no llm/ package beside dvc.yaml")
    problems = missing_exceptions(root)
    if problems:
        raise UserError(problems[0])
    declared = (yaml.safe_load(text) or {}).get("stages", {})
    for name in STAGES:
        if name not in declared:
            raise UserError(f"dvc.yaml has no stage {name} (cmd: llm {name}, a `{MARKER}` line in its deps)")
        if str(declared[name].get("cmd", "")).split() != ["llm", name]:
            raise UserError(f"dvc.yaml: stage {name} runs {declared[name].get('cmd')!r}, not `llm {name}`")
    if not text.endswith("\n"):
        text += "\n"
    lines = text.splitlines(keepends=True)
    out, changed, done = [], [], 0
    for name, (first, end) in _sections(lines).items():
        if name not in STAGES:
            continue  # a stage of its own: written by hand
        new = _rewrite_stage(lines, name, first, end, root)
        if new != lines[first:end]:
            changed.append(name)
        out += lines[done:first] + new
        done = end
    result = "".join(out + lines[done:])
    _verify(result, root)
    return result, changed


def _verify(text: str, root: Path) -> None:
    """The generated parts are where YAML reads them: each stage's desc, and its code among its deps."""
    stages = yaml.safe_load(text)["stages"]
    for name, stage in STAGES.items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stages[name].get("deps") or []]
        if stages[name].get("desc") != stage.description:
            raise UserError(f"dvc.yaml: stage {name}: could not write its desc")
        if not set(stage_code_files(name, root)) <= set(deps):
            raise UserError(f"dvc.yaml: stage {name}: its `{MARKER}` line is not inside its deps list")


def stale_stages(path: Path) -> list[str]:
    """The stages whose generated parts in the dvc.yaml at path differ from what the code beside it says."""
    return generate(read(path), path.parent)[1]


def write(path: Path) -> list[str]:
    """Rewrite the generated parts of the dvc.yaml at path; returns the stages that changed."""
    text, changed = generate(read(path), path.parent)
    if changed:
        path.write_text(text, encoding="utf-8")
    return changed


def read(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: no such file (run in the project's root, or pass --dvc-yaml)")
    return path.read_text(encoding="utf-8")
