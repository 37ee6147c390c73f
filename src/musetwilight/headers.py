"""FITS header rules shared by every reader and writer: keyword spelling, WCS and
HDU-class keyword sets, ESO's extension class keywords.

One home for the regular expressions ESO's pipeline applies to headers
(``MUSE_WCS_KEYS``, ``ESO_HDU_HEADERS_REGEXP``), for the HDUCLASS keywords ESO
writes into every image extension (``muse_utils_set_hduclass``) and for the order
of the keywords in a product's primary header (:func:`product_order`).
"""

from __future__ import annotations

import re

from astropy.io import fits

#: ESO's MUSE_WCS_KEYS: the WCS keywords moved between primary and image headers.
WCS_KEYS = re.compile(
    r"^C(TYPE|UNIT|RPIX|RVAL|DELT|SYER|RDER)|^CD[0-9]+_[0-9]+|^WCSAXES[ A-Z]|^WCSNAME[ A-Z]|^L[OA][NT]POLE$"
)
#: ESO's data-format keywords, rewritten for every extension (ESO_HDU_HEADERS_REGEXP).
HDU_CLASS_KEYS = re.compile(r"HDU(CLASS|CLAS1|CLAS2|CLAS3|DOC|VERS)$|^SCIDATA$|^QUAL(DATA|MASK)$|^ERRDATA$")
#: Keywords describing the layout of one HDU, never carried over into another header.
STRUCTURAL_KEYS = frozenset(
    ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "BLANK",
     "CHECKSUM", "DATASUM", "TFIELDS", "THEAP")
)
_NAXIS = re.compile(r"^NAXIS\d*$")
#: ESO keyword categories that CPL's product headers put first, in this order (measured on
#: muse_twilight 2.8.7 products of raw headers carrying many categories); the others follow
#: in their own order.
PRODUCT_CATEGORY_ORDER = ("ESO OBS ", "ESO TPL ", "ESO GEN ", "ESO TEL ", "ESO INS ", "ESO DET ", "ESO PRO ")
PRODUCT_SIGNATURE_KEYS = ("DATAMD5", "PIPEFILE")  # after the other standard keywords, before the ESO ones


def is_wcs_key(key: str) -> bool:
    """Whether ``key`` is one of ESO's MUSE_WCS_KEYS."""
    return WCS_KEYS.match(key) is not None


def is_structural(key: str) -> bool:
    """Whether ``key`` describes the layout of its HDU (NAXISn, BITPIX, CHECKSUM, ...)."""
    return key in STRUCTURAL_KEYS or _NAXIS.match(key) is not None


def hierarch(key: str) -> str:
    """The astropy spelling of a keyword: ``HIERARCH`` prefix for long or spaced names."""
    if key.startswith("HIERARCH ") or (len(key) <= 8 and " " not in key):
        return key
    return "HIERARCH " + key


def fits_text(value: str) -> str:
    """A string as CFITSIO writes it into a header value: the UTF-8 bytes, each one outside
    printable ASCII as a space (a file name "SKYFLÂT.fits" is recorded as "SKYFL  T.fits",
    as in ESO's products)."""
    return "".join(chr(b) if 32 <= b < 127 else " " for b in value.encode("utf-8", "surrogateescape"))


def strip_structural(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without its structural keywords."""
    out = header.copy(strip=True)
    for key in list(out.keys()):
        if is_structural(key):
            out.remove(key, ignore_missing=True, remove_all=True)
    return out


def set_card(header: fits.Header, key: str, value, comment: str) -> None:
    """Set a keyword, cutting the comment to fit one card (as CFITSIO does)."""
    room = 80 - max(len(fits.Card(key, value).image.rstrip()), 30) - 3
    header[key] = (value, comment[:max(room, 0)])


def set_hdu_class(header: fits.Header, kind: str, *, data: str | None = None, stat: str | None = None,
                  dq: str | None = None) -> None:
    """ESO's HDUCLASS keywords of one image extension (``muse_utils_set_hduclass``).

    ``kind`` is "data" (values), "stat" (variance) or "dq" (Euro3D bits); ``data``,
    ``stat`` and ``dq`` name the partner extensions (SCIDATA, ERRDATA, QUALDATA).
    """
    set_card(header, "HDUCLASS", "ESO", "class name (ESO format)")
    set_card(header, "HDUDOC", "DICD", "document with class description")
    set_card(header, "HDUVERS", "DICD version 6", "version number (according to spec v2.5.1)")
    set_card(header, "HDUCLAS1", "IMAGE", "Image data format")
    if kind == "data":
        set_card(header, "HDUCLAS2", "DATA", "this extension contains the data itself")
        if stat:
            set_card(header, "ERRDATA", stat, "pointer to the variance extension")
        if dq:
            set_card(header, "QUALDATA", dq, "pointer to the bad pixel mask extension")
    elif kind == "stat":
        set_card(header, "HDUCLAS2", "ERROR", "this extension contains variance")
        set_card(header, "HDUCLAS3", "MSE", "the extension contains variances (sigma**2)")
        set_card(header, "SCIDATA", data, "pointer to the data extension")
        if dq:
            set_card(header, "QUALDATA", dq, "pointer to the bad pixel mask extension")
    elif kind == "dq":
        set_card(header, "HDUCLAS2", "QUALITY", "this extension contains bad pixel mask")
        set_card(header, "HDUCLAS3", "FLAG32BIT", "extension contains 32bit Euro3D bad pixel information")
        set_card(header, "QUALMASK", 4294967295, "all non-zero values are bad")
        set_card(header, "SCIDATA", data, "pointer to the data extension")
        if stat:
            set_card(header, "ERRDATA", stat, "pointer to the variance extension")
    else:
        raise ValueError(f"unknown HDU class kind {kind!r}")


def product_order(header: fits.Header) -> fits.Header:
    """``header``'s cards in the order of an ESO product's primary header.

    The standard keywords as they are, DATAMD5 and PIPEFILE, then the ESO keywords of the
    categories in PRODUCT_CATEGORY_ORDER (each category in its own order), then all other
    keywords (further ESO categories, QC and DRS, HIERARCH keywords of our own) as they are.
    """
    def rank(card: fits.Card) -> int:
        key = card.keyword
        if key in PRODUCT_SIGNATURE_KEYS:
            return 1
        if not key.startswith("ESO ") and not card.image.startswith("HIERARCH"):
            return 0
        for index, prefix in enumerate(PRODUCT_CATEGORY_ORDER):
            if key.startswith(prefix):
                return 2 + index
        return 2 + len(PRODUCT_CATEGORY_ORDER)
    return fits.Header(sorted(header.cards, key=rank))
