"""Progress displays: rich bars with ETA on long steps, off with --quiet or STDISTILL_PROGRESS=0."""

import os

from typer.testing import CliRunner

from stdistill._lightning import make_trainer
from stdistill._utils import PROGRESS_ENV, progress, progress_display, progress_enabled
from stdistill.cli import app


def test_progress_switches(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled() and not progress_enabled(quiet=True)
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    with progress_display() as p:
        t = p.add_task("step", total=2)
        p.advance(t)
    bars = [c for c in make_trainer(max_epochs=2, epoch_bar="epochs").callbacks if type(c).__name__ == "EpochBar"]
    assert len(bars) == 1
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_enabled()
    assert list(progress(range(3))) == [0, 1, 2]
    assert not [c for c in make_trainer(max_epochs=2, epoch_bar="epochs").callbacks if type(c).__name__ == "EpochBar"]


def test_quiet_flag_is_scoped_to_the_command(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    r = CliRunner().invoke(app, ["--quiet", "encoders", "list"])
    assert r.exit_code == 0, r.output
    assert PROGRESS_ENV not in os.environ  # restored when the command ends


def test_epoch_bar_is_drawn_through_a_fit(monkeypatch):
    """The epoch bar is drawn (its description and the epochs done), on the console progress_display
    opens, and only while progress is on."""
    import io

    import lightning as L
    import rich.console
    import torch

    out = io.StringIO()
    real = rich.console.Console
    monkeypatch.setattr(rich.console, "Console", lambda **kw: real(file=out, force_terminal=True, width=100))

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return ((self.w - batch[0]) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4)), batch_size=2)

    def fit(progress: str) -> str:
        monkeypatch.setenv(PROGRESS_ENV, progress)
        out.seek(0)
        out.truncate()
        t = make_trainer(max_epochs=3, monitor=None, accelerator="cpu", devices=1, enable_progress_bar=False,
                         epoch_bar="tiny epochs")
        t.fit(Tiny(), data)
        assert t.current_epoch == 3
        return out.getvalue()

    drawn = fit("1")
    assert "tiny epochs" in drawn and "3/3" in drawn  # the bar's last frame: every epoch done
    assert fit("0") == ""
