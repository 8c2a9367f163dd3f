"""The code passes ``ruff check`` with the rules in pyproject.toml (what the pre-commit hook runs)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
    from ruff.__main__ import find_ruff_bin

    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff check found problems (fix them, or run `ruff check --fix`):\n{r.stdout}{r.stderr}"
