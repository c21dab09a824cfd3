"""The raw and clean document tables: Arrow schemas, pandera checks, batched Parquet I/O.

Both tables are directories of `part-NNNNN.parquet` files written in row groups of a bounded
number of documents, so no stage ever holds the corpus in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm.errors import DataValidationError, UserError

if TYPE_CHECKING:  # pandas is imported where a frame is validated: the stages' workers only read and write Arrow
    import pandas as pd

RAW_ARROW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("text", pa.string()),
        ("n_bytes", pa.int64()),
        ("n_decode_errors", pa.int64()),
    ]
)
CLEAN_ARROW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("uri", pa.string()),
        ("text", pa.string()),
        ("n_bytes", pa.int64()),
    ]
)
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_LISTED_FAILURES = 20


def content_id(text: str) -> str:
    """The stable id of a document: a hash of its text as read."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# ----------------------------------------------------------------------------- schemas
def _schemas():
    # Imported lazily: pandera takes a second to import and only the writers need it.
    import pandas as pd
    import pandera.pandas as pdx

    def not_blank(texts: pd.Series) -> pd.Series:
        """Something left after stripping whitespace: Arrow's trim strips exactly str.isspace's
        characters (checked over every code point), in C++ rather than a Python strip per row."""
        left = pc.binary_length(pc.utf8_trim_whitespace(pa.array(texts, type=pa.string())))
        return pd.Series(pc.greater(left, 0).to_numpy(zero_copy_only=False), index=texts.index)

    def common() -> dict:
        return {
            "doc_id": pdx.Column(str, pdx.Check.str_matches(r"^[0-9a-f]{32}$"), nullable=False),
            "source": pdx.Column(str, pdx.Check.str_length(min_value=1), nullable=False),
            "uri": pdx.Column(str, pdx.Check.str_length(min_value=1), nullable=False),
            "text": pdx.Column(str, pdx.Check(not_blank, element_wise=False, error="text is not blank"),
                               nullable=False),
            "n_bytes": pdx.Column("int64", pdx.Check.gt(0), nullable=False),
        }

    def utf8_lengths_match(df: pd.DataFrame) -> pd.Series:
        lengths = pc.binary_length(pa.array(df["text"], type=pa.string())).to_numpy(zero_copy_only=False)
        return pd.Series(lengths == df["n_bytes"].to_numpy(), index=df.index)

    n_bytes_matches = pdx.Check(utf8_lengths_match, error="n_bytes == UTF-8 length of text")
    raw = pdx.DataFrameSchema(
        {**common(), "n_decode_errors": pdx.Column("int64", pdx.Check.ge(0), nullable=False)},
        checks=[n_bytes_matches],
        strict=True,
        name="raw",
    )
    clean_cols = common()
    clean_cols["doc_id"] = pdx.Column(
        str, pdx.Check.str_matches(r"^[0-9a-f]{32}$"), nullable=False, unique=True
    )
    clean = pdx.DataFrameSchema(clean_cols, checks=[n_bytes_matches], strict=True, name="clean")
    return {"raw": raw, "clean": clean}


_SCHEMA_CACHE: dict = {}


def schema(name: str):
    """The pandera schema of the `raw` or `clean` table."""
    if not _SCHEMA_CACHE:
        _SCHEMA_CACHE.update(_schemas())
    return _SCHEMA_CACHE[name]


def validate_frame(df: pd.DataFrame, name: str) -> None:
    """Validate a batch; raise DataValidationError listing failing checks and rows."""
    import pandera.errors

    try:
        schema(name).validate(df, lazy=True)
    except pandera.errors.SchemaErrors as e:
        raise DataValidationError(describe_failures(e.failure_cases, df, name)) from None


