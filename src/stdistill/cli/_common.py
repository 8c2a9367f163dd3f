"""Helpers shared by the CLI sub-apps: comma lists, numeric grids, patient splits."""

from __future__ import annotations

from typing import Optional

from .._errors import StdistillError
from .._keys import Key


def _split(v: Optional[str]) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()] if v else []


def command_line() -> str:
    """The command as typed (``stdistill`` plus its arguments, shell-quoted), for run records."""
    import shlex
    import sys

    return shlex.join(["stdistill", *sys.argv[1:]])


def _numbers(v: str, kind: type, option: str) -> list:
    """``"3e-5,1e-4"`` -> ``[3e-05, 0.0001]``; one line naming the option on bad input."""
    try:
        out = [kind(x) for x in _split(v)]
    except ValueError:
        out = []
    if not out:
        raise StdistillError(f"{option} must be a number or a comma list of numbers, got {v!r}")
    return out


#: help of ``--stain-norm`` wherever an adapted encoder (PEKA, STAMP) is trained
STAIN_NORM_HELP = ("Stain-normalise every patch before the encoder: macenko or reinhard (needs stdistill[stain]), onto "
                   "the first imaged training section (stored with the model: predict normalises new slides onto it); "
                   "none (default): raw patches.")


def stain_norm_option(v: Optional[str]) -> Optional[str]:
    """``--stain-norm``: None for none, else a stain method (one clear error for an unknown one)."""
    if v is None or v.lower() == "none":
        return None
    from ..pp._stain import check_method

    return check_method(v)


def imaged_sections(adata):
    """``adata`` restricted to its sections with an H&E image (a copy)."""
    from .. import io

    return io.subset_sections(adata, [s for s in io.sections(adata) if io.has_image(adata, s)])


def patient_split(adata, test_patients: Optional[str], val_patients: Optional[str]) -> dict:
    """Split by ``obs["patient"]`` from two comma lists. Returns ``train_all`` (every section of
    the other patients), ``train`` (their imaged sections), ``val`` and ``test`` (imaged sections of
    those patients, ``None`` when none are given). Unknown or overlapping patients are one error."""
    pats = adata.obs[Key.obs.patient].astype(str)
    test, val = set(_split(test_patients)), set(_split(val_patients))
    unknown = (test | val) - set(pats)
    if unknown:
        raise StdistillError(f"unknown patients {sorted(unknown)} (have {sorted(set(pats))})")
    if test & val:
        raise StdistillError(f"patients {sorted(test & val)} are both test and validation")
    train_all = adata[(~pats.isin(test | val)).to_numpy()].copy()
    if train_all.n_obs == 0:
        raise StdistillError("no patient is left for training")
    train = imaged_sections(train_all)
    if train.n_obs == 0:
        raise StdistillError("no training section has an image")

    def part(ps: set):
        return imaged_sections(adata[pats.isin(ps).to_numpy()].copy()) if ps else None

    return {"train_all": train_all, "train": train, "val": part(val), "test": part(test)}


def _not_rank_zero() -> bool:
    """True in a DDP worker other than global rank 0 (nothing to write or print there)."""
    from .._lightning import is_global_zero

    return not is_global_zero()


def print_selection(console, selection, title: str | None = None) -> None:
    """Print a :class:`stdistill.select.Selection` the one way every command does (plain text)."""
    console.print((f"{title}\n" if title else "") + str(selection), markup=False, highlight=False, soft_wrap=True)
