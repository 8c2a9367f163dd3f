"""Benchmark protocols. ``bench.expression``: HEST-Benchmark's expression-prediction protocol."""

from __future__ import annotations

from ._expression import expression
from ._folds import read_hest_splits
from ._probe import DEFAULT_ALPHAS, HestRidge, choose_alpha_cv, hest_alpha, with_views
from ._result import ExpressionBenchResult

__all__ = ["DEFAULT_ALPHAS", "ExpressionBenchResult", "HestRidge", "choose_alpha_cv", "expression", "hest_alpha",
           "read_hest_splits", "with_views"]
