"""Small builders of Dagster metadata values for the asset pages of the UI."""

from __future__ import annotations

import base64
import os

import dagster as dg

from llm.mlflow_view import ui_url

# Where `make ui` serves MLflow; set MLFLOW_UI_URL when it runs elsewhere.
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"


def table(rows: list[dict]) -> dg.MetadataValue:
    """A table whose columns are the keys of the first row (ints, floats and strings)."""
    kinds = {int: "int", float: "float", bool: "bool"}
    columns = [dg.TableColumn(k, kinds.get(type(v), "string")) for k, v in rows[0].items()] if rows else []
    return dg.MetadataValue.table(records=[dg.TableRecord(r) for r in rows], schema=dg.TableSchema(columns=columns))


def fenced(text: str) -> dg.MetadataValue:
    """Text shown verbatim: a code fence longer than any backtick run inside it."""
    from llm.io import code_fence

    fence = code_fence(text)
    return dg.MetadataValue.md(f"{fence}text\n{text}\n{fence}")


def preview(text: str, chars: int = 600) -> dg.MetadataValue:
    cut = text[:chars]
    return fenced(cut + ("\n…" if len(text) > chars else ""))


def image(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG inline in the asset page (a data URI in Markdown: no file server needed)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def mlflow_run_url(experiment_id: str, run_id: str) -> dg.MetadataValue:
    return dg.MetadataValue.url(ui_url(os.environ.get("MLFLOW_UI_URL", MLFLOW_UI_DEFAULT), experiment_id, run_id))
