"""Fault injection for the kill and divergence tests, switched on by environment variables.

A test cannot hit the instant between two renames by timing, nor make one rank of several
diverge by choosing a learning rate; these hooks let it do both. Unset, each is one dict lookup.
"""

from __future__ import annotations

import os
import signal


def kill_point(name: str) -> None:
    """LLM_FAULT_POINT=name: the process SIGKILLs itself here (no cleanup runs, as in a crash)."""
    if os.environ.get("LLM_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(rank: int, step: int) -> bool:
    """LLM_FAULT_NAN=RANK:STEP: that rank's loss becomes NaN at that step (1-based)."""
    return os.environ.get("LLM_FAULT_NAN") == f"{rank}:{step}"
