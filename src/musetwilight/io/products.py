"""The recipe's product files: ESO's layout, DFS provenance keywords, signatures.

Products carry the keywords that ESO's Data Flow System writes (``ESO PRO CATG``,
``ESO PRO REC1 RAWi/CALi/PARAMi ...``, ``PIPEFILE``, ``DATAMD5``) so that tools
which read ESO products (python-cpl's ``cpl.dfs.ProcessingInfo``, archive
ingestion) read ours too.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

from .. import __version__
from ..params import PARAMETERS, RECIPE

PIPE_ID = f"musetwilight/{__version__}"
DRS_ID = f"musetwilight-{__version__}"
PRO_DID = "PRO-1.16"

# keywords never inherited into a product's primary header (CPL's DFS rules, plus the
# per-image bookkeeping of the intermediate stages)
_DROPPED = re.compile(
    r"^(ESO DPR |ESO PRO |ARCFILE$|ORIGFILE$|CHECKSUM$|DATASUM$|HDRVER$|EXTNAME$|BUNIT$|"
    r"ESO DRS MUSE OVSC|ESO DRS MUSE PIXTABLE|ESO DRS MUSE TMP|MUSE TMP|DATAMD5$|PIPEFILE$|"
    r"CRPIX|CRVAL|CTYPE|CUNIT|CD\d_\d|BSCALE$|BZERO$|INHERIT$)"
)
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "XTENSION",
               "PCOUNT", "GCOUNT", "COMMENT", "HISTORY", ""}


def hierarch(key: str) -> str:
    """Astropy's spelling of a long ESO keyword (avoids its HIERARCH warning)."""
    return f"HIERARCH {key}" if len(key) > 8 or " " in key else key


def format_parameter(value) -> str:
    """A parameter value as CPL writes it into PRO REC1 PARAMi VALUE (%g for doubles)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def inherited_header(source: fits.Header) -> fits.Header:
    """The keywords of ``source`` that a product's primary header inherits."""
    header = fits.Header()
    for card in source.cards:
        key = card.keyword
        if key in _STRUCTURAL or _DROPPED.match(key):
            continue
        header.append((hierarch(key), card.value, card.comment))
    return header


def provenance_cards(catg: str, raw: Sequence[tuple[Path, str]], calib: Sequence[tuple[Path, str]],
                     settings: Mapping[str, object]) -> list[tuple[str, object, str]]:
    """ESO PRO keywords: category, recipe and pipeline ids, inputs and parameters.

    Raw frames are listed in the order used, calibrations sorted by category and name
    (as ESO's products show).
    """
    cards: list[tuple[str, object, str]] = [
        ("ESO PRO DID", PRO_DID, "Data dictionary for PRO"),
        ("ESO PRO CATG", catg, "Category of pipeline product frame"),
        ("ESO PRO TYPE", "REDUCED", "Product type"),
        ("ESO PRO TECH", "IFU", "Observation technique"),
        ("ESO PRO SCIENCE", False, "Scientific product if T"),
        ("ESO PRO REC1 ID", RECIPE, "Pipeline recipe (unique) identifier"),
        ("ESO PRO REC1 DRS ID", DRS_ID, "Data Reduction System identifier"),
        ("ESO PRO REC1 PIPE ID", PIPE_ID, "Pipeline (unique) identifier"),
    ]
    for index, (path, tag) in enumerate(raw, start=1):
        cards.append((f"ESO PRO REC1 RAW{index} NAME", Path(path).name, "File name of raw frame"))
        cards.append((f"ESO PRO REC1 RAW{index} CATG", tag, "Category of raw frame"))
    cards.append(("ESO PRO DATANCOM", len(raw), "Number of combined frames"))
    for index, (path, tag) in enumerate(sorted(calib, key=lambda f: (f[1], Path(f[0]).name)), start=1):
        cards.append((f"ESO PRO REC1 CAL{index} NAME", Path(path).name, "File name of calibration frame"))
        cards.append((f"ESO PRO REC1 CAL{index} CATG", tag, "Category of calibration frame"))
        md5 = _datamd5_of(path)
        if md5:
            cards.append((f"ESO PRO REC1 CAL{index} DATAMD5", md5, "MD5 signature of calib frame"))
    for index, parameter in enumerate(PARAMETERS, start=1):
        cards.append((f"ESO PRO REC1 PARAM{index} NAME", parameter.name, parameter.help[:60]))
        cards.append((f"ESO PRO REC1 PARAM{index} VALUE", format_parameter(settings[parameter.name]),
                      f"Default: {format_parameter(parameter.default)}"))
    return cards


