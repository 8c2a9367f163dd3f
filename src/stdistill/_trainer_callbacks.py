"""Lightning callbacks of :func:`stdistill._lightning.make_trainer` (module level, so a spawned
process can rebuild them by import path). Imported lazily: importing it imports Lightning."""

from __future__ import annotations

import contextlib
import os

import torch
from lightning.pytorch.callbacks import Callback

_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


class ScopedDeterminism(Callback):
    """Deterministic torch algorithms (and no cuDNN autotuning) while a Trainer runs, the caller's
    settings restored at teardown, so fitting leaves no process-wide trace."""

    def __init__(self) -> None:
        self._saved: dict | None = None

    @staticmethod
    def state() -> dict:
        return {"algorithms": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "cublas": os.environ.get(_CUBLAS)}

    @staticmethod
    def restore(state: dict) -> None:
        torch.use_deterministic_algorithms(state["algorithms"], warn_only=state["warn_only"])
        torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
        if state["cublas"] is None:
            os.environ.pop(_CUBLAS, None)
        else:
            os.environ[_CUBLAS] = state["cublas"]

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._saved = self.state()
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        os.environ.setdefault(_CUBLAS, ":4096:8")  # what Lightning sets for deterministic cuBLAS

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._saved is not None:
            self.restore(self._saved)
            self._saved = None


class EpochBar(Callback):
    """One rich bar over training epochs (done/most, elapsed, ETA) on stderr, rank 0 only."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._stack: contextlib.ExitStack | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from ._utils import progress_display

        self._stack = contextlib.ExitStack()
        self._bar = self._stack.enter_context(progress_display())
        self._task = self._bar.add_task(self.description, total=max(trainer.max_epochs or 1, 1),
                                        completed=trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._stack is not None:
            self._bar.advance(self._task)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
