"""The documentation site builds with warnings as errors, and every public name is in its API reference."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "docs" / "_ext"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site exactly as README says (sphinx-build -W --keep-going -b html docs OUT)."""
    for mod in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (docs extra: pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(out / "doctrees"),
                        str(REPO / "docs"), str(out / "html")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    print(f"docs built in {time.perf_counter() - t0:.0f} s")
    return out / "html"


def _subpackages() -> list[str]:
    import stdistill

    return [n for n in stdistill.__all__ if n not in ("StdistillError", "__version__")]


def test_every_subpackage_has_a_page(site):
    import stdistill_api

    assert stdistill_api.subpackages() == _subpackages()
    for sub in ("io", "datasets", "pp", "encoders", "features", "teachers", "students", "losses", "metrics", "bench",
                "recipes", "pl", "bundle", "slide", "report", "select", "adapters"):
        assert (site / "api" / f"stdistill.{sub}.html").exists(), sub


def test_every_public_name_is_documented(site):
    import stdistill_api

    missing = []
    for sub in _subpackages():
        module = f"stdistill.{sub}"
        mod = importlib.import_module(module)
        names = set(getattr(mod, "__all__", None) or stdistill_api.public_names(module))
        assert names, module
        html = (site / "api" / f"{module}.html").read_text()
        ids = set(re.findall(r'id="([^"]+)"', html))
        missing += [f"{module}.{n}" for n in sorted(names) if f"{module}.{n}" not in ids]
    index = (site / "api" / "index.html").read_text()
    missing += [n for n in ("stdistill.StdistillError", "stdistill.__version__") if f'id="{n}"' not in index]
    assert not missing, f"not in the API reference: {missing}"


def test_pages_are_in_the_site(site):
    for page in ("index", "install", "quickstart", "which-recipe", "tutorials", "niches", "expression", "pathways", "genst",
                 "survival", "predict", "cluster", "data", "encoders", "changelog", "contributing"):
        assert (site / f"{page}.html").exists(), page
