"""The pipeline's stages by name: the contract the CLI, dvc.yaml and the Dagster assets share.

Every stage is a function `fn(params, layout, **options) -> dict`: it reads its inputs from the
layout, writes its outputs atomically and returns its report. This module only dispatches. The
functions are named by module so that `llm ingest` does not import torch and MLflow, which only
the model stages need (a second of start-up each). A stage's description lives here only: the CLI's
help shows it, `llm stages --write` copies it into dvc.yaml's `desc`, and Dagster reads it there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from llm.config import Params
from llm.layout import Layout

StageFn = Callable[..., dict]


@dataclass(frozen=True)
class Stage:
    target: str  # "module:function"
    description: str
    logs_to_run: bool = False  # adds to the pipeline's MLflow run at its end (llm/stage_log.py)


STAGES: dict[str, Stage] = {
    "ingest": Stage("llm.corpus.ingest:ingest",
                    "Read the sources in params.yaml into data/raw, a Parquet table with one row per document."),
    "clean": Stage("llm.corpus.clean:clean",
                   "Repair unicode, strip markup, apply quality filters, remove exact and near duplicates."),
    "tokenizer": Stage("llm.tokenizer:train_tokenizer",
                       "Train a sentencepiece tokenizer on the train split of the clean corpus."),
    "shards": Stage("llm.shards:write_shards",
                    "Tokenize the clean corpus into memory-mappable Arrow shards per split."),
    "train": Stage("llm.train:train",
                   "Train the GPT on the shards; resumes a checkpoint of the same params, data and code."),
    "evaluate": Stage("llm.evaluate:evaluate",
                      "Val loss and bits per byte of the final model against gzip, bz2, xz and a unigram model.",
                      logs_to_run=True),
    "report": Stage("llm.report:report",
                    "Model card, metrics against baselines, loss curve, samples and attention diagnostics.",
                    logs_to_run=True),
    "export": Stage("llm.export:export",
                    "The final model in Hugging Face's format (models/hf, for transformers) and llama.cpp's "
                    "(models/gguf, for llama.cpp and ollama).", logs_to_run=True),
}


def stage_function(name: str) -> StageFn:
    module, attr = STAGES[name].target.split(":")
    return getattr(importlib.import_module(module), attr)


def run(name: str, params: Params, layout: Layout, **options) -> dict:
    """Run one stage; options are the stage's own (train: resume). A stage that logs to the run
    gets its MLflow process first, so that MLflow's start-up overlaps the stage's own."""
    if not STAGES[name].logs_to_run:
        return stage_function(name)(params, layout, **options)
    from llm.stage_log import worker

    with worker(params, layout):
        return stage_function(name)(params, layout, **options)
