"""Benchmark protocols. ``bench.expression``: HEST-Benchmark's expression-prediction protocol."""

from __future__ import annotations

from ._expression import (
    DEFAULT_ALPHAS,
    ExpressionBenchResult,
    HestRidge,
    choose_alpha_cv,
    expression,
    hest_alpha,
    read_hest_splits,
    with_views,
)

__all__ = ["DEFAULT_ALPHAS", "ExpressionBenchResult", "HestRidge", "choose_alpha_cv", "expression", "hest_alpha",
           "read_hest_splits", "with_views"]
