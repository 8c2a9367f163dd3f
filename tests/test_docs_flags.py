"""Every ``stdistill ...`` command line in README.md and docs/*.md names a real (sub)command, and
every ``--flag`` on it is one of that command's options."""

from __future__ import annotations

import re

import pytest
import typer
from conftest import REPO

from stdistill.cli import app

DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "_build" not in p.parts)]


def _snippets(text: str) -> list[str]:
    """Code in fenced blocks (line by line) and inline code spans that start a stdistill command."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        out += [line] if fenced else re.findall(r"`([^`]+)`", line)
    return [s for s in out if re.search(r"(^|[\s;&|(])stdistill\s+[a-z]", s) and not re.search(r"import\s+stdistill", s)]


def _commands() -> list[tuple[str, list[str]]]:
    """(doc, tokens after 'stdistill') for every command line in the docs; shell pipes/chains cut."""
    found = []
    for doc in DOCS:
        for s in _snippets(doc.read_text()):
            for part in re.split(r"&&|\|\||;|\s\|\s|#", s):
                m = re.search(r"(?:^|\s)stdistill\s+(.*)", part)
                if m:
                    found.append((doc.name, m.group(1).split()))
    return found


def _resolve(tokens: list[str]) -> tuple:
    cmd = typer.main.get_command(app)
    path = []
    for t in tokens:
        if hasattr(cmd, "commands") and t in cmd.commands:
            cmd = cmd.commands[t]
            path.append(t)
        else:
            break
    return cmd, path


def _options(cmd) -> set[str]:
    if hasattr(cmd, "commands"):
        return {"--help"} | set().union(*(_options(c) for c in cmd.commands.values()))
    return {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


COMMANDS = _commands()


def test_docs_mention_stdistill_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("doc, tokens", COMMANDS, ids=[f"{d}:{' '.join(t)[:40]}" for d, t in COMMANDS])
def test_every_documented_flag_exists(doc, tokens):
    cmd, path = _resolve(tokens)
    first = tokens[0] if tokens else ""
    if not path and not first.startswith("-"):
        pytest.fail(f"{doc}: 'stdistill {first}' is not a command")
    flags = {re.split(r"[=\[]", t)[0].rstrip(".,)") for t in tokens if t.startswith("--")}
    missing = sorted(f for f in flags if f not in _options(cmd) and not (not path and f == "--version"))
    assert not missing, f"{doc}: 'stdistill {' '.join(path)}' has no {missing}"
