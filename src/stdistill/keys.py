"""The AnnData keys stdistill writes, in one table: :class:`Key` (see :mod:`stdistill._keys`).

>>> from stdistill.keys import Key
>>> Key.obs.niche_pred, Key.obsm.features("uni"), Key.obsp.connectivities()
('niche_pred', 'X_uni', 'spatial_connectivities')
"""

from ._keys import Key
from ._keys import __doc__ as _table

__doc__ = f"{__doc__}\n{_table}"
__all__ = ["Key"]
