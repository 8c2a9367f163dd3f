"""Run the real ``stdistill`` entry point (``stdistill.cli.main``) in a fresh process, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MAIN = ("import sys\n"
         "sys.path.insert(0, {tests!r})\n"
         "from conftest import register_tiny_encoders\n"
         "register_tiny_encoders()\n"
         "from stdistill.cli import main\n"
         "sys.argv[0] = 'stdistill'\n"
         "main()\n")


_PLAIN = "import sys\nfrom stdistill.cli import main\nsys.argv[0] = 'stdistill'\nmain()\n"


def _cli(*args: str, env: dict | None = None, popen: bool = False, tiny: bool = False):
    """Run the real entry point, ``stdistill.cli.main``, in a fresh process (``tiny``: with the
    tiny test encoders registered first)."""
    code = _MAIN.format(tests=str(REPO / "tests")) if tiny else _PLAIN
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
         "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-c", code, *args]
    if popen:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=120, check=False)


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    """``stdistill.cli.main`` in this process with ``argv``: its exit code and the non-empty stderr lines."""
    import pytest

    from stdistill.cli import main

    monkeypatch.setattr(sys, "argv", ["stdistill", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return info.value.code, err
