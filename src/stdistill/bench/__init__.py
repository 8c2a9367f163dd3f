"""Benchmark protocols. ``bench.expression``: HEST-Benchmark's expression-prediction protocol."""

from __future__ import annotations

from .expression import DEFAULT_ALPHAS, ExpressionBenchResult, HestRidge, choose_alpha_cv, hest_alpha, read_hest_splits
from .expression import expression

__all__ = ["DEFAULT_ALPHAS", "ExpressionBenchResult", "HestRidge", "choose_alpha_cv", "expression", "hest_alpha",
           "read_hest_splits"]
