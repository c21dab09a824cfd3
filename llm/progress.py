"""Progress bars and logging set-up shared by every stage."""

from __future__ import annotations

import logging
import os
import sys


def progress_enabled() -> bool:
    """Bars on a terminal; LLM_PROGRESS=1 forces them on, LLM_PROGRESS=0 off."""
    forced = os.environ.get("LLM_PROGRESS")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
