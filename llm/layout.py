"""Where every artifact lives, relative to the project root: the one place paths are spelled.

A leaf module: it imports nothing from the project, so every stage, the CLI and the Dagster
assets can share it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """The project's artifacts. A run_dir (a scaling-ladder rung: ladder/NAME) takes a run's
    checkpoints, model, metrics and reports; the data is shared."""

    root: Path
    run_dir: Path | None = None

    @classmethod
    def of(cls, root: str | Path, run_dir: str | Path | None = None) -> Layout:
        return cls(Path(root).resolve(), Path(run_dir) if run_dir is not None else None)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def clean(self) -> Path:
        return self.data / "clean"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    @property
    def models(self) -> Path:
        return self.run_dir or self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.models / "checkpoints"

    @property
    def final(self) -> Path:
        return self.models / "final"

    @property
    def hf(self) -> Path:
        """The model in Hugging Face's format (llm export)."""
        return self.models / "hf"

    @property
    def gguf(self) -> Path:
        """The model in llama.cpp's format (llm export)."""
        return self.models / "gguf"

    @property
    def reports(self) -> Path:
        """A folder of its own in a run directory too: `llm report` replaces it whole."""
        return (self.run_dir or self.root) / "reports"

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir or self.root / "metrics"

    def metrics(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    @property
    def loss_csv(self) -> Path:
        return self.metrics_dir / "loss.csv"

    def outputs(self) -> list[Path]:
        """Every artifact a stage writes atomically; their parents hold the temporary siblings
        a killed stage may leave behind."""
        return [self.raw, self.clean, self.tokenizer, self.shards, self.checkpoints, self.final, self.hf, self.reports,
                self.metrics_dir]
