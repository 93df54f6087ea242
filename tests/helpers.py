"""Small helpers shared by the test modules (importable once tests/ is on sys.path)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """A missing prerequisite: a skip on a developer machine, a failure in CI.

    CI must not pass by skipping what it exists to check.
    """
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package})")
    return path
