"""Choosing settings on validation patients inside the training folds: one engine for every recipe.

- :func:`select` trains candidates on inner splits with a recipe's ``fit_score`` and returns a
  :class:`Selection` (the candidates x splits table, the :class:`Criterion`, the choice), which
  every recipe records in its bundle (:meth:`Selection.to_dict`) and prints the same way;
- splitters: :class:`LeaveOnePatientOut`, :class:`ValidationPatients`, :class:`ValidationRows`,
  :class:`PatientFolds` (survival cohorts); :class:`Split` is one inner split;
- :func:`choose` re-aggregates a table; :func:`selection_record` is a bundle's ``training``
  entry; :func:`inner_splits` and :func:`smooth_curve` are helpers.
"""

from ._grid import choose, inner_splits, select
from ._selection import Criterion, Selection, selection_record, smooth_curve
from ._splits import LeaveOnePatientOut, PatientFolds, Split, ValidationPatients, ValidationRows

__all__ = ["Criterion", "LeaveOnePatientOut", "PatientFolds", "Selection", "Split", "ValidationPatients",
           "ValidationRows", "choose", "inner_splits", "select", "selection_record", "smooth_curve"]