def _datamd5_of(path: Path | str) -> str | None:
    try:
        value = fits.getval(path, "DATAMD5", 0)
    except (OSError, KeyError):
        return None
    return str(value) if value else None


def product_primary_header(source: fits.Header, catg: str, raw, calib, settings,
                           extra: Iterable[tuple[str, object, str | None]] = ()) -> fits.Header:
    """Primary header of a product: inherited keywords, provenance, then ``extra`` (QC, DRS)."""
    header = fits.Header()
    header["DATE"] = (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                      "file creation date (YYYY-MM-DDThh:mm:ss UT)")
    inherited = inherited_header(source)
    core = [k for k in ("TELESCOP", "INSTRUME", "ORIGIN", "DATE-OBS", "MJD-OBS", "EXPTIME", "RA",
                        "DEC", "OBJECT") if k in inherited]
    for key in core:
        header[key] = (inherited[key], inherited.comments[key])
    header["DATAMD5"] = ("", "MD5 checksum")
    header["PIPEFILE"] = ("", "Filename of data product")
    for card in inherited.cards:
        if card.keyword not in core and not card.keyword.startswith(("ESO QC", "ESO DRS MUSE FLAT")):
            header.append(card)
    for key, value, comment in provenance_cards(catg, raw, calib, settings):
        header.append((hierarch(key), value, comment))
    for key, value, comment in extra:
        header.append((hierarch(key), value, comment))
    return header


def wcs_cards(header: fits.Header, naxis: int) -> fits.Header:
    """The linear WCS keywords of ``header`` for the first ``naxis`` axes."""
    out = fits.Header()
    for key in ("CRPIX1", "CRVAL1", "CTYPE1", "CUNIT1", "CD1_1", "CRPIX2", "CRVAL2", "CTYPE2",
                "CUNIT2", "CD2_2", "CD1_2", "CD2_1", "CTYPE3", "CUNIT3", "CD3_3", "CRPIX3", "CRVAL3",
                "CD1_3", "CD2_3", "CD3_1", "CD3_2"):
        axes = {int(ch) for ch in key if ch.isdigit()}
        if key in header and max(axes) <= naxis:
            out[key] = header[key]
    return out


def set_card(header: fits.Header, key: str, value, comment: str) -> None:
    """Set a keyword, cutting the comment to fit one card (as CFITSIO does)."""
    room = 80 - max(len(fits.Card(key, value).image.rstrip()), 30) - 3
    header[key] = (value, comment[:max(room, 0)])


_EXTNAME_COMMENTS = {"data": "This extension contains data values",
                     "stat": "This extension contains data variance",
                     "image": "reconstructed image (data values)",
                     "dq": "reconstructed image (bad pixel status values)"}


