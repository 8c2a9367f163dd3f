"""The niche student's choices on its training patients, through :mod:`stdistill.select`: the
validation split (a patient, each patient in turn, or a spatial block of a one-patient section),
the candidate settings and epochs, and the test-time refinement."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace

import anndata as ad
import numpy as np

from ..._errors import StdistillError
from ..._keys import Key
from ...select import Criterion, LeaveOnePatientOut, Selection, ValidationPatients, ValidationRows, select

__all__ = ["NicheSelection", "criterion"]


def criterion(monitor: str) -> Criterion:
    """How candidates are compared: each split's best ``monitor`` value over epochs, then their
    mean; ties (within 1e-9): the first listed. ARI is maximised, the error and the loss minimised."""
    return Criterion(metric=monitor, maximize=monitor == "val_ari", aggregate="best_per_split", first_epoch=1, tol=1e-9)


def _curve(hist: list[float], monitor: str) -> list[float]:
    """A run's validation curve in the criterion's units (the module minimises -ARI)."""
    return [-v for v in hist] if monitor == "val_ari" else list(hist)


class NicheSelection:
    """The selection side of :class:`~stdistill.students.NicheStudent` (a mixin)."""

    def _validation(self, adata: ad.AnnData, has: np.ndarray, train_pats: list[str], rotate: bool):
        """``(splitter, validation patients, spatial block spots)``; splitter None: no validation.

        ``val_patients``: ``"smallest"`` (the training patient with the fewest usable spots; ties:
        the smaller id), ``"each"`` with ``rotate`` (that one, then every other in turn), a list,
        or None; with one training patient, a spatial block (``val_block``)."""
        vp = self.config.val_patients
        if vp in ("smallest", "each") and len(train_pats) < 2:
            block = self._one_patient_block(adata, has, train_pats)
            if not block.any():
                return None, [], 0
            return ValidationRows(block, "block", rows=has, subset=False), [], int(block.sum())
        if vp is None or (not isinstance(vp, str) and len(vp) == 0):
            return None, [], 0
        pats = adata.obs[Key.obs.patient].astype(str).to_numpy()
        each = vp == "each" and rotate
        if vp in ("smallest", "each"):
            vp = [min(train_pats, key=lambda q: ((pats[has] == q).sum(), q))]
        vp = [str(v) for v in vp]
        missing = set(vp) - set(train_pats)
        if missing:
            raise StdistillError(f"validation patients {sorted(missing)} are not in the training data")
        if (has & ~np.isin(pats, vp)).sum() < 2:
            raise StdistillError("no training spots left after taking the validation patients out")
        if each:  # the same smallest patient first, then every other training patient in turn
            return LeaveOnePatientOut(first="smallest", rows=has, subset=False), [*vp, *(q for q in train_pats if q != vp[0])], 0
        return ValidationPatients(vp, rows=has, subset=False), vp, 0

    def _fit_selected(self, adata: ad.AnnData, probs: np.ndarray, candidates: list[dict], splitter,
                      run_dir: str | os.PathLike | None):
        """Train every candidate on every split (each on the spots outside the split's validation
        rows) and keep the winner's run on the first split: ``(selection, winner's module, its
        inputs, first split's validation rows)``."""
        base, runs, first = self.config, {}, []

        def fit_score(cfg, split, ci):
            if not first:
                first.append(split.name)
            self.config = cfg
            arrays = self._prepare(adata, probs)
            ok = arrays[-1]
            tag = "" if split.name == first[0] else f"_val{split.name}"
            mod = self._train(arrays, np.flatnonzero(ok & ~split.val_rows), np.flatnonzero(ok & split.val_rows),
                              cfg.max_epochs, cfg.seed, run_dir, f"candidate{ci}{tag}")
            if not tag:  # the first split's runs: the winner's model chooses the refinement and sets the refit
                runs[ci] = (mod, arrays, dict(self.info_), self._views_z)
            return _curve(mod.monitor_history, cfg.monitor)

        sel = select(adata, fit_score, candidates, base=base, splitter=splitter, criterion=criterion(base.monitor),
                     order="splits", with_candidate=True)
        mod, arrays, info, self._views_z = runs[sel.choice["candidate"]]  # the winner's views, not the last's
        self.config, self.info_ = replace(base, **sel.choice["settings"]), info
        return sel, mod, arrays, splitter.masks(adata)[0][2]

    def _fit_validated(self, adata: ad.AnnData, probs: np.ndarray, candidates: list[dict] | None, splitter,
                       val: tuple[list[str], int], run_dir) -> tuple:
        """Early stopping (and the candidates' choice) on the validation split, the refinement
        chosen there, then the refit on every training spot; ``(module, inputs)``."""
        sel, mod, arrays, is_val = self._fit_selected(adata, probs, candidates or [{}], splitter, run_dir)
        c = self.config
        epoch = sel.choice["epoch"] if sel.choice["epoch"] is not None else c.max_epochs
        score = sel.choice["score"]
        self.info_.update(val_patients=val[0], val_block_spots=val[1], val_loss_history=[float(v) for v in mod.val_history],
                          val_err_history=[float(v) for v in mod.val_err_history], best_epoch=int(epoch),
                          best_val=-score if c.monitor == "val_ari" else score,  # the monitored value (-ARI)
                          chosen=dict(sel.choice["settings"]), selection=sel.to_dict())
        self._choose_refine(adata, probs, is_val, mod)
        if c.refit:
            mod = self._train(arrays, np.flatnonzero(arrays[-1]), None, max(epoch, c.min_epochs), c.seed + 1, run_dir,
                              "refit")
        elif mod.best_state is not None:
            mod.net.load_state_dict(mod.best_state)
        return mod, arrays

    @property
    def selection_(self) -> Selection | None:
        """The choice of settings and epochs on the validation split(s) (``info_["selection"]``)."""
        return _selection(self.info_.get("selection"))

    @property
    def refine_selection_(self) -> Selection | None:
        """The choice of refinement on the validation split (``info_["refine_selection"]``)."""
        return _selection(self.info_.get("refine_selection"))

    def _choose_refine(self, adata: ad.AnnData, probs: np.ndarray, is_val: np.ndarray, mod) -> None:
        """Pick the refinement of ``refine_grid`` on the validation spots with the pre-refit model."""
        from .._refine import choose_refinement

        grid = self.config.refine_grid
        if not grid:
            self.info_.update(refine={"method": "none"}, refine_selection=None)
            return
        net = copy.deepcopy(mod.net)
        if mod.best_state is not None:
            net.load_state_dict(mod.best_state)
        self.net_ = net.eval()
        try:
            pred = self.predict_proba(adata, extract=False)
        finally:
            self.net_ = None
        teacher = np.where(np.all(np.isfinite(probs), axis=1), np.nan_to_num(probs).argmax(1), -1)
        chosen, sel = choose_refinement(adata, pred, teacher, is_val & (teacher >= 0), grid,
                                        feature_key=self.config.feature_key, seed=self.config.seed,
                                        student_radius_um=self.info_.get("radius_um"),
                                        connectivity_key=self.config.connectivity_key)
        self.info_.update(refine=chosen, refine_selection=sel.to_dict())

    def _one_patient_block(self, adata: ad.AnnData, has: np.ndarray, train_pats: list[str]) -> np.ndarray:
        """The spatial validation block used when only one patient trains (warned)."""
        from .._views import spatial_block

        frac = self.config.val_block
        if frac <= 0:
            warnings.warn(f"NicheStudent: one training patient ({train_pats[0]}) and val_block=0: no early stopping, "
                          f"training all {self.config.max_epochs} epochs", UserWarning, stacklevel=4)
            return np.zeros(adata.n_obs, dtype=bool)
        is_val = spatial_block(adata, has, frac)
        warnings.warn(f"NicheStudent: one training patient ({train_pats[0]}), so no validation patient: early stopping on "
                      f"a spatial block instead ({int(is_val.sum())} spots, {frac:.0%} of each section along its longer axis)",
                      UserWarning, stacklevel=4)
        return is_val


def _selection(record) -> Selection | None:
    """A Selection from its ``to_dict`` record (None for none, or for records of older versions)."""
    return Selection.from_dict(record) if isinstance(record, dict) else None
