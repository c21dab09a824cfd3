"""dvc.yaml's code deps and desc are generated (`llm stages --write`), so they cannot go stale.

A stage's code deps are its import closure (llm/codedeps.py): every llm/ file `llm STAGE` runs.
An edit to any of them must make `dvc status` name the stage (tests/test_pipeline_dvc.py), and it
changes the stage's `code_version`, which train's checkpoint fingerprint holds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm import dvcyaml
from llm.codedeps import OTHER_COMMANDS, code_version, import_closure, imports, missing_exceptions, stage_code_files
from llm.stages import STAGES, Stage
from tests.conftest import REPO


def stage_closure(name: str) -> set[str]:
    """The files `llm NAME` runs (tests/test_pipeline_dvc.py edits one and expects `dvc status` to name NAME)."""
    return set(stage_code_files(name))


def llm_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed `llm` (this repository's code, whatever llm/ lies in cwd)."""
    return subprocess.run([str(Path(sys.executable).parent / "llm"), *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of dvc.yaml beside a copy of the llm/ package it describes, generated parts current."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / "llm", tmp_path / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    dvcyaml.write(tmp_path / "dvc.yaml")  # the test below says whether the committed one is
    return tmp_path


def test_dvc_yaml_is_what_llm_stages_writes():
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    generated, stale = dvcyaml.generate(text, REPO)
    assert not stale, f"dvc.yaml's code deps or desc of {stale} are stale: run `llm stages --write`"
    assert generated == text


def test_every_stage_runs_an_llm_stage_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert set(STAGES) <= set(stages)
    for name, stage in stages.items():
        assert stage["cmd"].split() == ["llm", name] and name in STAGES, (
            f"{name}: cmd {stage['cmd']!r} is not `llm {name}`: its code deps cannot be found")


def test_a_stage_lists_exactly_the_files_it_imports():
    """Complete (an edit to the shards module reruns train) and precise (one to report does not rerun ingest)."""
    assert "llm/shards.py" in stage_code_files("train") and "llm/model.py" in stage_code_files("train")
    assert not {"llm/report.py", "llm/model.py", "llm/sample.py", "llm/ladder.py"} & set(stage_code_files("ingest"))
    for name in STAGES:
        files = stage_code_files(name)
        assert files == sorted(files) and {"llm/__init__.py", "llm/cli.py", "llm/stages.py"} <= set(files)
        assert all((REPO / f).is_file() and not Path(f).is_absolute() and "\\" not in f for f in files)


def test_llm_stages_check_fails_naming_the_stage_whose_list_was_edited_by_hand(project: Path):
    assert llm_cli(["stages", "--check"], project).returncode == 0
    original = (project / "dvc.yaml").read_text(encoding="utf-8")
    train = original.index("\n  train:")
    edited = original[:train] + original[train:].replace("      - llm/shards.py\n", "", 1)
    edited = edited.replace("      - llm/report.py\n", "      - llm/report.py\n      - llm/ladder.py\n", 1)  # report
    edited = edited.replace("\nplots:", "\n# a comment of someone's\nplots:")
    (project / "dvc.yaml").write_text(edited, encoding="utf-8")
    check = llm_cli(["stages", "--check"], project)
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.count("\n") == 1 and "train, report: run `llm stages --write`" in check.stderr, check.stderr
    write = llm_cli(["stages", "--write"], project)
    assert write.returncode == 0 and "rewrote train, report" in write.stdout
    assert (project / "dvc.yaml").read_text(encoding="utf-8") == original.replace(
        "\nplots:", "\n# a comment of someone's\nplots:")
    assert llm_cli(["stages", "--check"], project).returncode == 0


def test_llm_stages_write_follows_a_new_import_and_a_new_description(project: Path, monkeypatch):
    (project / "llm" / "extra.py").write_text('"""A module shards starts to use."""\n')
    shards = project / "llm" / "shards.py"
    uses_extra = "\n\ndef _uses_extra():\n    from llm import extra  # noqa\n"
    shards.write_text(shards.read_text(encoding="utf-8") + uses_extra)
    monkeypatch.setitem(STAGES, "clean", Stage(STAGES["clean"].target, "Clean: the corpus, # not a comment"))
    assert dvcyaml.stale_stages(project / "dvc.yaml") == ["clean", "shards", "train", "evaluate", "report"]
    assert dvcyaml.write(project / "dvc.yaml") == ["clean", "shards", "train", "evaluate", "report"]
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert stages["clean"]["desc"] == "Clean: the corpus, # not a comment"
    assert "llm/extra.py" in stages["train"]["deps"] and "llm/extra.py" not in stages["tokenizer"]["deps"]
    assert stages["shards"]["deps"][:2] == ["data/clean", "data/tokenizer"]  # the data deps as they were
    assert dvcyaml.stale_stages(project / "dvc.yaml") == []


def test_a_stage_without_its_code_marker_is_a_user_error(project: Path):
    text = (project / "dvc.yaml").read_text(encoding="utf-8")
    (project / "dvc.yaml").write_text(text.replace("# code: what `llm clean` imports", "# what `llm clean` imports"))
    result = llm_cli(["stages", "--check"], project)
    assert result.returncode == 2 and result.stderr.startswith("error: dvc.yaml: stage clean needs one `# code:` line")
    missing = llm_cli(["stages", "--check", "--dvc-yaml", "nowhere/dvc.yaml"], project)
    assert missing.returncode == 2 and missing.stderr.startswith("error: nowhere/dvc.yaml: no such file")


def test_llm_stages_lists_each_description_without_importing_torch():
    code = "import sys\nfrom llm.cli import main\nmain(['stages'])\nassert 'torch' not in sys.modules, 'torch'\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(STAGES)
    assert all(line.endswith(STAGES[line.split()[0]].description) for line in lines)


def test_the_imports_left_out_still_exist(project: Path):
    assert missing_exceptions(REPO) == []
    cli = project / "llm" / "cli.py"
    cli.write_text(cli.read_text(encoding="utf-8").replace("from llm.ladder import", "from llm.sample import"))
    assert [m.split(":")[0] for m in missing_exceptions(project)] == ["llm/cli.py"]
    result = llm_cli(["stages", "--check"], project)
    assert result.returncode == 2 and "run_ladder() no longer imports llm.ladder" in result.stderr
    for (file, function, module) in OTHER_COMMANDS:  # each still exists in the real code
        assert (function, module) in imports(REPO, file.removesuffix(".py").replace("/", "."))


def test_train_code_version_follows_every_file_train_runs_and_nothing_else(project: Path):
    assert code_version("train", project) == code_version("train")  # names and bytes, not where they lie
    assert len(code_version("train")) == 16 and code_version("train") != code_version("evaluate")
    (project / "llm" / "report.py").write_text("# report is not code train runs\n")
    assert code_version("train", project) == code_version("train")
    shards = project / "llm" / "shards.py"
    shards.write_text(shards.read_text(encoding="utf-8") + "\n# an edit\n")
    edited = code_version("train", project)
    assert edited != code_version("train")
    shards.write_text((REPO / "llm" / "shards.py").read_text(encoding="utf-8"))
    assert code_version("train", project) == code_version("train")


def test_the_closure_follows_every_kind_of_import(tmp_path: Path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub.c import g\n    return g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from . import d\nfrom ..e import h\n\ndef g():\n    import pkg.f\n",
        "pkg/sub/d.py": "",
        "pkg/e.py": "h = 1\n",
        "pkg/f.py": "class K:\n    def m(self):\n        import pkg.g\n",
        "pkg/g.py": "",
        "pkg/unused.py": "",
        "pkg/skipped.py": "",
        "pkg/h.py": "def run():\n    import pkg.skipped\n",
        "pkg/typed.py": ("import typing\nif typing.TYPE_CHECKING:\n    from pkg import unused\n"
                       "else:\n    import pkg.g\n"),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(tmp_path, ["pkg.a"], package="pkg") == {
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "pkg/sub/d.py",
        "pkg/e.py", "pkg/f.py", "pkg/g.py"}
    assert import_closure(tmp_path, ["pkg.h"], package="pkg", skip={("pkg/h.py", "run", "pkg.skipped")}) == {
        "pkg/__init__.py", "pkg/h.py"}
    assert import_closure(tmp_path, ["pkg.typed"], package="pkg") == {"pkg/__init__.py", "pkg/typed.py", "pkg/g.py"}


def test_dvc_lock_is_read_in_one_place_for_tracking_and_dagster(tmp_path: Path):
    from assets.dvc_project import locked_hashes
    from llm.dvclock import locked_outs
    from llm.tracking import dvc_hashes

    assert locked_outs(tmp_path) == {} and dvc_hashes(tmp_path) == {} and locked_hashes(tmp_path, "shards") == {}
    lock = {"schema": "2.0", "stages": {
        "tokenizer": {"cmd": "llm tokenizer", "outs": [{"path": "data/tokenizer", "md5": "a.dir"}]},
        "shards": {"cmd": "llm shards", "outs": [{"path": "data/shards", "md5": "b.dir"},
                                                 {"path": "metrics/shards.json", "md5": "c"}]},
        "report": {"cmd": "llm report"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert locked_outs(tmp_path) == {"tokenizer": {"data/tokenizer": "a.dir"},
                                     "shards": {"data/shards": "b.dir", "metrics/shards.json": "c"}, "report": {}}
    assert dvc_hashes(tmp_path) == {"dvc.tokenizer.md5": "a.dir", "dvc.shards.md5": "b.dir"}
    assert locked_hashes(tmp_path, "shards") == {"data/shards": "b.dir", "metrics/shards.json": "c"}
    assert locked_hashes(tmp_path, "train") == {}
