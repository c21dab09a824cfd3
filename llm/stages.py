"""The pipeline's stages by name: the contract the CLI, dvc.yaml and the Dagster assets share.

Every stage is a function `fn(params, layout, **options) -> dict`: it reads its inputs from the
layout, writes its outputs atomically and returns its report. This module only dispatches. The
functions are named by module so that `llm ingest` does not import torch and MLflow, which only
the model stages need (a second of start-up each).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from llm.config import Params
from llm.layout import Layout

Stage = Callable[..., dict]

STAGES: dict[str, str] = {
    "ingest": "llm.corpus.ingest:ingest",
    "clean": "llm.corpus.clean:clean",
    "tokenizer": "llm.tokenizer:train_tokenizer",
    "shards": "llm.shards:write_shards",
    "train": "llm.train:train",
    "evaluate": "llm.evaluate:evaluate",
    "report": "llm.report:report",
    "export": "llm.export:export",
}


def stage_function(name: str) -> Stage:
    module, attr = STAGES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def run(name: str, params: Params, layout: Layout, **options) -> dict:
    """Run one stage; options are the stage's own (train: resume)."""
    return stage_function(name)(params, layout, **options)
