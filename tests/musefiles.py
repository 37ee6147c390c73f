"""Writers of MUSE files for the tests (the package only reads them): per-IFU and merged
MUSE images, and ESO's IFU-matching rule applied to a whole file."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

from musetwilight.core.images import MuseImage
from musetwilight.headers import HDU_CLASS_KEYS, hierarch, is_structural, is_wcs_key, set_hdu_class, strip_structural
from musetwilight.instrument import header_ifu
from musetwilight.io.formats import EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT, matching_hdu, scan_fits


def ifus_in_file(path) -> list[int]:
    """The IFUs (1..24) named by the EXTNAMEs of a file (primary included), sorted."""
    return sorted({header_ifu(h) for h in scan_fits(path)} - {None})


def file_matches_ifu(path, ifu: int, tag: str | None = None) -> bool:
    """Whether ESO would take this file for ``ifu``."""
    return matching_hdu(scan_fits(path), ifu, tag) is not None


def write_hdulist_atomic(hdul: fits.HDUList | Sequence[fits.hdu.base._BaseHDU], path: str | os.PathLike,
                         checksum: bool = True) -> Path:
    """Write a FITS file atomically: a temporary file in the same directory (with
    CHECKSUM/DATASUM), then a rename.  On any error no partial file is left behind and
    an existing file of that name is untouched."""
    out = Path(path)
    if not isinstance(hdul, fits.HDUList):
        hdul = fits.HDUList(list(hdul))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdul.writeto(tmp_name, overwrite=True, checksum=checksum, output_verify="exception")
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def primary_header_for_image(header: fits.Header) -> fits.Header:
    """The primary header ESO writes for an image: without BUNIT, WCS and HDU-class
    keywords and without structural keywords (``muse_image_save``)."""
    out = strip_structural(header)
    for key in list(out.keys()):
        if key == "BUNIT" or is_wcs_key(key) or HDU_CLASS_KEYS.search(key):
            out.remove(key, ignore_missing=True, remove_all=True)
    return out


def muse_image_hdus(image: MuseImage, prefix: str = "",
                    data_keywords: fits.Header | None = None) -> list[fits.ImageHDU]:
    """DATA (float32), DQ (int32, same bits), STAT (float32) image extensions of a MUSE image.

    Extension headers as ``muse_image_save``: INHERIT, the WCS keywords of the image
    header, EXTNAME ``prefix + DATA|DQ|STAT``, BUNIT (DATA: the image's, STAT: ``(unit)**2``)
    and the ESO HDU-class keywords.  ``prefix="CHAN05."`` gives the merged layout, for
    which ``data_keywords`` (e.g. the IFU's ``ESO`` keywords) go into the DATA header.
    """
    names = {kind: prefix + kind for kind in (EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT)}
    base = fits.Header()
    base.set("INHERIT", True)
    for card in image.header.cards:
        if is_wcs_key(card.keyword):
            base.set(card.keyword, card.value, card.comment)
    unit = image.header.get("BUNIT")
    unit_comment = image.header.comments["BUNIT"] if unit is not None else None

    data_header = base.copy()
    data_header.set("EXTNAME", names[EXTNAME_DATA], "This extension contains data values")
    if unit is not None:
        data_header.set("BUNIT", unit, unit_comment)
    set_hdu_class(data_header, "data", data=names[EXTNAME_DATA], stat=names[EXTNAME_STAT], dq=names[EXTNAME_DQ])
    if data_keywords is not None:
        for card in data_keywords.cards:
            if not is_structural(card.keyword):
                data_header.set(hierarch(card.keyword), card.value, card.comment)

    dq_header = base.copy()
    dq_header.set("EXTNAME", names[EXTNAME_DQ], "This extension contains bad pixel status values")
    set_hdu_class(dq_header, "dq", data=names[EXTNAME_DATA], stat=names[EXTNAME_STAT], dq=names[EXTNAME_DQ])

    stat_header = base.copy()
    stat_header.set("EXTNAME", names[EXTNAME_STAT], "This extension contains data variance")
    if unit is not None:
        stat_header.set("BUNIT", f"({unit})**2")
    set_hdu_class(stat_header, "stat", data=names[EXTNAME_DATA], stat=names[EXTNAME_STAT], dq=names[EXTNAME_DQ])

    dq = np.ascontiguousarray(image.dq)
    dq32 = dq.view(np.int32) if dq.dtype in (np.uint32, np.int32) else dq.astype(np.int64).astype(np.int32)
    return [
        fits.ImageHDU(np.asarray(image.data, dtype=np.float32), header=data_header),
        fits.ImageHDU(dq32, header=dq_header),
        fits.ImageHDU(np.asarray(image.stat, dtype=np.float32), header=stat_header),
    ]


def write_muse_image(path: str | os.PathLike, image: MuseImage, checksum: bool = True) -> Path:
    """Write a MUSE image in the per-IFU layout: primary header (no data) + DATA, DQ
    (int32 Euro3D bits), STAT, atomically.  The image header must have BUNIT (ESO)."""
    if "BUNIT" not in image.header:
        raise ValueError(f"{path}: the image header has no BUNIT (ESO's muse_image_save requires it)")
    primary = fits.PrimaryHDU(header=primary_header_for_image(image.header))
    return write_hdulist_atomic([primary, *muse_image_hdus(image)], path, checksum=checksum)
