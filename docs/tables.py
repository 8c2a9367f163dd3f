"""Regenerate the docs' result tables from the benchmarks' results files, or check them.

A table in a doc (``docs/*.md``, ``README.md``) sits between two markers that name its results
file (``docs/results/<stem>.json``, written by ``benchmarks/<script>.py``) and table::

    <!-- results: scale/cases -->
    ... generated: the markdown table, then one line with the command, commit, machine ...
    <!-- /results -->

    python docs/tables.py            # rewrite every such block from its results file
    python docs/tables.py --check    # exit 1 naming the doc, table and first differing cell

Only the text between the markers is generated; write the prose around it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BLOCK = re.compile(r"(<!-- results: *([\w.-]+)/([\w .+-]+?) *-->\n)(.*?)(<!-- /results -->)", re.S)
OPEN = re.compile(r"<!-- results:")


class TableError(Exception):
    """A marker whose results file or table is missing or unusable."""


def docs(repo: Path = REPO) -> list[Path]:
    """Every markdown file the check covers: ``docs/**/*.md`` and ``README.md``."""
    return sorted((repo / "docs").rglob("*.md")) + [p for p in [repo / "README.md"] if p.is_file()]


def cell(v, digits: int | None) -> str:
    """One cell as printed: floats with ``digits`` decimals (else shortest), null empty, ``|`` escaped."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and digits is not None:
        return f"{v:.{digits}f}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def load(stem: str, results: Path = RESULTS) -> dict:
    path = results / f"{stem}.json"
    if not path.is_file():
        raise TableError(f"results file {path.relative_to(REPO) if path.is_relative_to(REPO) else path} is missing")
    data = json.loads(path.read_text())
    if data.get("smoke"):
        raise TableError(f"{path.name} is a --smoke run: its numbers are not results")
    return data


def grid(data: dict, name: str) -> list[list[str]]:
    """The table ``name`` of a results file as rows of cell strings (header first)."""
    t = data["tables"].get(name)
    if t is None:
        raise TableError(f"{data['benchmark']} wrote no table {name!r} (it has {sorted(data['tables'])})")
    d = t.get("digits", {})
    cols, rows = t["columns"], t["rows"]
    if "error" in cols and all(r[cols.index("error")] in (None, "") for r in rows):  # no row failed
        j = cols.index("error")
        cols, rows = cols[:j] + cols[j + 1:], [r[:j] + r[j + 1:] for r in rows]
    return [[cell(c, None) for c in cols]] + [[cell(v, d.get(c)) for c, v in zip(cols, r)] for r in rows]


def provenance(data: dict, stem: str) -> str:
    """One line under a table: command, commit, machine, precision, seeds, run time, results file."""
    m = data.get("machine") or {}
    cpu = f"{m.get('cpu')}, {m.get('cores')} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
    head = (data.get("commit") or "unknown")[:10] + (" with local changes" if data.get("dirty") else "")
    took = data.get("run_time_s")
    return (f"Command: `{data['command']}` (commit {head}; {cpu}; torch {m.get('torch')}, Python {m.get('python')}; "
            f"precision {data.get('precision')}; seeds {data.get('seeds')}"
            + (f"; run time {took:.0f} s" if took is not None else "") + f"); results file `docs/results/{stem}.json`.")


def render(stem: str, name: str, results: Path = RESULTS) -> str:
    """The generated text of one block (between its markers)."""
    data = load(stem, results)
    rows = grid(data, name)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines) + "\n\n" + provenance(data, stem) + "\n"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def first_difference(have: str, want: str) -> str:
    """Where the doc's block ``have`` first differs from the generated ``want``, in words."""
    ht = [_cells(x) for x in have.splitlines() if x.startswith("|")]
    wt = [_cells(x) for x in want.splitlines() if x.startswith("|")]
    ht = [r for i, r in enumerate(ht) if i != 1]  # without the |---| line
    wt = [r for i, r in enumerate(wt) if i != 1]
    header = wt[0] if wt else []
    for i, (h, w) in enumerate(zip(ht, wt)):
        for j, (a, b) in enumerate(zip(h, w)):
            if a != b:
                where = "header" if i == 0 else f"row {i} ({w[0]})"
                col = header[j] if j < len(header) else f"#{j}"
                return f"{where}, column {col!r}: the doc has {a!r}, the results file {b!r}"
        if len(h) != len(w):
            return f"row {i}: the doc has {len(h)} cells, the results file {len(w)}"
    if len(ht) != len(wt):
        return f"the doc has {len(ht) - 1} rows, the results file {len(wt) - 1}"
    for a, b in zip(have.splitlines(), want.splitlines()):
        if a != b:
            return f"the doc has {a!r}, the results file gives {b!r}"
    return "the text around the table differs"


def process(doc: Path, check: bool, results: Path = RESULTS) -> list[str]:
    """Regenerate (or with ``check`` compare) every block of ``doc``; returns the problems found."""
    text = doc.read_text()
    name = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc
    problems = []
    if len(OPEN.findall(text)) != len(BLOCK.findall(text)):
        problems.append(f"{name}: a '<!-- results: file/table -->' marker without its '<!-- /results -->'")

    def sub(m: re.Match) -> str:
        stem, table, have = m.group(2), m.group(3), m.group(4)
        try:
            want = render(stem, table, results)
        except TableError as e:
            problems.append(f"{name}: {stem}/{table}: {e}")
            return m.group(0)
        if check and have != want:
            problems.append(f"{name}: {stem}/{table}: {first_difference(have, want)}")
        return m.group(1) + want + m.group(5)

    new = BLOCK.sub(sub, text)
    if not check and new != text:
        tmp = doc.with_name(f".{doc.name}.tmp")
        tmp.write_text(new)
        os.replace(tmp, doc)
        print(f"updated {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a doc disagrees with its file")
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: docs/**/*.md and README.md)")
    args = ap.parse_args(argv)
    problems = [p for f in (args.files or docs()) for p in process(f.resolve(), args.check)]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
