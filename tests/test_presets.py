"""Presets and params.yaml hold only what differs from the defaults (llm/config.py), and each keeps
every group DVC tracks, so `cp presets/NAME.yaml params.yaml && dvc repro` works."""

from __future__ import annotations

import pytest
import yaml

from llm.config import Params, load_params
from llm.model import GPT, GPTConfig
from tests.conftest import REPO

PRESETS = sorted((REPO / "presets").glob("*.yaml"))
# Values a file may repeat from the defaults because a user should see them; each such line carries a comment.
SHOWN_ON_PURPOSE = {"seed", "ingest.sources", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
                    "train.max_steps", "report.prompts"}


def leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = value
    return out


def own_or_group_line(lines: list[str], dotted: str) -> str:
    """The line of a key and the line of the group it is in (where one comment may cover a block)."""
    group, _, name = dotted.rpartition(".")
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{name}:")
              and (not group or any(ln.startswith(f"{group.split('.')[0]}:") for ln in lines[:i])))
    indent = len(lines[at]) - len(lines[at].lstrip())
    parent = next((ln for ln in reversed(lines[:at]) if ln.strip() and len(ln) - len(ln.lstrip()) < indent), "")
    return lines[at] + (parent if indent else "")


def default_of(dotted: str) -> object:
    value: object = Params().model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]  # type: ignore[index]
    return value


def tracked_groups() -> set[str]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return {p for stage in dvc["stages"].values() for p in stage.get("params", []) if isinstance(p, str)}


def test_there_are_two_gpu_presets():
    assert {p.stem for p in PRESETS} == {"gpu-small", "gpt2-small"}


@pytest.mark.parametrize("path", [REPO / "params.yaml", *PRESETS], ids=lambda p: p.name)
def test_a_params_file_repeats_no_default_without_saying_why(path):
    data = yaml.safe_load(path.read_text())
    lines = path.read_text().splitlines()
    for key, value in leaves(data).items():
        if value != default_of(key):
            continue
        assert key in SHOWN_ON_PURPOSE, f"{path.name}: {key} = {value!r} is the default; drop it"
        assert "#" in own_or_group_line(lines, key), (f"{path.name}: {key} repeats the default "
                                                      "without a comment saying why")


@pytest.mark.parametrize("path", [REPO / "params.yaml", *PRESETS], ids=lambda p: p.name)
def test_a_params_file_has_every_group_dvc_tracks(path):
    assert tracked_groups() <= set(yaml.safe_load(path.read_text()))


def test_params_yaml_is_the_defaults():
    assert load_params(REPO / "params.yaml") == Params()


def test_gpt2_small_is_gpt2_small():
    params = load_params(REPO / "presets" / "gpt2-small.yaml")
    cfg = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
    assert 123e6 < GPT(cfg).num_params() < 125e6
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert params.preset == "gpt2-small" and params.train.compile and params.train.device == "auto"
    assert params.train.tokens_per_step % (params.train.batch_size * cfg.block_size * 8) == 0  # fits 1, 2, 4 or 8 GPUs


def test_gpu_small_shares_the_data_stages_with_the_cpu_default():
    gpu, cpu = load_params(REPO / "presets" / "gpu-small.yaml"), Params()
    for group in ("ingest", "clean", "split", "tokenizer", "shards", "compute"):
        assert getattr(gpu, group) == getattr(cpu, group), group
    assert gpu.seed == cpu.seed and gpu.preset == "gpu-small"
