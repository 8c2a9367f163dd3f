"""Helpers shared by the CLI sub-apps: comma lists, numeric grids, patient splits."""

from __future__ import annotations

from typing import Optional

import typer

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


#: the message of a settings grid given with --val-patients (a grid rotates validation itself)
GRID_WITH_VAL = "a grid chooses settings by rotating validation among the training patients; drop --val-patients"


# Options that several training commands declare alike (typer reads each call's result as a default).
def run_dir_option():
    """``--run-dir``: where checkpoints go, so the same command resumes after a kill."""
    return typer.Option(None, "--run-dir", help="Checkpoint folder: rerunning the same command after a kill resumes.")


def test_patients_option(default=..., never_used_for: str = "training or choosing"):
    """``--test-patients``: held-out patients (required unless a default is given)."""
    return typer.Option(default, help=f"Comma-separated held-out patients (never used for {never_used_for}).")


def bundle_out_option(default: str):
    """``--out`` of a training command: the model bundle folder."""
    from pathlib import Path

    return typer.Option(Path(default), "--out", "-o", help="Model bundle folder to write.")


def encoder_option(help: str = "Encoder name (stdistill encoders list)."):
    """``--encoder`` of a training command (an ImageNet model by default)."""
    return typer.Option("effnet-lite0-imagenet", help=help)


def devices_option(default):
    """``--devices``: training processes per node (several use Lightning DDP)."""
    return typer.Option(default, "--devices", help="Training processes (GPUs or CPU processes) per node; > 1 uses Lightning DDP.")


def strategy_option():
    """``--strategy``: the Lightning strategy (``auto`` becomes ``ddp`` across several processes)."""
    return typer.Option("auto", "--strategy", help="Lightning strategy (auto; ddp with --devices > 1).")


def num_nodes_option():
    """``--num-nodes``: nodes of a multi-node run."""
    return typer.Option(1, "--num-nodes", help="Nodes (start one process per device with torchrun or srun).")


def val_patients_option():
    """``--val-patients``: early stopping on these patients."""
    return typer.Option(None, help="Validation patients (among the others) for early stopping.")


def rank_option():
    """``--rank``: adapter rank, or a grid of them."""
    return typer.Option(None, help="Adapter rank (default MiSS 128 / LoRA 64); a comma list is a grid.")


def train_from_option():
    """``--train-from``: where the encoder starts to train."""
    return typer.Option(None, help="Cut: 'input', 'blocks.5', ... (default per architecture).")


def stain_norm_flag():
    """``--stain-norm`` of a command training an adapted encoder (parsed by :func:`stain_norm_option`)."""
    return typer.Option(None, "--stain-norm", help=STAIN_NORM_HELP)


def settings_grid(**axes: list) -> list[dict]:
    """Every combination of the axes' values as ``{axis: value}`` dicts, the first axis varying slowest."""
    import itertools

    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def ranks(rank: Optional[str]) -> list:
    """``--rank``: a comma list of adapter ranks, or ``[None]`` (the adapter's default)."""
    return _numbers(rank, int, "--rank") if rank else [None]


def trainer_kwargs(accelerator: str, devices, strategy: str, num_nodes: int = 1) -> dict:
    """Lightning arguments: numeric ``devices`` as a count; strategy ``auto`` becomes ``ddp`` across several
    processes (``devices`` x ``num_nodes`` > 1)."""
    dev = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    many = (dev if isinstance(dev, int) else 1) * num_nodes > 1
    return {"accelerator": accelerator, "devices": dev, "strategy": "ddp" if many and strategy == "auto" else strategy,
            "num_nodes": num_nodes}


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


def chosen_sections(adata, sections: Optional[str], imaged: bool = False) -> list[str]:
    """``--sections`` (a comma list checked against the data); default every section, or every one
    with an image when ``imaged``."""
    from .. import io

    have = io.sections(adata)
    secs = _split(sections) or [s for s in have if not imaged or io.has_image(adata, s)]
    unknown = [s for s in secs if s not in have]
    if unknown:
        raise StdistillError(f"unknown sections {unknown[:3]} (have {have[:6]})")
    return secs


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
