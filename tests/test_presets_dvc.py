"""The GPU presets through `dvc repro`, as a user copies them: `cp presets/NAME.yaml params.yaml`.
Here on a slice of the default corpus and a CPU, with DVC's own -S overrides cutting the run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from llm.io import read_json
from llm.layout import Layout
from tests.conftest import REPO, dvc_bin, make_dvc_project, project_env, run, write_params
from tests.test_pipeline_dvc import ALL_STAGES, ran_stages

pytestmark = pytest.mark.slow
# More text than the shared project (tests/conftest.py): the GPU presets' blocks and vocabulary need it.
SLICE = {"n_plays": 8, "max_chars": 20_000}


def preset_project(tmp_path: Path, name: str) -> Path:
    """A git + DVC project whose params.yaml is the preset, reading the corpus slice."""
    root = make_dvc_project(tmp_path, **SLICE)
    data = yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())
    data["ingest"] = {"sources": ["corpus"]}
    write_params(root, data)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", f"preset {name}"], root)
    return root


def test_gpt2_small_on_a_small_corpus_stops_before_training_with_one_line(tmp_path: Path):
    root = preset_project(tmp_path, "gpt2-small")
    proc = subprocess.run([dvc_bin(), "repro"], cwd=root, env=project_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "preset 'gpt2-small' asks for vocab_size 50304" in errors[0] and "use tokenizer.vocab_size:" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (root / "models").exists()


def test_gpu_small_runs_through_dvc_on_a_cpu_with_its_steps_cut(tmp_path: Path):
    root = preset_project(tmp_path, "gpu-small")
    # Its shape (11.4 M parameters, 512 tokens of context) runs; its step is cut to 4 x 512 tokens.
    cut = ["train.max_steps=2", "train.warmup_steps=1", "train.compile=false", "train.eval_tokens=2048",
           "train.batch_size=4", "train.tokens_per_step=2048", "evaluate.max_tokens=4096", "report.max_new_tokens=16",
           "tokenizer.min_bytes_per_piece=20",  # the slice is far smaller than the default corpus
           "tracking.system_metrics=false"]
    out = run([dvc_bin(), "exp", "run", *[arg for value in cut for arg in ("-S", f"++{value}")]], root)
    assert ran_stages(out) == ALL_STAGES
    summary = read_json(Layout(root).metrics("train"))
    assert summary["steps"] == 2 and summary["tokens_seen"] == 2 * 2048
    assert 11e6 < summary["params"] < 12e6
    assert (Layout(root).hf / "config.json").is_file() and read_json(Layout(root).metrics("eval"))["val_bpb"] > 0
