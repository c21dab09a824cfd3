"""Every Dagster asset check fails on bad input (and passes on the built project): the checks
are plain functions of the project's layout, run here on damaged copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.data import clean_table_valid, raw_table_valid, shards_consistent, tokenizer_round_trip
from assets.model import beats_bz2, training_sane
from llm.io import read_json, write_json
from llm.layout import Layout
from llm.tokenizer import train_tokenizer
from tests.conftest import deep_merge, load, write_params

CHECKS = {"raw_schema": raw_table_valid, "clean_schema": clean_table_valid, "round_trip": tokenizer_round_trip,
          "consistent": shards_consistent, "loss_sane": training_sane, "beats_bz2": beats_bz2}


def copy_of(built, tmp_path: Path) -> Layout:
    root, params = built
    shutil.copytree(root, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return Layout(tmp_path)


@pytest.mark.parametrize("name", [n for n in CHECKS if n != "beats_bz2"])  # 6 steps of a tiny model: not yet
def test_every_check_passes_on_the_built_project(built, name: str):
    passed, metadata = CHECKS[name](Layout(built[0]))
    assert passed, metadata


def rewrite_first_part(table: Path, change) -> None:
    part = sorted(table.glob("part-*.parquet"))[0]
    data = pq.read_table(part)
    pq.write_table(change(data), part)


def test_raw_schema_fails_on_a_byte_count_that_does_not_match_the_text(built, tmp_path: Path):
    layout = copy_of(built, tmp_path)
    rewrite_first_part(layout.raw, lambda t: t.set_column(t.schema.get_field_index("n_bytes"), "n_bytes",
                                                          pa.array([n + 1 for n in t.column("n_bytes").to_pylist()],
                                                                   pa.int64())))
    passed, metadata = raw_table_valid(layout)
    assert not passed and "n_bytes" in str(metadata["failures"].value)


def test_clean_schema_fails_on_a_duplicate_doc_id(built, tmp_path: Path):
    layout = copy_of(built, tmp_path)
    rewrite_first_part(layout.clean, lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    passed, metadata = clean_table_valid(layout)
    assert not passed and metadata["duplicate doc_ids"] == 1


def test_round_trip_fails_for_a_tokenizer_that_loses_characters(built, tmp_path: Path):
    layout = copy_of(built, tmp_path)
    lossy = deep_merge(load(layout.root).model_dump(mode="json"),
                        {"tokenizer": {"byte_fallback": False, "character_coverage": 0.98}})
    write_params(layout.root, lossy)
    train_tokenizer(load(layout.root), layout)  # rare characters become <unk>
    passed, metadata = tokenizer_round_trip(layout)
    assert not passed and metadata["failures"] > 0


def test_shards_check_fails_when_the_manifest_disagrees_with_the_shards(built, tmp_path: Path):
    layout = copy_of(built, tmp_path)
    manifest = read_json(layout.shards / "manifest.json")
    manifest["splits"]["val"]["tokens"] += 1
    write_json(layout.shards / "manifest.json", manifest)
    passed, metadata = shards_consistent(layout)
    assert not passed and "val: shards hold" in metadata["problems"]


@pytest.mark.parametrize("damage", ["nan", "no_improvement"])
def test_training_check_fails_on_a_nan_or_a_loss_that_did_not_improve(built, tmp_path: Path, damage: str):
    layout = copy_of(built, tmp_path)
    if damage == "nan":
        lines = layout.loss_csv.read_text().splitlines()
        cells = lines[-1].split(",")
        cells[3] = "nan"  # val_loss
        layout.loss_csv.write_text("\n".join([*lines[:-1], ",".join(cells)]) + "\n")
    else:
        summary = read_json(layout.metrics("train"))
        summary["final_val_loss"] = summary["initial_val_loss"] + 0.1
        write_json(layout.metrics("train"), summary)
    passed, metadata = training_sane(layout)
    assert not passed
    assert metadata["all losses finite"] is (damage != "nan")


@pytest.mark.parametrize("margin, expected", [(0.01, False), (-0.01, True)])
def test_beats_bz2_fails_for_a_model_worse_than_bz2(built, tmp_path: Path, margin: float, expected: bool):
    layout = copy_of(built, tmp_path)
    result = read_json(layout.metrics("eval"))
    result["val_bpb"] = result["baseline_bpb"]["bz2"] + margin
    write_json(layout.metrics("eval"), result)
    passed, _ = beats_bz2(layout)
    assert passed is expected
