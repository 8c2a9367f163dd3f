"""Time reading all 36 HER2ST sections: cold (counts parsed from the TSVs) and warm (parsed-counts cache).

    python benchmarks/io_her2st_load.py [--root ../shared/data/her2st]
    python benchmarks/io_her2st_load.py --smoke --out /tmp/smoke       # two sections

Uses a fresh temporary cache, so the user's cache is neither used nor changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _common


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    sections = ["A1", "B4"] if _common.smoke(args) else None
    root = _common.dataset("her2st", args.root)
    results = _common.Results(args)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["STDISTILL_CACHE"] = cache
        from stdistill.datasets import her2st

        for label in ("cold (parse TSVs)", "warm (parsed cache)"):
            t = time.perf_counter()
            a = her2st(root, sections=sections)
            dt = time.perf_counter() - t
            rows.append([label, dt, a.n_obs, a.n_vars, a.obs["section"].nunique()])
            print(f"{label}: {dt:.1f} s for {a.n_obs} spots x {a.n_vars} genes, {rows[-1][-1]} sections")
    results.table("load", rows, ["read", "seconds", "spots", "genes", "sections"], {"seconds": 1})
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
