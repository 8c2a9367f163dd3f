"""Sphinx configuration of the stdistill documentation.

Build (from the repository root; needs the ``docs`` extra, ``pip install -e ".[docs]"``):

    sphinx-build -W --keep-going -b html docs docs/_build/html

The build needs no network. Links into the anndata, scanpy and numpy documentation
(intersphinx) are off unless ``STDISTILL_DOCS_INTERSPHINX=1`` is set where those sites are
reachable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
if (HERE.parent / "src" / "stdistill").is_dir():  # a source checkout documents its own code
    sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import stdistill  # noqa: E402

project = "stdistill"
author = "the stdistill authors"
copyright = "the stdistill authors"
release = stdistill.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "stdistill_api",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "results", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style heading anchors (links such as encoders.md#many-slides-a-manifest), $math$,
# ::: fences, definition lists.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]

# API reference: numpy-style docstrings, type hints in the description, members in source order.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # methods overriding Lightning or torch keep their own (or no) docstring
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Optional dependencies the API pages must not need (the docs extra does not install them).
autodoc_mock_imports = ["scvi", "harmonypy", "spatialdata", "conch", "openslide", "SurvSet"]

if os.environ.get("STDISTILL_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "python": ("https://docs.python.org/3", None),
    }

html_theme = "furo"
html_title = f"stdistill {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
