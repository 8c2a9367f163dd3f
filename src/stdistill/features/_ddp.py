"""The Lightning side of multi-process extraction (``Trainer.predict``; see :mod:`.distributed`).

Patches are sharded across ranks by Lightning's distributed sampler (no padding, no
duplicates for prediction); every rank writes its (index, features) shard next to the cache;
rank 0 gathers the shards into the per-section cache entries; then every rank (and, for
``ddp_spawn``, the launching process) reads the features back from the cache. With several
nodes the cache folder must be on a shared file system.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lightning as L
import numpy as np

from .._errors import StdistillError
from .._utils import atomic_path
from ._precision import autocast
from .cache import FeatureCache, entry_key


class _EncodePatches(L.LightningModule):
    """``predict_step``: a batch of uint8 patches -> (indices, float32 features) on the CPU."""

    def __init__(self, encoder, precision: str):
        super().__init__()
        self.encoder = encoder
        self.precision_name = precision

    def predict_step(self, batch, batch_idx):
        x, idx = batch
        with autocast(self.device, self.precision_name):
            f = self.encoder(x)
        return idx.detach().cpu(), f.float().detach().cpu()


class _GatherToCache(L.Callback):
    """Each rank saves its shard; rank 0 assembles the sections and writes the cache entries."""

    def __init__(self, shard_dir: str, cache: FeatureCache, encoder_name: str, todo: list[dict], dim: int):
        self.shard_dir, self.cache, self.encoder_name, self.todo, self.dim = shard_dir, cache, encoder_name, todo, dim
        self.idx: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        idx, f = outputs
        self.idx.append(idx.numpy().astype(np.int64))
        self.feats.append(f.numpy().astype(np.float32))

    def on_predict_epoch_end(self, trainer, pl_module):
        rank, world = trainer.global_rank, trainer.world_size
        shard = Path(self.shard_dir) / f"rank{rank}.npz"
        idx = np.concatenate(self.idx) if self.idx else np.zeros(0, np.int64)
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, self.dim), np.float32)
        with atomic_path(shard) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, idx=idx, feats=feats)
        trainer.strategy.barrier("stdistill-shards-written")
        error = None
        if rank == 0:
            try:
                _assemble(Path(self.shard_dir), world, self.cache, self.encoder_name, self.todo, self.dim)
            except BaseException as e:  # noqa: BLE001 - re-raised after the barrier
                error = e
        trainer.strategy.barrier("stdistill-cache-written")
        if error is not None:
            raise error


def _assemble(shard_dir: Path, world: int, cache: FeatureCache, encoder_name: str, todo: list[dict], dim: int) -> None:
    """Gather the ranks' shards into per-section cache entries."""
    got: dict[int, np.ndarray] = {}
    for r in range(world):
        p = shard_dir / f"rank{r}.npz"
        if not p.is_file():
            raise StdistillError(f"rank {r} wrote no shard", p)
        with np.load(p) as z:
            for i, f in zip(z["idx"], z["feats"]):
                got[int(i)] = f
    for t in todo:
        missing = [int(r) for r in t["rows"] if int(r) not in got]
        if missing:
            raise StdistillError(f"section {t['section']!r}: {len(missing)} patches were computed by no rank")
        feats = np.stack([got[int(r)] for r in t["rows"]]).astype(np.float32).reshape(len(t["rows"]), dim)
        cache.put(encoder_name, t["key"], feats, section=t["section"], key_parts=t["parts"])


def predict_distributed(ds, rows_todo, todo, enc, feats, *, cache, precision, device, batch_size, num_workers,
                        strategy, devices, num_nodes=1) -> None:
    """Fill ``feats[rows_todo]`` through ``Trainer.predict`` on ``devices`` ranks, via the cache."""
    from .._lightning import make_trainer, quiet

    if devices < 1:
        raise StdistillError(f"devices must be >= 1, got {devices}")
    tmp_root = None
    if cache is None:  # the cache is the gathering point: use a private one (single node only)
        tmp_root = tempfile.mkdtemp(prefix="stdistill-features-")
        cache = FeatureCache(tmp_root)
    run_id = entry_key(keys=sorted(t["key"] for t in todo), devices=devices, nodes=num_nodes)
    shard_dir = cache.root / ".shards" / run_id
    shard_dir.mkdir(parents=True, exist_ok=True)
    accelerator = "cpu" if str(device) == "cpu" else ("gpu" if str(device).startswith("cuda") else "auto")
    trainer = make_trainer(
        max_epochs=1, accelerator=accelerator, devices=devices, strategy=strategy, precision="32-true",
        monitor=None, deterministic=False, num_nodes=num_nodes, use_distributed_sampler=True,
        callbacks=[_GatherToCache(str(shard_dir), cache, enc.spec.name, todo, enc.spec.dim)],
    )
    loader = ds.loader(batch_size=batch_size, num_workers=num_workers, indices=rows_todo.tolist())
    was_training = enc.training
    try:
        # Lightning places the module on each rank's device; spawned workers get a CPU copy
        with quiet():
            trainer.predict(_EncodePatches(enc.eval().cpu(), precision), dataloaders=loader, return_predictions=False)
        if trainer.global_rank == 0:
            shutil.rmtree(shard_dir, ignore_errors=True)
        for t in todo:
            got = cache.get(enc.spec.name, t["key"], n=len(t["rows"]), dim=enc.spec.dim)
            if got is None:
                raise StdistillError(f"section {t['section']!r}: the ranks' features did not reach the cache", cache.root)
            feats[t["rows"]] = got
    finally:
        enc.train(was_training)
        if tmp_root is not None and trainer.global_rank == 0:
            shutil.rmtree(tmp_root, ignore_errors=True)
