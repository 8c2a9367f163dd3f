"""Model selection on validation patients inside the training folds, shared by every recipe."""

from ._grid import choose, inner_splits, select

__all__ = ["choose", "inner_splits", "select"]
