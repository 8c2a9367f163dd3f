"""docs/design.md's folder table lists exactly the folders of src/stdistill, and the modules it
names beside them exist, so the map a newcomer reads first cannot fall behind the tree."""

from __future__ import annotations

import re

from conftest import REPO

PAGE = REPO / "docs" / "design.md"
SRC = REPO / "src" / "stdistill"


def _table_folders(text: str) -> set[str]:
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)/` \|", section, flags=re.M))


def test_folder_table_is_the_tree():
    tree = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")) and any(p.iterdir())}
    listed = _table_folders(PAGE.read_text())
    assert listed == tree, f"missing from docs/design.md: {sorted(tree - listed)}; no longer in the tree: {sorted(listed - tree)}"


def test_named_modules_exist():
    section = PAGE.read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    beside = section.split("Modules beside the folders", 1)[1]
    names = set(re.findall(r"`(_?[a-z_]+)(?:\.py)?`", beside)) - {"genesets"}
    missing = sorted(n for n in names if not (SRC / f"{n}.py").is_file())
    assert not missing, f"docs/design.md names modules that do not exist: {missing}"
    private = {p.stem for p in SRC.glob("_*.py")} - {"__init__"}
    unnamed = sorted(private - names)
    assert not unnamed, f"docs/design.md does not mention these shared modules: {unnamed}"
