"""README and docs/ speak to users: no internal labels, no project-management words.

Paper names instead of source-paper numbers ("seed 001"), no issue numbers, no work sessions or
waves, no "box" for a computer. A machine fact belongs in a sentence such as "on a 2-core x86
CPU, torch 2.14.1"."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "CONTRIBUTING.md",
         *sorted(p for p in (REPO / "docs").rglob("*.md") if "_build" not in p.parts and "api" not in p.parts)]
BANNED = {
    "seed 00x (a paper's number)": re.compile(r"\bseed (?:paper )?\(?00\d", re.I),
    "issue number": re.compile(r"\bissue\s*#\s*\d+", re.I),
    "session": re.compile(r"\bsessions?\b", re.I),
    "wave": re.compile(r"\bwaves?\b", re.I),
    "box": re.compile(r"\bbox(?:es)?\b", re.I),
}


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: str(p.relative_to(REPO)))
def test_no_internal_words(page):
    hits = [f"{page.relative_to(REPO)}:{i}: {what}: {line.strip()[:120]}"
            for i, line in enumerate(page.read_text().splitlines(), 1)
            for what, rx in BANNED.items() if rx.search(line)]
    assert not hits, "words a user cannot use:\n" + "\n".join(hits)


def test_readme_test_command_is_the_ci_command():
    """README's second command and .ci/run's install-and-test line are the same text."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if "README test command" in line)
    command = ci[marker + 1].strip()
    readme = (REPO / "README.md").read_text()
    assert re.search(r"python3 -m venv \.venv && \. \.venv/bin/activate && " + re.escape(command) + r"\s*$", readme, re.M), \
        f"README.md does not hold .ci/run's test command:\n{command}"


def test_the_word_check_fails_on_a_hit(tmp_path):
    """The patterns catch what they are meant to (so a passing test means something)."""
    bad = ["PEKA (seed 001)", "seed paper 003", "issue #14", "this session", "next wave", "2-core CPU box"]
    good = ["seeds 0, 1, 2", "the issue tracker", "boxplot", "seed 0"]
    assert all(any(rx.search(s) for rx in BANNED.values()) for s in bad)
    assert not any(rx.search(s) for s in good for rx in BANNED.values())
