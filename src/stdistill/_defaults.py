"""Defaults shared by the Python API and the CLI (a light module: the CLI imports it at start-up)."""

from __future__ import annotations

#: Spots in a neighbourhood by default: the niche teacher and student (and ``pp.folds(by="spatial")``)
#: use the radius within which the median spot has this many others (``pp.neighbors.radius_for_neighbors``).
N_NEIGHBORS = 18
