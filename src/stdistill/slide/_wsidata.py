"""LazySlide's ``wsidata.WSIData`` as a slide to predict on, and as the place predictions go.

Pixels are read through the WSIData's own reader (the one its user chose), so both tools see
the same pixels. Predictions are written the way LazySlide writes features: the tiles as a
shapes element (``shapes[tile_key]``, level-0 boxes with ``tile_id``, and their
``wsidata.TileSpec``) and a table annotating them (``tables[f"{kind}_{tile_key}"]``, linked
through ``library_id``/``tile_id``), so ``zs.pl.tiles(wsi, tile_key=..., feature_key=kind,
color=...)`` draws them.
"""

from __future__ import annotations

import numpy as np

from ..io._image import PAD_VALUE, paste_region
from ..io._pixels import PixelLayout, UnreadableRegion, quiet_readers, reader_failure, to_rgb8

#: shapes element the tiles go to (LazySlide's own tiles, ``"tiles"``, are left alone)
TILE_KEY = "stdistill_tiles"


class WSIDataReader:
    """An :class:`~stdistill.io.ImageReader` over a ``wsidata`` reader (picklable: a copy in a
    worker process opens the file again, as wsidata readers do)."""

    def __init__(self, reader):
        self._r = reader
        self.path = str(reader.file)
        h, w = reader.properties.shape
        self.size = (int(w), int(h))

    def reopened(self) -> WSIDataReader:
        """A copy for another process (the wsidata reader opens its file again there)."""
        import pickle

        return pickle.loads(pickle.dumps(self))

    def _read(self, x, y, w, h):
        with quiet_readers():
            try:
                return to_rgb8(np.asarray(self._r.get_region(x, y, w, h, level=0)), PixelLayout())
            except Exception as e:  # noqa: BLE001
                raise UnreadableRegion(f"the region at x={x}, y={y} ({w}x{h} px) cannot be decoded "
                                       f"({reader_failure(e)})", self.path) from None

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        return paste_region(out, x0, y0, w, h, self.size[0], self.size[1], self._read)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        if max_size >= max(self.size):  # wsidata's readers refuse a thumbnail as large as the image
            return self.read_region(0, 0, *self.size), 1.0
        with quiet_readers():
            arr = to_rgb8(np.asarray(self._r.get_thumbnail(max_size)), PixelLayout())
        return arr, arr.shape[1] / self.size[0]

    def digest(self) -> str:
        from .._utils import file_digest

        return file_digest(self.path)


def _tile_spec(a):
    """The ``wsidata.TileSpec`` of stdistill's tiles: ``px`` pixels of ``size_um / px`` um each,
    read as ``side`` level-0 pixels (the tile's side in the scan)."""
    from wsidata import TileSpec

    sec = a.obs["section"].iloc[0]
    meta = a.uns["spatial"][sec]
    side = float(meta["scalefactors"]["spot_diameter_fullres"])
    px = int(meta["metadata"]["tile_px"])
    down = (round(side) + 1e-6) / px  # TileSpec.base_width = int(px * down): the tile's side read in the scan
    return TileSpec(height=px, width=px, stride_height=px, stride_width=px,
                    mpp=float(meta["metadata"]["tile_size_um"]) / px, ops_level=0, ops_downsample=down,
                    base_downsample=down), side


def write_wsidata(wsi, a, tile_key: str = TILE_KEY) -> list[str]:
    """Write annotated tiles ``a`` (the .h5ad a slide run writes) into ``wsi``: ``shapes[tile_key]``
    and one table per output kind, ``tables[f"{kind}_{tile_key}"]``: ``X`` = niche probabilities
    (var = niche names, ``obs["niche_pred"]`` the niche) or predicted values (var = genes or
    pathways). Returns the table keys written."""
    import anndata as ad
    import pandas as pd
    from wsidata.io import add_table, add_tiles

    spec, side = _tile_spec(a)
    xy = np.asarray(a.obsm["spatial"], dtype=float) - side / 2  # top-left corners, level-0 px
    add_tiles(wsi, tile_key, xy, spec, tissue_ids=np.zeros(a.n_obs, int))
    tile_id = np.arange(a.n_obs)
    base = pd.DataFrame({"tile_id": tile_id, "library_id": pd.Categorical([tile_key] * a.n_obs),
                         "tile_name": a.obs_names.to_numpy()}, index=tile_id.astype(str))
    keys = []
    if "niche_pred_probs" in a.obsm:
        obs = base.assign(niche_pred=a.obs["niche_pred_name"].to_numpy() if "niche_pred_name" in a.obs
                          else a.obs["niche_pred"].to_numpy())
        names = list(a.obs["niche_pred_name"].cat.categories) if "niche_pred_name" in a.obs else None
        t = ad.AnnData(np.asarray(a.obsm["niche_pred_probs"], np.float32), obs=obs,
                       var=pd.DataFrame(index=names) if names else None, uns={"stdistill": dict(a.uns["predict"])})
        keys.append(f"niches_{tile_key}")
        add_table(wsi, keys[-1], t, region=tile_key, region_key="library_id", instance_key="tile_id")
    for key in sorted(k for k in a.obsm if k.endswith("_pred") and isinstance(a.obsm[k], pd.DataFrame)):
        frame = a.obsm[key]
        t = ad.AnnData(frame.to_numpy(np.float32), obs=base.copy(), var=pd.DataFrame(index=frame.columns.astype(str)),
                       uns={"stdistill": dict(a.uns["predict"])})
        keys.append(f"{key[:-5]}_{tile_key}")
        add_table(wsi, keys[-1], t, region=tile_key, region_key="library_id", instance_key="tile_id")
    return keys
