"""Downloads with checksums: public files fetched once into a cache folder, verified, written atomically.

Files are checked against the git blob SHA-1 of the public repository they come from (the
``git hash-object`` algorithm: ``sha1(b"blob <size>\\0" + bytes)``), so a truncated or altered
download is refused and never lands in the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from .._errors import StdistillError
from .._utils import atomic_path

#: Public repository and commit the HER2ST files come from (Andersson et al. 2021).
HER2ST_REPO = "almaan/her2st"
HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
#: Base URL; ``<base>/<path in the repository>`` is one file. Tests point it at a ``file://`` copy.
HER2ST_URL = f"https://raw.githubusercontent.com/{HER2ST_REPO}/{HER2ST_COMMIT}"

#: path in the repository -> (git blob SHA-1, size in bytes), computed from a verified copy.
HER2ST_MANIFEST: dict[str, tuple[str, int]] = {
    "data/ST-cnts/A1.tsv.gz": ("ed06cdd5316bcbf9fabf38f7675cdc99d5ecc12e", 1033376),
    "data/ST-cnts/A2.tsv.gz": ("798793783f58c33f5a4a9a077bc2fd22c5ed1c38", 1340590),
    "data/ST-cnts/A3.tsv.gz": ("696f7cdc75e9b99bbce2d0ab9105afc01d48306f", 1358980),
    "data/ST-cnts/A4.tsv.gz": ("916edc64381a0c65df0c7511240d4aa3d5a87537", 1297246),
    "data/ST-cnts/A5.tsv.gz": ("fd77bda622b3d1c18bd178b4a55e5d65be9eb9ff", 1247949),
    "data/ST-cnts/A6.tsv.gz": ("75988489c3567ed91fd3d7009e7eb5d73456ccd3", 1314417),
    "data/ST-cnts/B1.tsv.gz": ("3334df264f77ecb89c3111f49d37336753462ee7", 657516),
    "data/ST-cnts/B2.tsv.gz": ("a6948f1587ca0c8a55eb434075fe6cd6374e8fd6", 596436),
    "data/ST-cnts/B3.tsv.gz": ("14d4a1303360f2cd78db150d0413b07fb7744fa4", 613993),
    "data/ST-cnts/B4.tsv.gz": ("7df7de55db781f5bdd356a58a9dd354fe53fafa5", 563881),
    "data/ST-cnts/B5.tsv.gz": ("11bced96a7d4dc8d280d8da4098fd3577cf5f011", 688429),
    "data/ST-cnts/B6.tsv.gz": ("8cd6db3760f85dad3275958f1864ad3acf6ce795", 625356),
    "data/ST-cnts/C1.tsv.gz": ("d1ec7da82a26808fc292e10d65b9dd11b225ff31", 752999),
    "data/ST-cnts/C2.tsv.gz": ("4a82b07e53fda5334f3318dd83cbf3024608f7c2", 821408),
    "data/ST-cnts/C3.tsv.gz": ("5d9cdcc0a1cec8e54074e4db185c8e74412d55d9", 847901),
    "data/ST-cnts/C4.tsv.gz": ("7d1b9779d0ea4873d02822b495faba18fa251ce7", 886246),
    "data/ST-cnts/C5.tsv.gz": ("068a62a721f2f6ff95bdf4c41252700776a10fbb", 845308),
    "data/ST-cnts/C6.tsv.gz": ("5cf0fd7945d5d6445b06cceca60fce1f2def7e67", 892853),
    "data/ST-cnts/D1.tsv.gz": ("265843364b2d2d3842b0665bc35efd89e5408e5b", 1251370),
    "data/ST-cnts/D2.tsv.gz": ("4a2ac48659bad39e183e66051ee1610499ddbec8", 990376),
    "data/ST-cnts/D3.tsv.gz": ("dc243401bc58c006600118b3495fe4bebeb6ee1b", 1061872),
    "data/ST-cnts/D4.tsv.gz": ("b87c0f54355e211418b0ba3a33c2c639c901ffb0", 1023224),
    "data/ST-cnts/D5.tsv.gz": ("13799f783c8695969648fb9c2b44f7b8acd7542d", 1073620),
    "data/ST-cnts/D6.tsv.gz": ("162d6ffe8e391a25eecc0e7747e05987983c80cc", 1011895),
    "data/ST-cnts/E1.tsv.gz": ("622c33652fe59d7bb2279fd2cfb19c6ed943e38f", 1017499),
    "data/ST-cnts/E2.tsv.gz": ("5a97fa91c5142e8d89ffb1646f059ba3c031237d", 1256268),
    "data/ST-cnts/E3.tsv.gz": ("bf92570ea3c5e9b5e27cc1638c590324de660105", 1237843),
    "data/ST-cnts/F1.tsv.gz": ("251239709026e4ee83f7bc55724dcf82ee44151e", 1778749),
    "data/ST-cnts/F2.tsv.gz": ("11974082c3d132f0ac8141aecbc827a2eb5c0839", 1880241),
    "data/ST-cnts/F3.tsv.gz": ("95cb0ed789fff572b119ea016cb251f1e1b67ecb", 1900113),
    "data/ST-cnts/G1.tsv.gz": ("3e652b201c7177397cf988499297e86ac244edec", 852454),
    "data/ST-cnts/G2.tsv.gz": ("fea756a9da507fc7c6ab2c3081d9755ea151c65f", 954118),
    "data/ST-cnts/G3.tsv.gz": ("6e324e5713a25c1b7fa0d4583f16c5d841996645", 837354),
    "data/ST-cnts/H1.tsv.gz": ("0e1caaadf4d222ca6e676c0c990fea9b6d07d1ba", 972770),
    "data/ST-cnts/H2.tsv.gz": ("89281de0ce675d1ee9c64fc2047111f7b3f41eb3", 1023577),
    "data/ST-cnts/H3.tsv.gz": ("57fcb104140fe563e271de43f48a19518d5d7224", 733852),
    "data/ST-spotfiles/A1_selection.tsv": ("93243b2efdc34bbc0c744903482f2f206a221f08", 12879),
    "data/ST-spotfiles/A2_selection.tsv": ("e897958f4aeb659848f63e5211ffb174bce663f2", 11958),
    "data/ST-spotfiles/A3_selection.tsv": ("c0de79aa9527155da6fa21d0c9a92f9ad08647fc", 13441),
    "data/ST-spotfiles/A4_selection.tsv": ("5164c0ddb26839b067df7fa09a3b1bf9dbae46e4", 12712),
    "data/ST-spotfiles/A5_selection.tsv": ("73a9b31ebd4f6b03d2786af681a4fa2827e86d62", 12398),
    "data/ST-spotfiles/A6_selection.tsv": ("0d3272f518bf9b4f2256aa45e21ce150245551d8", 11860),
    "data/ST-spotfiles/B1_selection.tsv": ("355370440f6b328172f08f57266244f3fa7c902c", 10794),
    "data/ST-spotfiles/B2_selection.tsv": ("c22fd2fe145f91cc44fe04438170c3cf25438a21", 9838),
    "data/ST-spotfiles/B3_selection.tsv": ("5f35c6fc44595a64b7b539ba48b0f4e48472eab3", 10924),
    "data/ST-spotfiles/B4_selection.tsv": ("76fd789fb18a8746160eda594241ccec309f058c", 10560),
    "data/ST-spotfiles/B5_selection.tsv": ("c0bb5a917fe315c3253a11f7d4bde9ecff468f4f", 10631),
    "data/ST-spotfiles/B6_selection.tsv": ("9d2ba938b3110542083b94e602f29606a9f12667", 10247),
    "data/ST-spotfiles/C1_selection.tsv": ("ee2ba654f40812ab2e7331f15b811109ec1b7cc2", 6631),
    "data/ST-spotfiles/C2_selection.tsv": ("ae0147fd6fc7e81e3a1bc23e35a7c86274357f79", 7053),
    "data/ST-spotfiles/C3_selection.tsv": ("8b6dbbd08f07c444f350693a9b1d35eb37f9340a", 6728),
    "data/ST-spotfiles/C4_selection.tsv": ("7ff3ad4ddc19451916d2f5d10e23564db53851c1", 6960),
    "data/ST-spotfiles/C5_selection.tsv": ("070390da1f2a4690c9540624befb9a28d3f167db", 6802),
    "data/ST-spotfiles/C6_selection.tsv": ("9101c7d64d329d97ae269ab34725549e7ac4a365", 6655),
    "data/ST-spotfiles/D1_selection.tsv": ("853761f0c066c051717307908ed56d8a22600a93", 11444),
    "data/ST-spotfiles/D2_selection.tsv": ("9385e63d91bb91c486b6c83152adefbd459c8f6b", 11223),
    "data/ST-spotfiles/D3_selection.tsv": ("0a711ec7f09392b574db8f4336619dc2264f238b", 11120),
    "data/ST-spotfiles/D4_selection.tsv": ("68f1e7f878935e013fa15ffc7fcbfc3e10af1234", 11260),
    "data/ST-spotfiles/D5_selection.tsv": ("77228c6c750def28a25df945be153cff9acaf827", 11517),
    "data/ST-spotfiles/D6_selection.tsv": ("e8858ff2f697f091ac3c55d3f6c41f376b730451", 11921),
    "data/ST-spotfiles/E1_selection.tsv": ("50315a36068f5270dab12dd618fa4f176d0e8d60", 21672),
    "data/ST-spotfiles/E2_selection.tsv": ("10278ee1f260e3ef7dd59a107856a04bfd21b368", 21116),
    "data/ST-spotfiles/E3_selection.tsv": ("04bd8c5a4c5db5d21823bb10d855a1e39ceb365f", 21146),
    "data/ST-spotfiles/F1_selection.tsv": ("ed572bf182aab691c540d7d77df6cb2723668807", 25344),
    "data/ST-spotfiles/F2_selection.tsv": ("b0648050dea844c1b29b3c4e71593c69951ae2d9", 25504),
    "data/ST-spotfiles/F3_selection.tsv": ("33bd2a18ca77b3ad37268c8061a929c3c7bb53bd", 26018),
    "data/ST-spotfiles/G1_selection.tsv": ("6647e81c7171023fe5bed981d8385f93052e0f85", 16203),
    "data/ST-spotfiles/G2_selection.tsv": ("41cf95ce0b656b4297496bbce7d1507deed13c76", 17128),
    "data/ST-spotfiles/G3_selection.tsv": ("22617456d5bbe4f6eb6c69d86e54c68e72924108", 17139),
    "data/ST-spotfiles/H1_selection.tsv": ("5e6def09397fc55b7119e9180bcfa499b4ada758", 22695),
    "data/ST-spotfiles/H2_selection.tsv": ("f0849180009bd468b17e37e2e97c4fa37d8ccd43", 22331),
    "data/ST-spotfiles/H3_selection.tsv": ("a66424dd31e1adcb2beb9820258c3318a1b526b6", 18964),
    "data/ST-pat/lbl/A1_labeled_coordinates.tsv": ("51b46cfa5eb827e98e5cad1f946f9fe75fb75908", 22117),
    "data/ST-pat/lbl/B1_labeled_coordinates.tsv": ("a81f43425391b1f050761efcee4ab80b87ca7a25", 18510),
    "data/ST-pat/lbl/C1_labeled_coordinates.tsv": ("9aee8bc660ae5f2ba6795625ff50d1cefafd4abc", 11396),
    "data/ST-pat/lbl/D1_labeled_coordinates.tsv": ("352c6db6464df9275c5acb770d67a3e097bd8aca", 19707),
    "data/ST-pat/lbl/E1_labeled_coordinates.tsv": ("0467e372cccb5507460fb788da317e112ebeb459", 37579),
    "data/ST-pat/lbl/F1_labeled_coordinates.tsv": ("b345b3084b6eb7ea111dca385b68e1f6ef6b6cfa", 43854),
    "data/ST-pat/lbl/G2_labeled_coordinates.tsv": ("0133298bbfa1dc39c06d902ffe7c4f666c78af02", 29799),
    "data/ST-pat/lbl/H1_labeled_coordinates.tsv": ("263cd2e4c0e9451c05701df15e1b017fc9d47443", 38594),
    "data/ST-pat/lbl/J1_labeled_coordinates.tsv": ("654f0658094af01b683b6ea613bee75f23a6c055", 16280),
    "res/ST-deconv/props/major.zip": ("17fa643aad246c440f1aa1a7cc47554dc136ea14", 593952),
    "res/ST-cluster/lbl/A2-cluster-annotation.tsv.gz": ("e3408355bce283b3411e8e440b45fe72e2274530", 7504),
    "data/ST-imgs/B/B4/BT10737_D2_HE.jpg": ("3f2911165330e7cf352ecc380ba9e826117ed925", 4076552),
    "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg": ("771d9063017f286c0290a6c6ca3488f8402346de", 3990230),
    "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg": ("d1dc707439af463f581879a18fa723ee4d8a0bf5", 3915842),
    "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg": ("2e0232d8b67b64759a67daa58ca1a486bf6231d6", 3806070),
    "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg": ("9be7a134e17b963183a4ebb154ae139a07b3958f", 3719130),
    "app/www/imgs/A1_HE_image_dark.png": ("4a2d792071af9df6784b94ce5bef50e0479d81df", 4001062),
    "app/www/imgs/A2_HE_image_dark.png": ("5c90458c317c3d55588f3fda83941757258ae624", 3680692),
}


def cache_dir() -> Path:
    """The download cache: ``$STDISTILL_CACHE`` or ``~/.cache/stdistill``."""
    env = os.environ.get("STDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stdistill"


def git_blob_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 of a file as git stores it (``git hash-object``)."""
    p = Path(path)
    h = hashlib.sha1(b"blob %d\0" % p.stat().st_size)
    with open(p, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_verified(path: Path, sha1: str, size: int) -> bool:
    """True when ``path`` exists with the expected size and git blob SHA-1."""
    return path.is_file() and path.stat().st_size == size and git_blob_sha1(path) == sha1


def fetch(url: str, dest: str | os.PathLike, sha1: str, size: int, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and verify it; ``dest`` appears only when the checksum matches.

    Raises :class:`StdistillError` when the network is unreachable or the bytes do not match.
    """
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise StdistillError(
                f"download failed ({reason}); no network? Pass root= (or set STDISTILL_DATA) to a local copy",
                url,
            ) from None
        got_size = tmp.stat().st_size
        got = git_blob_sha1(tmp)
        if got_size != size or got != sha1:
            raise StdistillError(
                f"download is corrupt: expected {size} bytes with git blob sha1 {sha1}, "
                f"got {got_size} bytes with {got}; nothing was written",
                url,
            )
    return dest


def ensure_files(
    paths: Iterable[str], dest_root: str | os.PathLike, manifest: Mapping[str, tuple[str, int]], base_url: str
) -> Path:
    """Make sure every repository path in ``paths`` lies verified under ``dest_root``; fetch the rest."""
    root = Path(dest_root)
    for rel in paths:
        sha1, size = manifest[rel]
        target = root / rel
        if target.is_file() and target.stat().st_size == size:
            continue  # verified when it was written (atomic + checked)
        fetch(f"{base_url.rstrip('/')}/{rel}", target, sha1, size)
    return root
