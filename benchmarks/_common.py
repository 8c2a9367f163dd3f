"""What every script in ``benchmarks/`` shares: where the data are, ``--smoke``, the results file.

Import it from a script run as ``python benchmarks/<name>.py`` (the script's folder is first on
``sys.path``)::

    import _common

    ap = argparse.ArgumentParser(...)
    _common.add_args(ap, out="results/<name>")     # --smoke, --results, --out
    args = ap.parse_args()
    res = _common.Results(args, seeds=[0, 1, 2], precision="fp32")
    root = _common.dataset("her2st", args.root)     # one line and exit 2 when absent
    ...
    res.table("main", df, digits={"ARI": 3})       # the table exactly as printed
    sys.exit(res.finish())                         # writes the results file; 1 if a row errored

Data root: ``$STDISTILL_DATA`` (a folder holding ``her2st/``, ``mob-st-stahl2016-spacest/``,
...), else ``../shared/data`` beside the repository.

Results file (JSON): ``benchmark``, ``command`` (argv as a shell line, paths relative to the
repository), ``commit`` and ``dirty``, ``seeds``, ``precision``, ``machine`` (CPU model and cores,
torch and Python versions, GPU or null), ``started`` (UTC), ``run_time_s``, ``smoke``, ``args``
and ``tables`` (``{name: {"columns": [...], "rows": [[...], ...], "digits": {column: n}}}``,
numbers as numbers, NaN as null). A real run writes ``docs/results/<stem>[-<variant>].json``
(``--results`` elsewhere); a ``--smoke`` run writes only under ``--out``. ``python docs/tables.py``
turns these files into the tables of the docs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "results"
#: a table column whose non-empty cells mark rows that failed
ERROR = "error"


# ================================================================================ data
def data_root() -> Path:
    """``$STDISTILL_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("STDISTILL_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


def missing(what: str, path: Path) -> SystemExit:
    """Print one line naming the absent data and return the ``SystemExit(2)`` to raise."""
    print(f"error: {what} not found at {_rel(path)}: set STDISTILL_DATA to a folder holding it "
          "(or pass --root)", file=sys.stderr)
    return SystemExit(2)


def dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of dataset ``name`` (``"her2st"``, ...): ``root`` when given, else under
    :func:`data_root`. Exits 2 with one line when it is absent."""
    p = Path(root).expanduser() if root else data_root() / name
    if not p.exists():
        raise missing(f"{name} data", p)
    return p


def has_dataset(name: str) -> bool:
    return (data_root() / name).exists()


#: a --smoke run's slice of HER2ST: one imaged section of each imaged patient (A at ~3.2 um/px, B, C)
#: and B1 (no image; pathologist labels, which map niches to labels for the macro-F1 on A1)
SMOKE_SECTIONS = ("A1", "B1", "B4", "C2")
SMOKE_SPOTS = 30


def her2st(root: str | os.PathLike | None = None, smoke: bool = False, images_only: bool = False):
    """HER2ST (``stdistill.datasets.her2st``) from :func:`dataset`; with ``smoke``, only the
    :data:`SMOKE_SPOTS` central spots of each of :data:`SMOKE_SECTIONS` (every patient and code
    path of a leave-one-patient-out benchmark, a hundredth of the patches)."""
    import stdistill as sd

    path = dataset("her2st", root)
    if not smoke:
        return sd.datasets.her2st(root=path, images_only=images_only)
    return central_spots(sd.datasets.her2st(root=path, sections=list(SMOKE_SECTIONS), images_only=images_only), SMOKE_SPOTS)


def simulated_small(seed: int = 0):
    """A --smoke run's simulated data: 3 sections of 3 patients, about 30 spots each (the same in
    every script, so a shared feature cache computes its patches once)."""
    import stdistill as sd

    return sd.datasets.simulated(3, 3, seed=seed, spots_per_section=30)


def central_spots(adata, n: int):
    """The ``n`` spots of each section nearest its centre (a contiguous piece of tissue), as a copy."""
    import numpy as np

    import stdistill as sd

    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    sec = adata.obs["section"].astype(str).to_numpy()
    keep = np.zeros(adata.n_obs, bool)
    for s in sd.io.sections(adata):
        m = np.flatnonzero(sec == s)
        d = ((xy[m] - xy[m].mean(0)) ** 2).sum(1)
        keep[m[np.argsort(d, kind="stable")[:n]]] = True
    return adata[keep].copy()


# ================================================================================ arguments
def add_args(ap: argparse.ArgumentParser, out: str | None = None, root: str | None = None) -> None:
    """``--smoke`` and ``--results``; ``--out`` (default ``out``) unless the script has one;
    ``--root`` for dataset ``root`` (default: under :func:`data_root`)."""
    ap.add_argument("--smoke", action="store_true",
                    help="the same code path on the smallest input that reaches every case and table row (seconds); "
                         "its results file goes under --out only")
    ap.add_argument("--results", type=Path, default=None,
                    help="results file (default: docs/results/<script>.json; with --smoke: <out>/<script>.json)")
    if not any("--out" in a.option_strings for a in ap._actions):
        ap.add_argument("--out", type=Path, default=Path(out) if out else None,
                        help="folder for this run's other outputs" + ("" if out else " (--smoke: its results file)"))
    if root is not None:
        ap.add_argument("--root", default=None, help=f"the {root} folder (default: $STDISTILL_DATA/{root}, "
                                                     f"else ../shared/data/{root})")


def smoke(args: argparse.Namespace, **small) -> bool:
    """With ``--smoke``: set each of ``small`` on ``args`` (the smallest settings that still reach
    every case and table row) and keep torch to one thread; returns ``args.smoke``."""
    if getattr(args, "smoke", False):
        for k, v in small.items():
            setattr(args, k, v)
        if "torch" in sys.modules or _importable("torch"):
            import torch

            torch.set_num_threads(1)
    return bool(getattr(args, "smoke", False))


# ================================================================================ results
def _rel(p) -> str:
    """``p`` relative to the repository when it is an absolute path (else unchanged)."""
    s = str(p)
    if not os.path.isabs(s):
        return s
    try:
        return os.path.relpath(s, REPO)
    except ValueError:
        return s


def _arg(tok: str) -> str:
    if tok.startswith("--") and "=" in tok:
        k, v = tok.split("=", 1)
        return f"{k}={_rel(v)}"
    return _rel(tok)


def command(argv: list[str] | None = None) -> str:
    """This run as a shell line from the repository root, without absolute paths of this machine."""
    argv = sys.argv if argv is None else argv
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return shlex.join([*env, "python", _rel(Path(argv[0]).resolve()), *map(_arg, argv[1:])])


def _git(*a: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit() -> dict:
    """``{"commit": HEAD or None, "dirty": tracked files changed}``."""
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def machine() -> dict:
    """CPU model and cores, torch / Python versions, GPU name (null on CPU-only machines)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    torch_v = gpu = threads = None
    if "torch" in sys.modules or _importable("torch"):
        import torch

        torch_v, threads = torch.__version__, torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch_v, "torch_threads": threads,
            "python": platform.python_version(), "gpu": gpu}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def jsonable(x):
    """``x`` with NumPy / pandas scalars and arrays as plain JSON types, NaN and inf as None, paths relative."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return _rel(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    try:  # pandas NA / NaT
        import pandas as pd

        if pd.isna(x):
            return None
    except (ImportError, TypeError, ValueError):
        pass
    return str(x)


_NUMBER = re.compile(r"-?\d+(\.(\d+))?")


def _number(cell: str) -> tuple[int | float, int] | None:
    """(value, decimals) of a plain number cell ("12", "-0.125"); None for anything else."""
    m = _NUMBER.fullmatch(cell)
    if m is None:
        return None
    return (float(cell), len(m.group(2))) if m.group(1) else (int(cell), 0)


def parse_markdown(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``text``: (header cells, rows of cells), separator lines dropped."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            continue
        if block:
            rows = [r for r in block[1:] if not all(set(c) <= set("-: ") and c for c in r)]
            tables.append((block[0], [r + [""] * (len(block[0]) - len(r)) for r in rows]))
            block = []
    return tables


class Results:
    """The results file of one benchmark run (see the module docstring).

    ``variant``: a suffix of the default file name (``<stem>-<variant>.json``) for scripts whose
    runs differ in kind (e.g. a dataset).
    """

    def __init__(self, args: argparse.Namespace, seeds=(), precision: str | None = None, variant: str | None = None):
        self.args = args
        self.stem = Path(sys.argv[0]).stem
        self.t0 = time.perf_counter()
        self.meta = {"benchmark": Path(sys.argv[0]).name, "command": command(), **commit(), "seeds": list(seeds),
                     "precision": precision, "machine": None,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_time_s": None,
                     "smoke": bool(getattr(args, "smoke", False)), "variant": variant,
                     "args": jsonable({k: _rel(v) if isinstance(v, str) else v  # paths given as strings too
                                       for k, v in vars(args).items() if k not in ("results",)})}
        self.tables: dict[str, dict] = {}

    @property
    def path(self) -> Path:
        name = self.stem + (f"-{self.meta['variant']}" if self.meta["variant"] else "") + ".json"
        if getattr(self.args, "results", None):
            return Path(self.args.results)
        if self.meta["smoke"]:
            out = getattr(self.args, "out", None)
            if not out:
                raise SystemExit("error: --smoke needs --out (its results file is written there, never into docs/results)")
            return Path(out) / name
        return RESULTS_DIR / name

    def table(self, name: str, data, columns: list[str] | None = None, digits: dict[str, int] | None = None) -> dict:
        """Record a table: a DataFrame (its index is kept as leading columns when named) or a list of
        rows (dicts, or lists with ``columns``). ``digits``: decimals per column as printed."""
        if hasattr(data, "to_dict"):  # a DataFrame
            df = data.reset_index() if any(n is not None for n in data.index.names) else data
            columns, rows = [str(c) for c in df.columns], df.to_numpy(dtype=object).tolist()
        else:
            data = list(data)
            if data and isinstance(data[0], dict):
                columns = columns or list(dict.fromkeys(k for r in data for k in r))
                rows = [[r.get(c) for c in columns] for r in data]
            else:
                rows = [list(r) for r in data]
        self.tables[name] = {"columns": list(columns or []), "rows": jsonable(rows), "digits": dict(digits or {})}
        return self.tables[name]

    def markdown(self, text: str, names: list[str]) -> None:
        """Record the markdown tables printed in ``text`` as they are, in order, as ``names``
        (tables past the names: ``<last name>_<i>``): a column whose cells are all plain numbers
        with the same number of decimals is stored as numbers (``digits`` = those decimals), any
        other column as text."""
        for i, (cols, rows) in enumerate(parse_markdown(text)):
            name = names[i] if i < len(names) else f"{names[-1]}_{i - len(names) + 2}"
            digits = {}
            for j, c in enumerate(cols):
                nums = [_number(r[j]) for r in rows if r[j] != ""]
                if nums and all(n is not None for n in nums) and len({d for _, d in nums}) == 1:
                    d = nums[0][1]
                    for r in rows:
                        r[j] = _number(r[j])[0] if r[j] != "" else None
                    if d:
                        digits[c] = d
            self.table(name, rows, cols, digits)

    def errors(self) -> list[str]:
        """One line per row with a non-empty ``error`` cell."""
        out = []
        for name, t in self.tables.items():
            if ERROR in t["columns"]:
                j = t["columns"].index(ERROR)
                out += [f"{name} row {i}: {r[j]}" for i, r in enumerate(t["rows"]) if r[j] not in (None, "", False)]
        return out

    def write(self, **extra) -> Path:
        """Write the file atomically (``extra``: more top-level fields); returns its path."""
        from stdistill._utils import atomic_path

        self.meta.update(run_time_s=round(time.perf_counter() - self.t0, 1), machine=machine(), **jsonable(extra))
        path = self.path
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**self.meta, "tables": self.tables}, indent=1, allow_nan=False) + "\n")
        return path

    def finish(self, **extra) -> int:
        """Write the file, say where, and return the exit status: 1 when a row errored, else 0."""
        path = self.write(**extra)
        print(f"results: {_rel(path)}", flush=True)
        errs = self.errors()
        for e in errs:
            print(f"error row: {e}", file=sys.stderr)
        return 1 if errs else 0
