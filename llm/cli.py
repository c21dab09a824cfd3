"""`llm`: run a pipeline stage from params.yaml, or sample from the trained model.

    llm ingest | clean | tokenizer | shards | train | evaluate | report | export   [--params params.yaml]
    llm train --resume          continue from models/checkpoints/last.pt (fails if there is none)
    llm sample --prompt "ROMEO:"
    llm ladder NAME             train and evaluate one rung of the scaling ladder into ladder/NAME/
    llm scaling                 plot val bits per byte against training FLOPs across the rungs
    llm stages [--write|--check]  list the stages; write or check dvc.yaml's generated parts

dvc.yaml's stage commands are exactly these. A user error (bad params, missing source, empty
corpus, data that fails its schema) prints one `error:` message and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from llm.errors import UserError, server_problem

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from llm.stages import STAGES

    parser = argparse.ArgumentParser(prog="llm", description="Train a GPT from raw text, one stage at a time.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.description, description=stage.description)
        p.add_argument("--params", default="params.yaml",
                       help="params file; outputs go beside it (default params.yaml)")
        if name == "train":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--resume", dest="resume", action="store_const", const="always",
                           help="continue from the checkpoint; fail if there is none for these params")
            g.add_argument("--restart", dest="resume", action="store_const", const="never",
                           help="ignore any checkpoint and start from scratch")
            p.set_defaults(resume="auto")
    p = sub.add_parser("ladder", help="train and evaluate one rung of ladder.rungs into ladder/NAME/")
    p.add_argument("rung", help="a name in ladder.rungs")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p = sub.add_parser("scaling", help="ladder/scaling.png: val bits per byte against training FLOPs across the rungs")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    p = sub.add_parser("stages", help="list the stages; --write or --check dvc.yaml's code deps and desc")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite each stage's code deps and desc in dvc.yaml")
    g.add_argument("--check", action="store_true", help="exit 1, naming the stages, when --write would change dvc.yaml")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="dvc.yaml, beside the llm/ it describes (default dvc.yaml)")
    p = sub.add_parser("params", help="print the params in force: the file's values over the defaults (docs/params.md)")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--changed", action="store_true", help="only the values that differ from the defaults")
    g.add_argument("--docs", action="store_true", help="every parameter as docs/params.md (markdown)")
    sub.add_parser("sample", help="generate text with the trained model (llm sample --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llm.progress import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "sample":
            from llm.sample import main as sample_main

            return sample_main(rest)
        if rest:
            build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "params":
            return print_params(Path(args.params), changed=args.changed, docs=args.docs)
        if args.command == "stages":
            return list_stages(Path(args.dvc_yaml), write=args.write, check=args.check)
        if args.command in ("ladder", "scaling"):
            return run_ladder(args.command, Path(args.params), getattr(args, "rung", ""))
        return run_stage(args.command, Path(args.params), getattr(args, "resume", "auto"))
    except UserError as e:
        report_error(str(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were left as they were", file=sys.stderr)
        return 130
    except Exception as e:
        if line := server_problem(e):  # a tracking server that refused us or is gone: not a bug of ours
            report_error(line)
            return EXIT_USER_ERROR
        raise


def report_error(message: str) -> None:
    """The one `error:` line. A worker of a launch hands its line to the launcher instead
    (torch elastic's error file), which prints one line for the whole launch."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.environ.get("LLM_LAUNCHED"):
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
        return
    print(f"error: {message}", file=sys.stderr)


def run_stage(name: str, params_path: Path, resume: str = "auto") -> int:
    from llm.config import load_params
    from llm.distributed import launch, processes, under_launcher
    from llm.io import remove_stale_outputs
    from llm.layout import Layout
    from llm.stages import run

    params = load_params(params_path)
    layout = Layout.of(params_path.resolve().parent)
    t0 = time.perf_counter()
    if not under_launcher():  # the launch swept already; its workers would race each other
        remove_stale_outputs(layout)  # what any killed stage left behind, not only this one
    if name == "train" and processes(params.train) > 1 and not under_launcher():
        flag = {"always": ["--resume"], "never": ["--restart"]}.get(resume, [])
        os.environ["LLM_LAUNCHED"] = "1"
        launch(params.train, ["train", "--params", str(params_path.resolve()), *flag])
    else:
        run(name, params, layout, **({"resume": resume} if name == "train" else {}))
    logging.getLogger("llm").info("%s: done in %.1f s", name, time.perf_counter() - t0)
    return 0


def list_stages(dvc_yaml: Path, write: bool = False, check: bool = False) -> int:
    """Print each stage with its description; or rewrite (write) or check (check) dvc.yaml's
    generated parts. A stale dvc.yaml under check is one line naming its stages, and exit 1."""
    from llm.stages import STAGES

    if not (write or check):
        width = max(map(len, STAGES))
        for name, stage in STAGES.items():
            print(f"{name:<{width}}  {stage.description}")
        return 0
    from llm import dvcyaml

    if check:
        stale = dvcyaml.stale_stages(dvc_yaml)
        if stale:
            names = ", ".join(stale)
            print(f"{dvc_yaml}: stale code deps or desc of {names}: run `llm stages --write`", file=sys.stderr)
            return 1
        return 0
    changed = dvcyaml.write(dvc_yaml)
    print(f"{dvc_yaml}: rewrote {', '.join(changed)}" if changed else f"{dvc_yaml}: up to date")
    return 0


def print_params(params_path: Path, changed: bool, docs: bool) -> int:
    """The values in force as YAML; with `changed`, only those that differ from llm/config.py's
    defaults; with `docs`, every parameter's reference (docs/params.md)."""
    import yaml

    from llm.config import Params, load_params

    if docs:
        from llm.paramdocs import params_markdown

        print(params_markdown(), end="")
        return 0

    values = load_params(params_path).model_dump(mode="json")
    if changed:
        values = _differences(values, Params().model_dump(mode="json"))
    print(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), end="")
    return 0


def _differences(values: dict, defaults: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            if inner := _differences(value, defaults[key]):
                out[key] = inner
        elif value != defaults.get(key):
            out[key] = value
    return out


def run_ladder(command: str, params_path: Path, rung: str) -> int:
    from llm.config import load_params
    from llm.ladder import run_rung, scaling

    params = load_params(params_path)
    root = params_path.resolve().parent
    if command == "ladder":
        run_rung(params, root, rung)
    else:
        scaling(params, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
