"""The Ray engine of the data stages (compute.data_engine: ray) on a local 2-CPU cluster.

Its units (files for ingest, Parquet row groups for clean and shards) run as Ray tasks; the
outputs must be the bytes the local engine writes, a worker killed mid-stage must be retried,
and one killed past compute.max_retries must fail the stage in one line, leaving the previous
output or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import llm.parallel
from llm.config import Params, parse_params
from llm.errors import UserError
from llm.layout import Layout
from llm.stages import run
from tests.conftest import Template, copy_project, dvc_bin, project_env, small_params, write_corpus_slice
from tests.conftest import run as run_cmd

DATA_STAGES = ["ingest", "clean", "tokenizer", "shards"]


def write_mixed_corpus(corpus: Path) -> None:
    """Plays, plus every kind of file ingest counts apart: JSON records (one bad, one without the
    text field), an archive, an empty file, a binary file."""
    plays = write_corpus_slice(corpus, n_plays=6, max_chars=20_000)
    paragraphs = [p for p in plays[0].read_text().split("\n\n") if len(p) > 40]
    lines = [json.dumps({"text": "\n\n".join(paragraphs[i : i + 12])}) for i in range(0, len(paragraphs), 12)]
    lines[1:1] = ["{not json", json.dumps({"title": "no text field"})]
    (corpus / "records.jsonl").write_text("\n".join(lines) + "\n")
    with zipfile.ZipFile(corpus / "more.zip", "w") as z:
        z.writestr("a/one.txt", plays[1].read_text()[:8000])
        z.writestr("b/two.md", plays[2].read_text()[8000:16000])
    (corpus / "empty.txt").write_text("   \n")
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 8)


def params_for(engine: str, max_retries: int = 1, **override) -> Params:
    override = {"ingest": {"sources": ["corpus"], "batch_docs": 3, "max_bad_fraction": 0.5}, **override}
    return parse_params(small_params(["corpus"], compute={"data_engine": engine, "max_retries": max_retries},
                                     **override))


def build(root: Path, params: Params, stages: list[str] = DATA_STAGES) -> None:
    for name in stages:
        run(name, params, Layout(root))


def hashes(root: Path, *paths: str) -> dict[str, str]:
    """sha256 of the given files of a project and of every file under the given directories."""
    files = [f for p in paths for f in ([root / p] if (root / p).is_file() else sorted((root / p).rglob("*")))]
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


OUTPUTS = ("data/raw", "data/clean", "data/tokenizer", "data/shards", "metrics")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The data stages on the local engine: the bytes the Ray engine must write."""
    root = tmp_path_factory.mktemp("local")
    write_mixed_corpus(root / "corpus")
    build(root, params_for("local"))
    return root


def copy_outputs(reference: Path, dest: Path, *dirs: str) -> Path:
    write_mixed_corpus(dest / "corpus")
    for d in dirs:
        shutil.copytree(reference / d, dest / d)
    return dest


def test_the_ray_engine_writes_the_same_bytes(reference: Path, tmp_path: Path, ray_cluster, monkeypatch):
    units = []
    real = llm.parallel._ray_result
    monkeypatch.setattr(llm.parallel, "_ray_result", lambda item, *rest: units.append(item) or real(item, *rest))
    write_mixed_corpus(tmp_path / "corpus")
    build(tmp_path, params_for("ray"))
    ingest_units = [u for u in units if not isinstance(u[1], int)]  # (source, file); the others (part, row group)
    assert len(ingest_units) == 10  # 6 plays, records.jsonl, more.zip, empty.txt, blob.bin
    assert len(units) > len(ingest_units) + 4  # and the row groups of clean and shards
    counts = json.loads((reference / "metrics/ingest.json").read_text())
    assert counts["bad_records"] == 2 and counts["binary_files_skipped"] == 1 and counts["empty_dropped"] == 1
    assert hashes(tmp_path, *OUTPUTS) == hashes(reference, *OUTPUTS)


