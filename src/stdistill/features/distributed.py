"""Multi-process / multi-GPU / multi-node feature extraction through Lightning ``Trainer.predict``.

Patches are sharded across ranks by Lightning's distributed sampler (no padding, no
duplicates for prediction); every rank writes its (index, features) shard next to the cache;
rank 0 gathers the shards into the per-section cache entries; then every rank (and, for
``ddp_spawn``, the launching process) reads the features back from the cache. With several
nodes the cache folder must be on a shared file system.
"""

from __future__ import annotations

from typing import Any

import anndata as ad

from ._ddp import predict_distributed
from .extract import DEFAULT_ENCODER, extract


def extract_distributed(
    adata: ad.AnnData,
    encoder: Any = DEFAULT_ENCODER,
    *,
    devices: int = 2,
    strategy: str = "ddp",
    num_nodes: int = 1,
    **kwargs,
) -> ad.AnnData | None:
    """:func:`stdistill.features.extract` on ``devices`` processes per node (Lightning DDP); writes
    in place and returns None (``copy=True``: a new AnnData), as ``extract`` does.

    ``strategy="ddp"`` re-runs the calling script once per device (or use ``torchrun``; put the
    call under ``if __name__ == "__main__":``); ``"ddp_spawn"`` spawns the workers from this
    process (works in notebooks and tests). On CPUs each process is one rank (gloo backend).
    The features equal those of a single-process run.
    """
    return extract(adata, encoder, strategy=strategy, devices=devices, num_nodes=num_nodes, **kwargs)


__all__ = ["extract_distributed", "predict_distributed"]
