"""Fault injection for the kill and divergence tests: one hook, `fault_point(name)`, that
production code calls at named places (`atomic_dir.written`, `train.checkpoint.3`,
`train.rank1.step4`, ...).

A test cannot hit the instant between two renames by timing, nor make one rank of several
diverge by choosing a learning rate; this hook lets it do both, switched on by environment
variables. Unset, a call is two dict lookups.

- LLM_FAULT_POINT=NAME: the process SIGKILLs itself at that point (no cleanup runs, as in a crash).
- LLM_FAULT_NAN=NAME: at that point the model's weights become NaN, so the next step's loss is
  NaN as a real divergence's is (only the process that reaches the point: one rank of several).
"""

from __future__ import annotations

import os
import signal
from typing import Any


def fault_point(name: str, model: Any = None) -> None:
    if os.environ.get("LLM_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if model is not None and os.environ.get("LLM_FAULT_NAN") == name:
        for p in model.parameters():
            p.data.fill_(float("nan"))
