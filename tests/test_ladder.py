"""The scaling ladder's library half (the Dagster assets are tested in test_dagster.py)."""

from __future__ import annotations

import math

import pytest

from llm.config import parse_params
from llm.errors import UserError
from llm.ladder import power_law, rung_params
from tests.conftest import small_params


def test_a_rung_takes_its_shape_and_the_ladders_budget():
    params = parse_params(small_params(["corpus"], train={"time_budget_minutes": 5}))
    rp = rung_params(params, "b")
    assert (rp.model.n_layer, rp.model.n_head, rp.model.n_embd) == (2, 2, 32)
    assert rp.model.block_size == params.model.block_size
    assert rp.train.max_steps == params.ladder.max_steps and rp.train.time_budget_minutes == 0
    assert rp.tracking.experiment == "llm-ladder"
    with pytest.raises(UserError, match=r"ladder: no rung 'zz' in ladder.rungs \(have: a, b\)"):
        rung_params(params, "zz")


@pytest.mark.parametrize("rung, message", [
    ({"bad name": {"n_layer": 1, "n_head": 2, "n_embd": 16}}, "rung name 'bad name' must be letters"),
    ({"a": {"n_layer": 1, "n_head": 3, "n_embd": 16}},
     "ladder.rungs.a: Value error, n_embd (16) must be a multiple of n_head (3)"),
])
def test_bad_rungs_are_named(rung, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(small_params(["corpus"], ladder={"rungs": rung}))


def test_the_power_law_fit_recovers_its_exponent():
    points = [{"train_flops": c, "val_bpb": 7.0 * c ** -0.05} for c in (1e9, 1e10, 1e11, 1e12)]
    fit = power_law(points)
    assert math.isclose(fit["b"], -0.05, rel_tol=1e-9) and math.isclose(fit["a"], 7.0, rel_tol=1e-9)
    assert power_law(points[:1]) is None
