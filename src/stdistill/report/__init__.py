"""``stdistill report RUN_DIR``: one self-contained HTML page (figures embedded as base64 PNG) for a
``stdistill predict`` output folder or a benchmark results folder.

>>> sd.report.write_report("out/")            # writes out/report.html
"""

from ._collect import collect
from ._render import render, write_report

__all__ = ["collect", "render", "write_report"]