def _init_probe(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")


def _probe(i: int) -> tuple[int, int]:
    return i, os.getpid()


def test_results_come_in_order_and_the_init_runs_once_per_worker(tmp_path: Path, ray_cluster):
    log = tmp_path / "inits"
    compute = params_for("ray").compute
    results = list(llm.parallel.ordered_map(_probe, range(40), 1, _init_probe, (str(log),), window_per_worker=3,
                                            compute=compute))
    assert [i for i, _ in results] == list(range(40))
    inits = log.read_text().split()
    assert sorted(inits) == sorted({str(pid) for _, pid in results})  # one init per process that ran units


def test_the_local_engine_does_not_import_ray(project: Path):
    code = (
        "import sys\nfrom pathlib import Path\nfrom llm.layout import Layout\nfrom llm.stages import run\n"
        f"from tests.conftest import load\nroot = Path({str(project)!r})\n"
        "run('ingest', load(root), Layout(root))\nprint('ray' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120, env=project_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_an_error_in_a_unit_is_the_same_one_line_on_ray(tmp_path: Path, ray_cluster):
    messages = {}
    for engine in ("local", "ray"):
        root = tmp_path / engine
        write_mixed_corpus(root / "corpus")
        with pytest.raises(UserError) as err:
            build(root, params_for(engine, ingest={"sources": ["corpus"], "on_bad_record": "fail"}), ["ingest"])
        messages[engine] = str(err.value)
        assert not (root / "data/raw").exists()
    assert messages["ray"] == messages["local"]
    assert "records.jsonl:2: not valid JSON" in messages["ray"] and "\n" not in messages["ray"]


def test_a_killed_worker_is_retried_and_the_output_is_the_same(reference: Path, tmp_path: Path, ray_cluster,
                                                               monkeypatch):
    root = copy_outputs(reference, tmp_path, "data/raw")
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("LLM_FAULT_POINT", "ray.task")  # the first unit to start SIGKILLs its worker...
    monkeypatch.setenv("LLM_FAULT_MARKER", str(marker))  # ...once: Ray's retry finds the marker
    build(root, params_for("ray"), ["clean"])
    assert marker.exists()
    assert hashes(root, "data/clean", "metrics") == hashes(reference, "data/clean", "metrics/clean.json")


def test_a_worker_killed_past_max_retries_fails_in_one_line_and_writes_nothing(
    reference: Path, tmp_path: Path, ray_cluster, monkeypatch
):
    root = copy_outputs(reference, tmp_path, "data/raw", "data/tokenizer", "data/shards")
    shards_before = hashes(root, "data/shards")
    monkeypatch.setenv("LLM_FAULT_POINT", "ray.task")  # every attempt of every unit is killed

    def fails(stage: str, max_retries: int) -> None:
        with pytest.raises(UserError) as err:
            build(root, params_for("ray", max_retries), [stage])
        message = str(err.value)
        assert message.startswith(f"{stage}: part-00000.parquet row group 0: the Ray worker died"), message
        assert f"compute.max_retries ({max_retries})" in message and "\n" not in message
        assert not [p.name for p in (root / "data").iterdir() if p.name.startswith(".")], "a temporary output is left"

    fails("clean", 1)  # no previous output: none after
    assert not (root / "data/clean").exists()
    shutil.copytree(reference / "data/clean", root / "data/clean")
    fails("shards", 0)  # a previous output: unchanged after
    assert hashes(root, "data/shards") == shards_before


@pytest.mark.slow
def test_dvc_switch_to_ray_reruns_the_data_stages_and_changes_no_hash(template: Template, tmp_path: Path):
    """DVC's own check: compute is a params dependency of the data stages, so switching the engine
    reruns them, and dvc.lock records the same hashes for every output. Each `llm` stage that DVC
    runs starts its own local Ray cluster (ray_address ""), of 2 CPUs."""
    before = locked_outs(template.root)  # the local engine's
    root = copy_project(template.root, tmp_path / "project", compute={"data_engine": "ray", "num_cpus": 2})
    out = run_cmd([dvc_bin(), "repro", "shards"], root)
    assert set(ran_stages(out)) >= {"ingest", "clean", "shards"}, out[-3000:]
    assert out.count("on ray into") == 1 and "documents from" in out, out[-3000:]  # the log lines of shards, clean
    assert locked_outs(root) == before


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def locked_outs(root: Path) -> dict[str, str]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for name in DATA_STAGES for o in stages[name]["outs"]}
