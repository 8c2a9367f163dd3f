"""Checkpoint and resume of a Lightning training stage, shared by every recipe that trains.

A stage (one ``trainer.fit``) gets the folder ``run_dir/<stage>-<fingerprint>``; the fingerprint
covers the settings and every input array, so a rerun resumes only the identical training.
Lightning writes ``last.ckpt`` there after every training epoch; a finished stage leaves
``done.ckpt`` (weights and the module's own state, no optimizer), read back instead of training
again. Checkpoints are read with ``weights_only=True``: nothing is unpickled.

The LightningModule saves what Lightning does not (histories, best weights, RNG states) in
``on_save_checkpoint`` and restores it in ``on_load_checkpoint``; the training DataLoader's
shuffling generator is part of that state, so a resumed run draws the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def read_ckpt(path: Path) -> dict | None:
    """A Lightning checkpoint read with ``weights_only=True``; None (and the file removed) when it
    is missing or unreadable, e.g. cut short by a kill while being written."""
    import torch

    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn file: start this stage again
        path.unlink(missing_ok=True)
        return None


def stage_dir(run_dir: str | os.PathLike, stage: str, settings: Any, arrays: Iterable) -> Path:
    """``run_dir/<stage>-<fingerprint>``: BLAKE2b-64 of ``settings`` (JSON, keys sorted) and of each
    array's shape, dtype and bytes (numpy arrays or CPU tensors; None skipped)."""
    from ._utils import array_digest

    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for arr in arrays:
        if arr is None:
            continue
        if hasattr(arr, "digest"):  # activations read from disk when indexed: named, not read
            h.update(arr.digest().encode())
            continue
        if hasattr(arr, "detach"):  # a torch tensor
            arr = arr.detach().cpu().numpy()
        h.update(array_digest(np.asarray(arr)).encode())
    return Path(run_dir) / f"{stage}-{h.hexdigest()}"


def checkpoint_callback(ckpt_dir: Path):
    """A ModelCheckpoint writing ``ckpt_dir/last.ckpt`` at the end of every training epoch (one file)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, save_on_train_epoch_end=True,
                           enable_version_counter=False)


def last_ckpt(ckpt_dir: Path) -> Path | None:
    """``ckpt_dir/last.ckpt`` when it is readable (the ``ckpt_path`` to resume from), else None."""
    path = ckpt_dir / "last.ckpt"
    return path if read_ckpt(path) is not None else None


def read_done(module, ckpt_dir: Path) -> bool:
    """Load a finished stage's ``done.ckpt`` into ``module`` (weights, then its own state); False when absent."""
    done = read_ckpt(ckpt_dir / "done.ckpt")
    if done is None:
        return False
    module.load_state_dict(done["state_dict"])
    module.on_load_checkpoint(done)
    return True


def save_done(trainer, ckpt_dir: Path) -> None:
    """Mark the stage finished: ``done.ckpt`` (weights + module state, no optimizer), via a temp file."""
    tmp = ckpt_dir / ".done.ckpt.tmp"
    trainer.save_checkpoint(tmp, weights_only=True)  # every process calls it; the first one writes
    if trainer.is_global_zero:
        os.replace(tmp, ckpt_dir / "done.ckpt")
