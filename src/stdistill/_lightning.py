"""The engineering side of training, kept apart from the science (models, losses, steps).

Every recipe builds its LightningModule and calls :func:`make_trainer`; the same recipe runs on
a laptop CPU or on several GPUs by changing ``accelerator``/``devices``/``strategy`` only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def is_global_zero() -> bool:
    """False in a distributed worker other than global rank 0 (after a DDP ``fit``, or under
    ``torchrun`` via ``RANK``): the process that writes files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info logs and its small-data warnings inside the block only (levels and
    warning filters are restored afterwards: no process-wide side effect)."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            warnings.filterwarnings("ignore", ".*val_dataloader.*")
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def make_trainer(
    max_epochs: int = 50,
    *,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    monitor: str | None = "val_loss",
    patience: int = 5,
    enable_progress_bar: bool | None = None,
    epoch_bar: str | None = None,
    deterministic: bool = True,
    **kwargs: Any,
):
    """A quiet, deterministic ``lightning.Trainer`` with early stopping on ``monitor``.

    Deterministic algorithms are switched on for the duration of ``fit``/``validate``/``predict``
    only and the caller's torch settings are restored afterwards (Lightning's constructor would
    set them for the whole process).

    ``precision=None`` chooses ``"bf16-mixed"`` on a GPU and ``"32-true"`` on the CPU.
    ``epoch_bar`` (a description) adds a rich bar over epochs with an ETA on stderr (rank 0 only;
    off with ``STDISTILL_PROGRESS=0``). No checkpoints or logs are written unless asked (``kwargs`` pass through). Run ``fit`` inside
    :func:`quiet` to keep Lightning's info messages and small-data warnings out of the output.
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    if precision is None:
        precision = "bf16-mixed" if (accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()) else "32-true"
    if enable_progress_bar is None:
        enable_progress_bar = os.environ.get("STDISTILL_PROGRESS", "1") != "0"
    from ._trainer_callbacks import EpochBar, ScopedDeterminism

    callbacks = list(kwargs.pop("callbacks", []))
    if epoch_bar:
        from ._utils import progress_enabled

        if progress_enabled():
            callbacks.append(EpochBar(epoch_bar))
    if deterministic:  # on while fitting only: the Trainer's constructor sets it for the whole process
        callbacks.append(ScopedDeterminism())
    if monitor:
        callbacks.append(EarlyStopping(monitor=monitor, patience=patience, mode="min"))
    before = ScopedDeterminism.state()
    with quiet():  # the Trainer's constructor logs the devices it found
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            callbacks=callbacks,
            deterministic=deterministic,
            logger=kwargs.pop("logger", False),
            enable_checkpointing=kwargs.pop("enable_checkpointing", False),
            enable_model_summary=False,
            enable_progress_bar=enable_progress_bar,
            **kwargs,
        )
    ScopedDeterminism.restore(before)  # undo the constructor's process-wide torch flags
    return trainer
