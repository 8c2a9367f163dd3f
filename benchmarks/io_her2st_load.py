"""Time reading all 36 HER2ST sections: cold (counts parsed from the TSVs) and warm (parsed-counts cache).

Usage: STDISTILL_DATA=../shared/data python benchmarks/io_her2st_load.py [her2st root]
Uses a fresh temporary cache, so the user's cache is neither used nor changed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as cache:
        os.environ["STDISTILL_CACHE"] = cache
        from stdistill.datasets import her2st

        for label in ("cold (parse TSVs)", "warm (parsed cache)"):
            t = time.perf_counter()
            a = her2st(root)
            dt = time.perf_counter() - t
            print(f"{label}: {dt:.1f} s for {a.n_obs} spots x {a.n_vars} genes, {a.obs['section'].nunique()} sections")


if __name__ == "__main__":
    main()