def describe_failures(cases: pd.DataFrame, df: pd.DataFrame, name: str) -> str:
    """One line per failing (check, row): a table-wide check is listed once, not per column."""
    import pandas as pd

    seen: set[tuple] = set()
    lines: list[str] = []
    for _, case in cases.iterrows():
        table_wide = case.get("schema_context") == "DataFrameSchema"
        column = None if table_wide else case.get("column")
        idx = case.get("index")
        key = (str(case.get("check")), column, None if idx is None or pd.isna(idx) else int(idx))
        if key in seen:
            continue
        seen.add(key)
        where = ""
        if key[2] is not None and key[2] in df.index:
            row = df.loc[key[2]]
            where = f" at row {key[2]} (uri={row.get('uri', '?')!s}, doc_id={row.get('doc_id', '?')!s})"
        value = "" if table_wide else f": value {_short(case.get('failure_case'))!r}"
        col = f"column {column!r}" if isinstance(column, str) else "table"
        lines.append(f"  - {col}: check '{key[0]}' failed{where}{value}")
    head = f"{name} table failed validation: {len(lines)} failure(s)"
    if len(lines) > MAX_LISTED_FAILURES:
        lines = lines[:MAX_LISTED_FAILURES] + [f"  ... and {len(lines) - MAX_LISTED_FAILURES} more"]
    return "\n".join([head, *lines])


def _short(value: object, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- I/O
class TableWriter:
    """Writes batches of rows to part-NNNNN.parquet files in `directory`, one row group per batch.

    Batches are validated against the table's schema a few MB at a time (pandera's cost is
    mostly per call), and written only once they pass.
    """

    VALIDATE_BYTES = 32 * 1024 * 1024

    def __init__(self, directory: Path, arrow_schema: pa.Schema, name: str, validate: bool = True):
        self.directory = Path(directory)
        self.arrow_schema = arrow_schema
        self.name = name
        self.validate = validate
        self._writer: pq.ParquetWriter | None = None
        self._file_bytes = 0
        self._files = 0
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self.rows = 0

    def write(self, rows: dict[str, list]) -> None:
        self.write_table(pa.Table.from_pydict(rows, schema=self.arrow_schema))

    def write_table(self, table: pa.Table) -> None:
        """One batch as an Arrow table of the writer's schema."""
        if not table.schema.equals(self.arrow_schema):
            table = table.select(self.arrow_schema.names).cast(self.arrow_schema)
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        if self._pending_bytes >= self.VALIDATE_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        if self.validate:
            validate_frame(pa.concat_tables(self._pending).to_pandas(), self.name)
        for table in self._pending:
            if self._writer is None or self._file_bytes >= MAX_FILE_BYTES:
                self._roll()
            assert self._writer is not None
            self._writer.write_table(table, row_group_size=table.num_rows)
            self._file_bytes += table.nbytes
            self.rows += table.num_rows
        self._pending, self._pending_bytes = [], 0

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.directory / f"part-{self._files:05d}.parquet"
        # Only `source` repeats; dictionary-encoding unique texts and ids is wasted work.
        self._writer = pq.ParquetWriter(
            path, self.arrow_schema, compression="zstd", compression_level=1, use_dictionary=["source"]
        )
        self._files += 1
        self._file_bytes = 0

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # failing: the directory is discarded, write nothing more
            self._writer.close()
            self._writer = None


def table_files(directory: Path) -> list[Path]:
    files = sorted(Path(directory).glob("part-*.parquet"))
    if not files:
        raise UserError(f"{directory}: no table found (run the stage that writes it first)")
    return files


@contextlib.contextmanager
def _readable(path: str | Path) -> Iterator[None]:
    """A Parquet file that cannot be read (truncated, corrupted) is a one-line error naming it."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: unreadable Parquet part ({str(e).splitlines()[0][:200]}); rerun the stage that "
                        "wrote it (dvc repro --force STAGE, or dvc checkout to restore it from the cache)") from None


def _open(path: str | Path) -> pq.ParquetFile:
    with _readable(path):
        return pq.ParquetFile(path)


def iter_batches(directory: Path, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Record batches of a table, in order, bounded in size."""
    for path in table_files(directory):
        pf = _open(path)
        with _readable(path):
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def row_groups(directory: Path) -> list[tuple[str, int]]:
    """(file, row group) pairs of a table, in order: the unit of parallel work downstream."""
    return [(str(p), i) for p in table_files(directory) for i in range(_open(p).num_row_groups)]


def read_row_group(task: tuple[str, int], columns: list[str]) -> pa.Table:
    path, index = task
    with _readable(path):
        return _open(path).read_row_group(index, columns=columns)


def count_rows(directory: Path) -> int:
    return sum(_open(p).metadata.num_rows for p in table_files(directory))
