"""The docs' result tables agree with the results files under docs/results (docs/tables.py)."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "docs" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tables = _tables()


def _with_blocks() -> list[Path]:
    return [d for d in tables.docs() if tables.BLOCK.search(d.read_text())]


def test_every_doc_table_matches_its_results_file():
    assert _with_blocks(), "no doc has a '<!-- results: file/table -->' block: nothing would be checked"
    problems = [p for d in tables.docs() for p in tables.process(d, check=True)]
    assert not problems, "\n".join(problems) + "\n(regenerate with: python docs/tables.py)"


def _edit_first_number(text: str) -> tuple[str, str]:
    """``text`` with one digit of the first data cell holding a number changed by hand; and that cell."""
    m = tables.BLOCK.search(text)
    rows = [ln for ln in m.group(4).splitlines() if ln.startswith("|")][2:]
    for ln in rows:
        for c in tables._cells(ln):
            if re.search(r"\d", c):
                i = re.search(r"\d", c).start()
                edited = c[:i] + str((int(c[i]) + 1) % 10) + c[i + 1:]
                new_ln = ln.replace(f" {c} ", f" {edited} ", 1)
                start = m.start(4) + m.group(4).index(ln)
                return text[:start] + new_ln + text[start + len(ln):], c
    raise AssertionError("no number in the first generated table")


@pytest.mark.parametrize("doc", _with_blocks(), ids=lambda p: p.name)
def test_a_number_edited_by_hand_fails_the_check(tmp_path, doc):
    copy = tmp_path / doc.name
    shutil.copy(doc, copy)
    assert tables.process(copy, check=True) == []  # the copy as is passes
    text, cell = _edit_first_number(copy.read_text())
    copy.write_text(text)
    problems = tables.process(copy, check=True)
    assert len(problems) == 1
    stem, name = tables.BLOCK.search(text).group(2, 3)
    assert f"{doc.name}: {stem}/{name}: row " in problems[0] and repr(cell) in problems[0], problems
    assert tables.main(["--check", str(copy)]) == 1


def _results(tmp_path, **over) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    data = {"benchmark": "toy.py", "command": "python benchmarks/toy.py", "commit": "0123456789abcdef", "dirty": False,
            "seeds": [0], "precision": "fp32", "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "python": "3", "gpu": None},
            "run_time_s": 3.0, "smoke": False,
            "tables": {"main": {"columns": ["method", "ARI", "n"], "rows": [["a", 0.12345, 3], ["b", None, 4]],
                                "digits": {"ARI": 3}}}, **over}
    (d / "toy.json").write_text(json.dumps(data))
    return d


def test_render_and_rewrite(tmp_path):
    res = _results(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- results: toy/main -->\nstale\n<!-- /results -->\nafter\n")
    assert "toy/main" in tables.process(doc, check=True, results=res)[0]
    assert tables.process(doc, check=False, results=res) == []
    text = doc.read_text()
    assert "| method | ARI | n |" in text and "| a | 0.123 | 3 |" in text and "| b |  | 4 |" in text
    assert text.startswith("before\n") and text.endswith("<!-- /results -->\nafter\n")
    assert "`python benchmarks/toy.py`" in text and "docs/results/toy.json" in text
    assert tables.process(doc, check=True, results=res) == []


def test_missing_file_table_or_smoke_run_is_named(tmp_path):
    res = _results(tmp_path, smoke=True)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: toy/main -->\n<!-- /results -->\n<!-- results: nope/x -->\n<!-- /results -->\n"
                   "<!-- results: toy/main -->\n")
    problems = tables.process(doc, check=True, results=res)
    assert any("without its" in p for p in problems)
    assert any("toy/main" in p and "--smoke" in p for p in problems)
    assert any("nope/x" in p and "missing" in p for p in problems)
