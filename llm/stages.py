"""The pipeline's stages: where each reads and writes, and the function that runs it.

This is the stage contract the CLI, dvc.yaml and the Dagster assets share: a stage is a
function of (params, project root) that writes its outputs atomically and returns its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llm.config import Params


@dataclass(frozen=True)
class Layout:
    """Where every artifact lives, relative to the project root. A run_dir (a scaling-ladder
    rung: ladder/NAME) takes a run's checkpoints, model, metrics and reports; the data is shared."""

    root: Path
    run_dir: Path | None = None

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def clean(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def tokenizer(self) -> Path:
        return self.root / "data" / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" if self.run_dir else self.root / "models" / "checkpoints"

    @property
    def final(self) -> Path:
        return self.run_dir / "final" if self.run_dir else self.root / "models" / "final"

    @property
    def reports(self) -> Path:
        return self.run_dir or self.root / "reports"

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir or self.root / "metrics"

    def metrics(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"


def run_ingest(params: Params, root: Path) -> dict:
    from llm.corpus.ingest import ingest

    lay = Layout(root)
    return ingest(params.ingest, root, lay.raw, lay.metrics("ingest"))


def run_clean(params: Params, root: Path) -> dict:
    from llm.corpus.clean import clean

    lay = Layout(root)
    return clean(params.clean, params.seed, lay.raw, lay.clean, lay.metrics("clean"))


def run_tokenizer(params: Params, root: Path) -> dict:
    from llm.tokenizer import train_tokenizer

    lay = Layout(root)
    return train_tokenizer(params.tokenizer, params.split, params.seed, lay.clean, lay.tokenizer, lay.metrics("tokenizer"))


def run_shards(params: Params, root: Path) -> dict:
    from llm.shards import write_shards

    lay = Layout(root)
    return write_shards(params.shards, params.split, lay.clean, lay.tokenizer, lay.shards, lay.metrics("shards"))


def run_train(params: Params, root: Path) -> dict:
    from llm.train import train

    return train(params, root)


def run_evaluate(params: Params, root: Path) -> dict:
    from llm.evaluate import evaluate

    return evaluate(params, root)


def run_report(params: Params, root: Path) -> dict:
    from llm.report import report

    return report(params, root)


STAGES: dict[str, Callable[[Params, Path], dict]] = {
    "ingest": run_ingest,
    "clean": run_clean,
    "tokenizer": run_tokenizer,
    "shards": run_shards,
    "train": run_train,
    "evaluate": run_evaluate,
    "report": run_report,
}
