"""`llm`: run a pipeline stage from params.yaml.

    llm ingest | clean | tokenizer | shards   [--params params.yaml]

dvc.yaml's stage commands are exactly these. A user error (bad params, missing source, empty
corpus, data that fails its schema) prints one `error:` message and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from llm.errors import UserError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from llm.stages import STAGES

    parser = argparse.ArgumentParser(prog="llm", description="Train a GPT from raw text, one stage at a time.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    docs = {
        "ingest": "read ingest.sources into data/raw (Parquet)",
        "clean": "repair, strip markup, filter and dedup data/raw into data/clean",
        "tokenizer": "train the sentencepiece tokenizer on the train split",
        "shards": "tokenize data/clean into Arrow shards under data/shards",
    }
    for name in STAGES:
        p = sub.add_parser(name, help=docs.get(name, ""), description=docs.get(name, ""))
        p.add_argument("--params", default="params.yaml", help="params file; outputs go beside it (default params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from llm.progress import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return run_stage(args.command, Path(args.params))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were left as they were", file=sys.stderr)
        return 130


def run_stage(name: str, params_path: Path) -> int:
    from llm.config import load_params
    from llm.stages import STAGES

    params = load_params(params_path)
    root = params_path.resolve().parent
    t0 = time.perf_counter()
    STAGES[name](params, root)
    logging.getLogger("llm").info("%s: done in %.1f s", name, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
