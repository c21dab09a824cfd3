"""The environments hold exactly the locked versions (requirements.lock, requirements-dvc.lock):
what `make setup` installs on a fresh machine is the set the suite passed with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, dvc_bin


def frozen(python: str, *args: str) -> list[str]:
    proc = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "freeze", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def locked(name: str) -> list[str]:
    return (REPO / name).read_text(encoding="utf-8").splitlines()


def differences(installed: list[str], lock: list[str]) -> list[str]:
    return [f"installed, not locked: {x}" for x in sorted(set(installed) - set(lock))] + \
           [f"locked, not installed: {x}" for x in sorted(set(lock) - set(installed))]


def test_the_project_environment_holds_exactly_the_locked_versions():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("the suite runs outside the project's .venv (make setup makes it)")
    assert differences(frozen(sys.executable, "--exclude-editable"), locked("requirements.lock")) == []


def test_dvcs_environment_holds_exactly_the_locked_versions():
    python = Path(dvc_bin()).resolve().parent / "python"
    if not python.exists():
        pytest.skip(f"dvc at {dvc_bin()} is not in a virtual environment of its own")
    assert differences(frozen(str(python)), locked("requirements-dvc.lock")) == []


def test_the_locks_pin_every_package_to_one_version():
    for name in ("requirements.lock", "requirements-dvc.lock"):
        lines = [line for line in locked(name) if line and not line.startswith("#")]
        assert lines and all("==" in line and " @ " not in line for line in lines), name
        names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
        assert len(names) == len(set(names)), name
    assert any(line.startswith("torch==2.13.0") for line in locked("requirements.lock"))
