"""Tile patches read and decoded in worker processes, streamed chunk by chunk into an encoder.

:class:`TilePatches` is a :class:`~stdistill.pp.PatchDataset` over a slide's tiles that reads
through one reader per process (a DataLoader worker opens the slide file again: file handles are
never shared between processes) and flags a tile it cannot decode instead of raising. One
DataLoader serves every unfinished chunk, so workers start once per slide; its batches never
straddle two chunks, so a resumed run encodes exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io._pixels import UnreadableRegion
from ..pp.patches import PatchDataset


class TilePatches(PatchDataset):
    """Patches of ``tiles`` (one slide, from :func:`stdistill.pp.tile`) at each view's
    ``(size_um, px, transform)``, read through ``reader``.

    Item ``i`` is ``(views, i, ok)``: a list of uint8 tensors (3, px, px), one per view, and
    whether the tile's region could be decoded (when not, the tensors are zeros).
    """

    def __init__(self, tiles, reader, views: list[tuple[float, int, object]]):
        from ..io._section import SECTION_KEY, SPATIAL_KEY, microns_per_pixel

        self.views = views
        self.size_um, self.px, self.transform = float(views[0][0]), int(views[0][1]), None
        self._sec_of = tiles.obs[SECTION_KEY].astype(str).to_numpy()
        self._xy = np.asarray(tiles.obsm[SPATIAL_KEY], dtype=np.float64)
        self._mpp = {s: microns_per_pixel(tiles, s) for s in set(self._sec_of)}
        self.padded = np.zeros(len(self._sec_of), bool)  # whole tiles lie inside the image
        self._main = reader

    def _reader(self, s: str):
        return self._main

    def reopen(self) -> None:
        """Give this (worker) process its own reader: a whole-slide reader opens its file again;
        in-memory and decoded images are shared as they are."""
        again = getattr(self._main, "reopened", None)
        if again is not None:
            self._main = again()

    def read_view(self, i: int, size_um: float, px: int) -> np.ndarray:
        self.size_um, self.px = float(size_um), int(px)
        return self.read(i)

    def __getitem__(self, i: int):
        out = []
        try:
            for size_um, px, transform in self.views:
                x = torch.from_numpy(np.ascontiguousarray(self.read_view(i, size_um, px).transpose(2, 0, 1)))
                out.append(x if transform is None else transform(x, i))
            return out, i, True
        except UnreadableRegion:
            return [torch.zeros((3, px, px), dtype=torch.uint8) for _, px, _ in self.views], i, False


def _worker_init(_):
    info = torch.utils.data.get_worker_info()
    info.dataset.reopen()


def chunk_batches(chunks: list[tuple[int, int]], todo: list[int], batch_size: int) -> list[list[int]]:
    """Tile indices of chunks ``todo`` in batches of at most ``batch_size``, never across chunks."""
    return [list(range(s, min(s + batch_size, b))) for i in todo for a, b in [chunks[i]] for s in range(a, b, batch_size)]


def tile_loader(ds: TilePatches, chunks, todo, *, batch_size: int, num_workers: int):
    """Batches ``(views, idx, ok)`` of the chunks ``todo`` in order; ``num_workers`` processes
    read and decode them (0: a background thread in this process)."""
    from torch.utils.data import DataLoader

    from ..features.extract import prefetch

    if num_workers and hasattr(ds._main, "array"):
        ds._main.array  # decode a plain JPEG/PNG once here: the workers share it instead of decoding their own
    loader = DataLoader(ds, batch_sampler=chunk_batches(chunks, todo, batch_size), num_workers=num_workers,
                        worker_init_fn=_worker_init if num_workers else None, persistent_workers=False,
                        prefetch_factor=4 if num_workers else None)
    return prefetch(loader, depth=4) if num_workers == 0 else iter(loader)


def _fold_pairs(net) -> list[tuple[object, object]]:
    """(Conv2d, BatchNorm2d) pairs of ``net`` where the norm reads the convolution's output,
    found by tracing one small forward pass (module order and tensor identity)."""
    import torch.nn as nn

    seen, keep, hooks = [], [], []

    def hook(m, inp, out):
        keep.append((inp, out))  # hold the tensors: their ids stay unique during the trace
        seen.append((m, id(inp[0]), id(out)))

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
    conv_of = {o: m for m, _, o in seen if isinstance(m, nn.Conv2d)}
    return [(conv_of[i], m) for m, i, _ in seen if isinstance(m, nn.BatchNorm2d) and i in conv_of]


def _fold(conv, bn) -> None:
    """Scale ``conv`` by ``bn``'s running statistics and make ``bn`` pass through (keeping the
    activation of timm's BatchNormAct2d)."""
    import torch.nn as nn

    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * s
        conv.weight.mul_(s.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * s + shift)
    after = [getattr(bn, "drop", None), getattr(bn, "act", None)]
    bn.forward = nn.Sequential(*[m for m in after if m is not None]).forward if any(after) else nn.Identity().forward