def image_hdu(data: np.ndarray | None, extname: str, obj: str | None, wcs: fits.Header | None = None,
              kind: str = "data", bunit: str | None = None, errdata: str | None = None,
              qualdata: str | None = None, scidata: str | None = None) -> fits.ImageHDU:
    """An image extension with ESO's HDUCLASS keywords.

    ``kind``: "data" (a cube or image of values), "image" (a reconstructed image),
    "stat" (variance) or "dq" (Euro3D status bits); ``errdata`` / ``qualdata`` /
    ``scidata`` name the partner extensions.
    """
    header = fits.Header()
    if obj is not None:
        header["OBJECT"] = obj[:68]
    if wcs is not None and data is not None:
        header.extend(wcs_cards(wcs, data.ndim))
    set_card(header, "EXTNAME", extname, _EXTNAME_COMMENTS[kind])
    set_card(header, "HDUCLASS", "ESO", "class name (ESO format)")
    set_card(header, "HDUDOC", "DICD", "document with class description")
    set_card(header, "HDUVERS", "DICD version 6", "version number (according to spec v2.5.1)")
    set_card(header, "HDUCLAS1", "IMAGE", "Image data format")
    if kind in ("data", "image"):
        set_card(header, "HDUCLAS2", "DATA", "this extension contains the data itself")
        if errdata:
            set_card(header, "ERRDATA", errdata, "pointer to the variance extension")
        if qualdata:
            set_card(header, "QUALDATA", qualdata, "pointer to the bad pixel mask extension")
    elif kind == "stat":
        set_card(header, "HDUCLAS2", "ERROR", "this extension contains variance")
        set_card(header, "HDUCLAS3", "MSE", "the extension contains variances (sigma**2)")
        set_card(header, "SCIDATA", scidata, "pointer to the data extension")
    else:
        set_card(header, "HDUCLAS2", "QUALITY", "this extension contains bad pixel mask")
        set_card(header, "HDUCLAS3", "FLAG32BIT", "extension contains 32bit Euro3D bad pixel information")
        set_card(header, "QUALMASK", 4294967295, "all non-zero values are bad")
        set_card(header, "SCIDATA", scidata, "pointer to the data extension")
    if bunit is not None:
        header["BUNIT"] = bunit
    return fits.ImageHDU(data=data, header=header)


def datacube_skyflat_hdulist(primary: fits.Header, data: np.ndarray, stat: np.ndarray,
                             white: np.ndarray, wcs: fits.Header) -> fits.HDUList:
    """DATACUBE_SKYFLAT in ESO's layout: empty primary, DATA, STAT, white."""
    obj = primary.get("OBJECT", "")
    return fits.HDUList([
        fits.PrimaryHDU(header=primary),
        image_hdu(np.asarray(data, np.float32), "DATA", f"{obj} (DATA)", wcs, "data", "count", errdata="STAT"),
        image_hdu(np.asarray(stat, np.float32), "STAT", f"{obj} (STAT)", wcs, "stat", "(count)**2",
                  scidata="DATA"),
        image_hdu(np.asarray(white, np.float32), "white", f"{obj} (white)", wcs, "image", "count"),
    ])


def data_md5(hdul: fits.HDUList) -> str:
    """MD5 over the data units of all HDUs as written to FITS (big-endian), ESO's DATAMD5."""
    digest = hashlib.md5()
    for hdu in hdul:
        if hdu.data is None:
            continue
        array = np.asarray(hdu.data)
        digest.update(array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes())
        pad = -array.nbytes % 2880
        digest.update(b"\0" * pad)
    return digest.hexdigest()


def sign_product(hdul: fits.HDUList, path: Path | str) -> None:
    """Fill PIPEFILE and DATAMD5 of a product about to be written to ``path``."""
    hdul[0].header["PIPEFILE"] = (Path(path).name, "Filename of data product")
    hdul[0].header["DATAMD5"] = (data_md5(hdul), "MD5 checksum")


def write_products(products: dict[str, fits.HDUList], output_dir: Path | str) -> dict[str, Path]:
    """Write all products or none: each goes to a temporary file first, then all are renamed.

    On any failure (full disk, interruption) the temporary files are removed and no
    product of this run is left in ``output_dir``; existing files there stay untouched.
    """
    import os
    import tempfile
    import warnings

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: output directory is not writable")
    pending: list[tuple[str, str, Path]] = []
    try:
        for name, hdul in products.items():
            path = out / f"{name}.fits"
            sign_product(hdul, path)
            handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
            os.close(handle)
            pending.append((name, tmp_name, path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                hdul.writeto(tmp_name, overwrite=True, checksum=True, output_verify="exception")
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp_name, 0o666 & ~mask)
        for _, tmp_name, path in pending:
            os.replace(tmp_name, path)
    except BaseException:
        for _, tmp_name, _ in pending:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
        raise
    return {name: path for name, _, path in pending}