def inference_encoder(enc):
    """A copy of encoder ``enc`` with eval batch norms folded into the convolutions before them
    (about 1.4x the patches/s of EfficientNet-Lite0 on a CPU). Kept only when its output on a
    random batch matches ``enc``'s (relative difference under 1e-4); else ``enc`` itself."""
    import copy

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()):
        return enc
    enc.eval()
    fast = copy.deepcopy(enc).eval()
    for conv, bn in _fold_pairs(fast):
        _fold(conv, bn)
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = enc(x).float(), fast(x).float()
    ok = bool(torch.isfinite(b).all()) and float((a - b).abs().max()) <= 1e-4 * max(float(a.abs().max()), 1e-6)
    return fast if ok else enc


#: patches per forward pass on a CPU: activations of 8 patches instead of a whole batch (about
#: 400 MiB less peak memory for EfficientNet-Lite0 at 224 px, the same patches/s)
CPU_MICRO_BATCH = 8


def _forward(enc, x: torch.Tensor, device: str) -> torch.Tensor:
    """``enc(x)``, in micro-batches of :data:`CPU_MICRO_BATCH` on a CPU."""
    if torch.device(device).type != "cpu" or len(x) <= CPU_MICRO_BATCH:
        return enc(x.to(device, non_blocking=True))
    return torch.cat([enc(x[i:i + CPU_MICRO_BATCH]) for i in range(0, len(x), CPU_MICRO_BATCH)])


@dataclass
class View:
    """One way of encoding a tile: the patch geometry, an optional patch transform (stain
    normalisation) and the encoder; its features go under ``name`` in the chunk."""

    name: str
    size_um: float
    px: int
    transform: object
    encoder: object
    precision: str = "fp32"


def encode_chunks(ds: TilePatches, views: list[View], chunks, todo: list[int], on_chunk, *, batch_size: int,
                  num_workers: int, device: str) -> None:
    """Encode every tile of the chunks ``todo``; call ``on_chunk(i, {view name: (n, dim) float32,
    "ok": (n,) bool})`` as each chunk completes (features of unreadable tiles are NaN)."""
    from ..features.extract import autocast

    if not todo:
        return
    for v in views:
        v.encoder.eval().to(device)
    cur, buf = None, None
    with torch.inference_mode():
        for xs, idx, ok in tile_loader(ds, chunks, todo, batch_size=batch_size, num_workers=num_workers):
            idx, ok = idx.numpy(), ok.numpy().astype(bool)
            i = next(k for k in todo if chunks[k][0] <= idx[0] < chunks[k][1])
            if i != cur:
                cur, (a, b) = i, chunks[i]
                buf = {v.name: np.full((b - a, v.encoder.spec.dim), np.nan, np.float32) for v in views}
                buf["ok"] = np.zeros(b - a, bool)
            rows = idx - chunks[i][0]
            buf["ok"][rows] = ok
            for v, x in zip(views, xs):
                if ok.any():
                    with autocast(device, v.precision):
                        f = _forward(v.encoder, x[torch.from_numpy(ok)], device)
                    buf[v.name][rows[ok]] = f.float().cpu().numpy()
            if idx[-1] == chunks[i][1] - 1:
                on_chunk(i, buf)
