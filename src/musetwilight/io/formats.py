"""FITS input and output in the MUSE formats (the edges of the package).

Shared data containers live here; every reader returns them.  The readers follow
the rules of the ESO MUSE pipeline 2.8.7 (``muse_utils.c``, ``muse_image.c``,
``muse_table.c``, ``muse_basicproc.c``, ``muse_mask.c``):

* An HDU belongs to IFU ``n`` when its EXTNAME starts with ``CHAN``, is at least
  6 characters long and the number after ``CHAN`` (C ``atoi``, stored in an
  unsigned char) equals ``n``: ``CHAN05`` and ``CHAN05.DATA`` both name IFU 5.
  The primary HDU counts too (per-IFU files carry ``EXTNAME = 'CHANnn'`` there).
* A file without such an HDU still matches every IFU when its primary header names
  no IFU and has no ``PIPEFILE`` ("generic" calibration); GEOMETRY_TABLE and
  TWILIGHT_CUBE files match every IFU.
* Files are opened memory-mapped and lazily: reading one IFU of a raw exposure
  reads the headers up to that IFU's extension and that extension's data only.

Tables are returned as :class:`astropy.table.Table` with plain (unmasked),
native-byte-order NumPy columns in file order; ``table.meta`` holds ``path``,
``extension`` (HDU index), ``extname`` and ``header`` (the primary header, plus the
extension's EXTNAME when the primary has none, as ESO's ``muse_table_load``).

Every problem with an input file raises :class:`musetwilight.frames.InputError`
naming the file: the public readers are wrapped by :func:`reader`, files are checked
for truncation and trailing garbage while their HDUs are walked, and absurd NAXIS or
TFIELDS counts (on which astropy would loop for ever) are refused before astropy
parses a header.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .frames import InputError

log = logging.getLogger(__name__)

NUM_IFUS = 24
EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT = "DATA", "DQ", "STAT"
# tags whose files match every IFU (muse_frameset_find)
IFU_INDEPENDENT_TAGS = ("GEOMETRY_TABLE", "TWILIGHT_CUBE")
# WCS keywords moved from the primary to the image extensions (MUSE_WCS_KEYS)
WCS_KEY_PATTERN = re.compile(
    r"^C(TYPE|UNIT|RPIX|RVAL|DELT|SYER|RDER)|^CD[0-9]+_[0-9]+|^WCSAXES[ A-Z]|^WCSNAME[ A-Z]|^L[OA][NT]POLE$"
)
# ESO data-format keywords rewritten for every extension (ESO_HDU_HEADERS_REGEXP)
HDU_CLASS_KEY_PATTERN = re.compile(r"HDU(CLASS|CLAS1|CLAS2|CLAS3|DOC|VERS)$|^SCIDATA$|^QUAL(DATA|MASK)$|^ERRDATA$")
# keywords describing the layout of one HDU, never carried over into another header
STRUCTURAL_KEYS = frozenset(
    ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "BLANK",
     "CHECKSUM", "DATASUM", "TFIELDS", "THEAP")
)
_NAXIS = re.compile(r"^NAXIS\d*$")

# Required raw keywords and their CPL types (cpl_propertylist_get_int/_double/_string
# accept only that type: integers must be FITS integers, reals need a decimal point).
RAW_INT_KEYS = ("ESO DET BINX", "ESO DET BINY") + tuple(
    f"ESO DET OUT{q} {name}" for q in range(1, 5)
    for name in ("X", "Y", "NX", "NY", "PRSCX", "PRSCY", "OVSCX", "OVSCY")
)
RAW_REAL_KEYS = tuple(f"ESO DET OUT{q} GAIN" for q in range(1, 5))
RAW_STRING_KEYS = ("ESO DET CHIP NAME", "ESO DET CHIP ID")

# BADPIX_TABLE columns (muse_badpix_table_def): CPL type checked exactly after loading,
# where FITS B/I/J columns become CPL_TYPE_INT, E float, D double, K long long.
BADPIX_COLUMNS = (("xpos", "int"), ("ypos", "int"), ("status", "int"), ("value", "float"))
# GEOMETRY_TABLE columns read by the pixel table (muse_geo_table_def)
GEOMETRY_COLUMNS = (("SubField", "int"), ("SliceCCD", "int"), ("SliceSky", "int"),
                    ("x", "double"), ("y", "double"), ("angle", "double"), ("width", "double"))


@dataclass
class MuseImage:
    """A trimmed or raw MUSE CCD image: data, Euro3D DQ bits, variance, merged header."""

    data: np.ndarray  # float32
    dq: np.ndarray  # uint32 Euro3D status bits, 0 = good
    stat: np.ndarray  # float32 variance
    header: fits.Header
    path: Path | None = None  # the file it was read from, for messages


@dataclass
class RawImage:
    """One IFU of a raw exposure: the untrimmed integer CCD and its merged header."""

    data: np.ndarray  # as stored (uint16 for real data), untrimmed
    header: fits.Header  # primary header updated with the CHANnn extension header
    path: Path
    ifu: int


@dataclass
class MuseMask:
    """A 2D boolean mask (True = masked) and the primary header of its file."""

    mask: np.ndarray  # bool
    header: fits.Header
    path: Path


# --------------------------------------------------------------------------- IFU matching

_ATOI = re.compile(r"^[ \t\n\v\f\r]*([+-]?\d+)")


def ifu_of_extname(name: object) -> int | None:
    """The IFU number an EXTNAME stands for, as ESO parses it; None if it names no IFU.

    ``CHAN05`` and ``CHAN05.DATA`` give 5.  Like ``muse_pfits_has_ifu`` the name must
    start with ``CHAN`` and be at least 6 characters long; the number is C ``atoi``
    of the rest (0 when it does not start with digits), truncated to an unsigned char.
    """
    if not isinstance(name, str) or not name.startswith("CHAN") or len(name) < 6:
        return None
    match = _ATOI.match(name[4:])
    return int(match.group(1)) % 256 if match else 0


def header_ifu(header: fits.Header) -> int | None:
    """The IFU (1..24) named by this header's EXTNAME, else None (``muse_utils_get_ifu``)."""
    ifu = ifu_of_extname(header.get("EXTNAME"))
    return ifu if ifu is not None and 1 <= ifu <= NUM_IFUS else None


_Reader = TypeVar("_Reader", bound=Callable)


def reader(function: _Reader) -> _Reader:
    """Make every failure of a file reader an InputError naming the file.

    A corrupt file can make astropy raise nearly anything while it parses headers,
    columns or data lazily (VerifyError, KeyError, AssertionError, ...); at this
    boundary all of them mean "this input file is broken", so they are reported as
    such, with the original exception's type and text.
    """
    @functools.wraps(function)
    def wrapper(path, *args, **kwargs):
        try:
            return function(path, *args, **kwargs)
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 -- see the docstring
            raise InputError(f"{path}: corrupt FITS file ({type(err).__name__}: {err})") from None
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def open_fits(path: str | os.PathLike) -> Iterator[fits.HDUList]:
    """Open a FITS file memory-mapped and lazily; failures become InputError naming the file.

    Image data come unscaled (``do_not_scale_image_data``): use :func:`image_values`.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise InputError(f"{file_path}: file does not exist")
    _check_header_counts(file_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdul = fits.open(file_path, memmap=True, do_not_scale_image_data=True, mode="readonly")
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise InputError(f"{file_path}: not a readable FITS file ({err})") from None
    try:
        yield hdul
    finally:
        hdul.close()


_BLOCK = 2880
_COUNT_KEYS = {b"NAXIS   ": "NAXIS", b"TFIELDS ": "TFIELDS"}


def _check_header_counts(path: Path) -> None:
    """Reject NAXIS or TFIELDS outside 0..999 (the FITS limit) before astropy parses a header:
    astropy loops over that many keywords, so a corrupt count of 10^9 would hang the run.

    Walks the headers in the raw bytes (skipping data units); anything it cannot follow
    is left to astropy, which reports it.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        position, index = 0, 0
        while position + _BLOCK <= size:
            handle.seek(position)
            values: dict[str, int] = {}
            found_end = False
            while not found_end:
                block = handle.read(_BLOCK)
                if len(block) < _BLOCK:
                    return
                position += _BLOCK
                for start in range(0, _BLOCK, 80):
                    card = block[start:start + 80]
                    key = card[:8]
                    if key == b"END     ":
                        found_end = True
                        break
                    if card[8:10] == b"= " and (key in _COUNT_KEYS or key.startswith((b"NAXIS", b"BITPIX",
                                                                                       b"PCOUNT", b"GCOUNT"))):
                        try:
                            values[key.decode("ascii").strip()] = int(card[10:80].split(b"/")[0])
                        except ValueError:
                            pass
            for key in _COUNT_KEYS.values():
                if key in values and not 0 <= values[key] <= 999:
                    raise InputError(f"{path}: corrupt FITS header of HDU {index}: {key} = {values[key]} "
                                     "(FITS allows 0..999)")
            naxis = values.get("NAXIS", 0)
            dims = [values.get(f"NAXIS{k}", 0) for k in range(1, naxis + 1)]
            if "BITPIX" not in values:
                return
            count = 1 if dims else 0
            for dim in dims[1:] if dims and dims[0] == 0 else dims:
                count *= max(dim, 0)
            count = values.get("GCOUNT", 1) * (values.get("PCOUNT", 0) + count)
            position += -(-abs(values["BITPIX"]) // 8 * count // _BLOCK) * _BLOCK
            index += 1


def _hdu(hdul: fits.HDUList, index: int, path: Path | str) -> fits.hdu.base._BaseHDU:
    """HDU ``index``; a header that cannot be read (truncated file) is an InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hdul[index]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise InputError(f"{path}: cannot read the header of HDU {index} ({err})") from None


def iter_hdus(hdul: fits.HDUList, path: Path | str) -> Iterator[tuple[int, fits.hdu.base._BaseHDU]]:
    """(index, HDU) pairs, reading the headers one by one (lazily)."""
    index = 0
    while True:
        try:
            hdu = _hdu(hdul, index, path)
        except IndexError:
            _check_complete(hdul, index - 1, path)
            return
        yield index, hdu
        index += 1


def _check_complete(hdul: fits.HDUList, last: int, path: Path | str) -> None:
    """After the last HDU astropy could read: bytes left over mean a truncated or corrupt
    HDU (astropy drops it with a warning only); a file shorter than the last HDU's data
    (padding not counted) is truncated."""
    if last < 0:
        return
    info = hdul.fileinfo(last)
    if not info or not info.get("filename"):
        return
    end = info["datLoc"] + info["datSpan"]
    size = os.path.getsize(info["filename"])
    if size > end:
        raise InputError(f"{path}: truncated or corrupt FITS file: {size - end} bytes after HDU {last} "
                         "do not form a complete HDU")
    needed = info["datLoc"] + data_bytes(_hdu(hdul, last, path).header)
    if size < needed:
        raise InputError(f"{path}: truncated FITS file: HDU {last} needs {needed} bytes, "
                         f"the file has only {size}")


def data_bytes(header: fits.Header) -> int:
    """Size in bytes of an HDU's data unit without padding (FITS standard, section 4.4.1)."""
    try:
        naxis = int(header.get("NAXIS", 0))
        if naxis == 0:
            return 0
        dims = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)]
        random_groups = bool(header.get("GROUPS", False)) and dims[0] == 0
        count = int(np.prod(dims[1:] if random_groups else dims, dtype=np.int64))
        count = int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + count)
        return abs(int(header.get("BITPIX", 8))) // 8 * count
    except (TypeError, ValueError, OverflowError):
        return 0


@reader
def scan_fits(path: str | os.PathLike) -> list[fits.Header]:
    """The headers of every HDU of a file (parsed, usable after the file is closed), checking that it is a complete FITS
    file (readable headers, no truncated data, no trailing garbage).  Data are not read."""
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        return [hdu.header for _, hdu in iter_hdus(hdul, file_path)]


def ifu_extension(hdul: fits.HDUList, ifu: int, path: Path | str = "") -> int | None:
    """Index of the first HDU (primary = 0) whose EXTNAME names ``ifu``, else None.

    ESO's ``muse_utils_get_extension_for_ifu``; headers after the match are not read.
    """
    for index, hdu in iter_hdus(hdul, path):
        if ifu_of_extname(hdu.header.get("EXTNAME")) == ifu:
            return index
    return None


def find_ifu_hdu(hdul: fits.HDUList, ifu: int, path: Path | str = "", tag: str | None = None) -> int | None:
    """The HDU index to use for ``ifu`` under ESO's frame-matching rule, None when the file
    does not match that IFU (``muse_frameset_find``).

    The file matches when an HDU (primary included) is named ``CHANnn`` for the IFU; then
    its index is returned.  Otherwise it matches (index 0 is returned) when the primary
    header names no IFU and has no ``PIPEFILE`` (a "generic" calibration), when ``ifu`` is
    0, or when ``tag`` is GEOMETRY_TABLE or TWILIGHT_CUBE.
    """
    index = ifu_extension(hdul, ifu, path)
    if index is not None:
        return index
    primary = _hdu(hdul, 0, path).header
    if ifu == 0 or tag in IFU_INDEPENDENT_TAGS:
        return 0
    if header_ifu(primary) is None and "PIPEFILE" not in primary:
        return 0
    return None


@reader
def file_matches_ifu(path: str | os.PathLike, ifu: int, tag: str | None = None) -> bool:
    """Whether ESO would take this file for ``ifu`` (see :func:`find_ifu_hdu`)."""
    with open_fits(path) as hdul:
        return find_ifu_hdu(hdul, ifu, path, tag) is not None


@reader
def has_ifu_extension(path: str | os.PathLike, ifu: int) -> bool:
    """Whether an HDU of the file is named for ``ifu`` (what a raw exposure needs: a raw
    file matches every IFU by the generic rule, but ESO then fails to load a missing one,
    "does not contain data from IFU n", and skips that IFU)."""
    with open_fits(path) as hdul:
        return ifu_extension(hdul, ifu, path) is not None


@reader
def ifus_in_file(path: str | os.PathLike) -> list[int]:
    """The IFUs (1..24) named by the EXTNAMEs of a file (primary included), sorted."""
    found: set[int] = set()
    with open_fits(path) as hdul:
        for _, hdu in iter_hdus(hdul, path):
            ifu = header_ifu(hdu.header)
            if ifu is not None:
                found.add(ifu)
    return sorted(found)


def find_extension(hdul: fits.HDUList, extname: str, path: Path | str = "") -> int | None:
    """Index of the first extension (not the primary) with exactly this EXTNAME, else None
    (``cpl_fits_find_extension``)."""
    for index, hdu in iter_hdus(hdul, path):
        if index > 0 and str(hdu.header.get("EXTNAME", "")).rstrip() == extname:
            return index
    return None


# --------------------------------------------------------------------------- headers

@reader
def read_header(path: str | os.PathLike, index: int = 0) -> fits.Header:
    """A copy of the header of HDU ``index``."""
    with open_fits(path) as hdul:
        try:
            return _hdu(hdul, index, path).header.copy()
        except IndexError:
            raise InputError(f"{path}: has no HDU {index}") from None


def merge_headers(primary: fits.Header, extension: fits.Header) -> fits.Header:
    """The primary header updated with an extension header (structural keys skipped).

    As ``muse_image_load_from_raw``: extension values replace primary ones, new keys are
    appended; COMMENT/HISTORY cards are appended.
    """
    merged = _strip_structural(primary)
    for card in extension.cards:
        key = card.keyword
        if key in STRUCTURAL_KEYS or _NAXIS.match(key):
            continue
        if key in ("COMMENT", "HISTORY", ""):
            merged.append(card, end=True)
        else:
            merged.set(hierarch(key), card.value, card.comment)
    return merged


def _strip_structural(header: fits.Header) -> fits.Header:
    out = header.copy(strip=True)
    for key in list(out.keys()):
        if key in STRUCTURAL_KEYS or _NAXIS.match(key):
            out.remove(key, ignore_missing=True, remove_all=True)
    return out


def hierarch(key: str) -> str:
    """The astropy spelling of a keyword: ``HIERARCH`` prefix for long or spaced names."""
    if key.startswith("HIERARCH ") or (len(key) <= 8 and " " not in key):
        return key
    return "HIERARCH " + key


def set_keyword(header: fits.Header, key: str, value: object, comment: str | None = None,
                kind: str | None = None) -> None:
    """Set a keyword with the FITS type CPL expects.

    ``kind`` ("int", "real", "bool", "str") forces the type; otherwise it follows the
    Python/NumPy type of ``value``.  Reals are always written with a decimal point
    (astropy writes ``2.0`` for ``2.0``), integers as integers, booleans as T/F.
    """
    if kind is None:
        if isinstance(value, (bool, np.bool_)):
            kind = "bool"
        elif isinstance(value, (int, np.integer)):
            kind = "int"
        elif isinstance(value, (float, np.floating)):
            kind = "real"
        else:
            kind = "str"
    converters = {"int": int, "real": float, "bool": bool, "str": str}
    if kind not in converters:
        raise ValueError(f"unknown keyword kind {kind!r}")
    header.set(hierarch(key), converters[kind](value), comment)


def check_keyword_types(header: fits.Header, path: Path | str, where: str = "",
                        ints: Sequence[str] = (), reals: Sequence[str] = (),
                        strings: Sequence[str] = ()) -> None:
    """Raise InputError when a required keyword is missing or has the wrong FITS type."""
    problems = []
    for keys, ok, what in ((ints, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                           (reals, lambda v: isinstance(v, float), "a real number (with a decimal point)"),
                           (strings, lambda v: isinstance(v, str), "a string")):
        for key in keys:
            if key not in header:
                problems.append(f"{key} is missing")
            elif not ok(header[key]):
                problems.append(f"{key} = {header[key]!r} is not {what}")
    if problems:
        raise InputError(f"{path}{where}: " + "; ".join(problems))


# --------------------------------------------------------------------------- image data

def image_values(hdu: fits.hdu.base._BaseHDU, path: Path | str = "") -> np.ndarray:
    """The scaled values of an image HDU opened by :func:`open_fits`, as a native array.

    BITPIX 16/32/64 with BSCALE 1 and BZERO 2**(bits-1) give uint16/uint32/uint64 (the
    FITS unsigned convention, exactly); other integer data keep their type; any other
    scaling gives float64 (float32 for 8/16-bit data); floats stay floats.  Only this
    HDU's data are read from the file.
    """
    name = hdu.header.get("EXTNAME", "primary")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = hdu.data
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"{path}[{name}]: cannot read the image data ({err})") from None
    if raw is None:
        raise InputError(f"{path}[{name}]: HDU holds no image data")
    if not isinstance(raw, np.ndarray) or raw.dtype.fields is not None:
        raise InputError(f"{path}[{name}]: HDU is not an image")
    bscale = hdu.header.get("BSCALE", 1)
    bzero = hdu.header.get("BZERO", 0)
    native = raw.dtype.newbyteorder("=")
    if bscale == 1 and bzero == 0:
        return np.array(raw, dtype=native)
    if raw.dtype.kind == "i" and bscale == 1 and bzero == 2 ** (8 * raw.dtype.itemsize - 1):
        unsigned = raw.astype(native).view(native.str.replace("i", "u"))  # one native copy
        unsigned ^= unsigned.dtype.type(1 << (8 * raw.dtype.itemsize - 1))  # + BZERO, exactly
        return unsigned
    if raw.dtype.kind == "u" and raw.dtype.itemsize == 1 and bscale == 1 and bzero == -128:
        return (raw.astype(np.int16) - 128).astype(np.int8)
    out_type = np.float32 if raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2 else np.float64
    if raw.dtype.kind == "f":
        out_type = native
    return (raw.astype(np.float64) * bscale + bzero).astype(out_type)


def _read_image_hdu(hdul: fits.HDUList, index: int, path: Path | str, dtype) -> np.ndarray:
    hdu = _hdu(hdul, index, path)
    values = image_values(hdu, path)
    if values.ndim != 2:
        raise InputError(f"{path}[{hdu.header.get('EXTNAME', index)}]: expected a 2D image, "
                         f"found {values.ndim} axes")
    return values if dtype is None else values.astype(dtype, copy=False)


def _read_dq(hdul: fits.HDUList, index: int, path: Path | str) -> np.ndarray:
    """DQ as uint32 bits; stored int32 (CPL_TYPE_INT) is reinterpreted bit for bit."""
    values = _read_image_hdu(hdul, index, path, None)
    if values.dtype == np.uint32:
        return values
    if values.dtype.kind == "f":
        values = values.astype(np.int64)
    return values.astype(np.int32).view(np.uint32)


# --------------------------------------------------------------------------- readers

@reader
def read_raw_ifu(path: str | os.PathLike, ifu: int, check_keywords: bool = True) -> RawImage:
    """One IFU of a raw exposure (SKYFLAT, ILLUM): untrimmed integer CCD and merged header.

    The IFU's HDU is the first one named ``CHANnn`` (the primary of a per-IFU file counts);
    a file without it is an error (``muse_basicproc_load_raw``).  The header is the primary
    header updated with that extension's keywords (XTENSION/CHECKSUM/DATASUM and the
    other structural keywords skipped) and ``BUNIT = 'adu'`` (``muse_image_load_from_raw``).
    With ``check_keywords`` the detector keywords the basic processing needs (binning,
    port geometry, gains, chip name/id) must exist with their CPL types.
    """
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        index = ifu_extension(hdul, ifu, file_path)
        if index is None:
            raise InputError(f"{file_path}: does not contain data from IFU {ifu} (no CHAN{ifu:02d} extension)")
        primary = _hdu(hdul, 0, file_path).header
        hdu = _hdu(hdul, index, file_path)
        header = merge_headers(primary, hdu.header) if index > 0 else _strip_structural(primary)
        data = _read_image_hdu(hdul, index, file_path, None)
    header.set("BUNIT", "adu", "DATA is in analog-to-digital units")
    if check_keywords:
        check_keyword_types(header, file_path, f"[CHAN{ifu:02d}]", RAW_INT_KEYS, RAW_REAL_KEYS, RAW_STRING_KEYS)
        for key in ("ESO DET BINX", "ESO DET BINY"):
            if header[key] <= 0:
                raise InputError(f"{file_path}[CHAN{ifu:02d}]: {key} = {header[key]} must be positive")
    return RawImage(data=data, header=header, path=file_path, ifu=ifu)


@reader
def read_muse_image(path: str | os.PathLike, ifu: int | None = None) -> MuseImage:
    """A MUSE image (MASTER_BIAS/DARK/FLAT, ...) from a per-IFU or a merged file.

    As ESO's basic processing: first the per-IFU layout (extensions ``DATA``, ``DQ``,
    ``STAT``; header = primary header + BUNIT of DATA), then, if the file has no ``DATA``
    extension and ``ifu`` is given, the merged layout (``CHANnn.DATA/DQ/STAT``; header =
    primary header with ``EXTNAME = 'CHANnn'``, BUNIT and the ``ESO`` keywords of
    ``CHANnn.DATA`` that the primary does not have: CPL appends them and the first
    occurrence wins).  A missing DQ or STAT extension is an error, as in ESO; a missing
    BUNIT only a warning.  DATA/STAT come as float32, DQ as uint32.
    """
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        primary = _hdu(hdul, 0, file_path).header
        header = _strip_structural(primary)
        names = {kind: kind for kind in (EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT)}
        data_index = find_extension(hdul, EXTNAME_DATA, file_path)
        merged = data_index is None
        if merged:
            if ifu is None:
                raise InputError(f"{file_path}: no DATA extension (and no IFU given to look for CHANnn.DATA)")
            names = {kind: f"CHAN{ifu:02d}.{kind}" for kind in names}
            data_index = find_extension(hdul, names[EXTNAME_DATA], file_path)
            if data_index is None:
                raise InputError(f"{file_path}: neither a DATA nor a {names[EXTNAME_DATA]} extension")
            header.set("EXTNAME", f"CHAN{ifu:02d}")
        data_header = _hdu(hdul, data_index, file_path).header
        if "BUNIT" in data_header:
            if "BUNIT" not in header:
                header.set("BUNIT", data_header["BUNIT"], data_header.comments["BUNIT"])
        else:
            log.warning("No BUNIT given in extension %d [%s] of \"%s\"!", data_index, names[EXTNAME_DATA], file_path)
        if merged:
            for card in data_header.cards:
                if card.keyword.startswith("ESO ") and card.keyword not in header:
                    header.append(fits.Card(hierarch(card.keyword), card.value, card.comment), end=True)
        data = _read_image_hdu(hdul, data_index, file_path, np.float32)
        indices = {}
        for kind in (EXTNAME_DQ, EXTNAME_STAT):
            indices[kind] = find_extension(hdul, names[kind], file_path)
            if indices[kind] is None:
                raise InputError(f"{file_path}: could not load extension {names[kind]} (missing)")
        dq = _read_dq(hdul, indices[EXTNAME_DQ], file_path)
        stat = _read_image_hdu(hdul, indices[EXTNAME_STAT], file_path, np.float32)
    if dq.shape != data.shape or stat.shape != data.shape:
        raise InputError(f"{file_path}: DATA {data.shape}, DQ {dq.shape} and STAT {stat.shape} differ in size")
    return MuseImage(data=data, dq=dq, stat=stat, header=header, path=file_path)


def _table_from_hdu(hdu, path: Path | str, index: int, primary: fits.Header) -> Table:
    name = hdu.header.get("EXTNAME", index)
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        raise InputError(f"{path}[{name}]: extension {index} is not a table")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = hdu.data
            columns = {}
            if records is not None:
                for colname in records.columns.names:
                    values = np.asarray(records[colname])
                    if values.dtype.kind not in "OSU":
                        values = values.astype(values.dtype.newbyteorder("="), copy=True)
                    columns[colname] = values
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"{path}[{name}]: cannot read the table ({err})") from None
    table = Table(columns, copy=False)
    header = primary.copy(strip=True)
    if "EXTNAME" in hdu.header and "EXTNAME" not in header:
        header.set("EXTNAME", hdu.header["EXTNAME"])
    table.meta.update(path=Path(path), extension=index, extname=hdu.header.get("EXTNAME"), header=header,
                      tforms={c.name: c.format for c in hdu.columns})
    return table


@reader
def read_ifu_table(path: str | os.PathLike, ifu: int, tag: str | None = None) -> Table | None:
    """The table of one IFU (TRACE_TABLE, WAVECAL_TABLE): None when the file does not
    match that IFU under ESO's rule (:func:`find_ifu_hdu`).

    As ``muse_table_load``: the extension named ``CHANnn`` for the IFU, else extension 1
    (generic files and per-IFU files with ``CHANnn`` in the primary).  An empty table or
    one that cannot be read is an InputError (ESO: "Calibrations could not be loaded").
    """
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        index = find_ifu_hdu(hdul, ifu, file_path, tag)
        if index is None:
            return None
        if index == 0:
            index = 1
        primary = _hdu(hdul, 0, file_path).header
        try:
            hdu = _hdu(hdul, index, file_path)
        except IndexError:
            raise InputError(f"{file_path}: no table extension for IFU {ifu}") from None
        table = _table_from_hdu(hdu, file_path, index, primary)
    if len(table) == 0:
        raise InputError(f"{file_path}[{table.meta['extname'] or index}]: table for IFU {ifu} has no rows")
    return table


def cpl_column_type(tform: str) -> str:
    """The CPL column type ``cpl_table_load`` gives a FITS binary-table TFORM
    ("int" for L/B/I/J, "long long" for K, "float", "double", "string", ...)."""
    code = re.sub(r"^\d*", "", tform.strip()).upper()[:1]
    return {"L": "int", "X": "int", "B": "int", "I": "int", "J": "int", "K": "long long", "E": "float",
            "D": "double", "C": "float complex", "M": "double complex", "A": "string",
            "P": "array", "Q": "array"}.get(code, "unknown")


def _check_columns(table: Table, required: Sequence[tuple[str, str]], where: str) -> None:
    """ESO's ``muse_cpltable_check``: each column present, CPL type exact, no arrays."""
    problems = []
    tforms = table.meta["tforms"]
    for name, cpl_type in required:
        if name not in table.colnames:
            problems.append(f"column '{name}' not found")
            continue
        tform = tforms[name]
        repeat = re.match(r"^\d*", tform.strip()).group(0)
        found = cpl_column_type(tform)
        if found != cpl_type or (repeat not in ("", "1") and found != "string"):
            problems.append(f"column '{name}' format '{tform}' ({found}) is not '{cpl_type}'")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))


@reader
def read_geometry_table(path: str | os.PathLike) -> Table:
    """The GEOMETRY_TABLE (extension 1, or a ``CHAN00`` extension as ESO's lookup for
    "IFU 0"), with the columns the pixel table reads: SubField, SliceCCD, SliceSky (int),
    x, y, angle, width (double).  Extra columns are kept."""
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        index = ifu_extension(hdul, 0, file_path) or 1
        primary = _hdu(hdul, 0, file_path).header
        try:
            hdu = _hdu(hdul, index, file_path)
        except IndexError:
            raise InputError(f"{file_path}: GEOMETRY_TABLE has no table extension") from None
        table = _table_from_hdu(hdu, file_path, index, primary)
    if len(table) == 0:
        raise InputError(f"{file_path}: GEOMETRY_TABLE has no rows")
    _check_columns(table, GEOMETRY_COLUMNS, f"{file_path}[{index}]")
    return table


@reader
def read_badpix_table(path: str | os.PathLike, ifu: int) -> Table | None:
    """The bad pixels of one IFU from a BADPIX_TABLE file; None when not applicable.

    As ``muse_basicproc_apply_badpix``: the file must match the IFU (:func:`find_ifu_hdu`)
    and the table is the extension with EXTNAME exactly ``CHANnn``; a file without it is
    skipped (None).  Columns xpos, ypos, status (CPL int: FITS B/I/J) and value (float:
    FITS E) are required with exactly these types (InputError otherwise; ESO skips such
    a table).  xpos/ypos are 1-based positions in the untrimmed raw frame.
    """
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        if find_ifu_hdu(hdul, ifu, file_path) is None:
            return None
        index = find_extension(hdul, f"CHAN{ifu:02d}", file_path)
        if index is None:
            return None
        primary = _hdu(hdul, 0, file_path).header
        table = _table_from_hdu(_hdu(hdul, index, file_path), file_path, index, primary)
    _check_columns(table, BADPIX_COLUMNS, f"{file_path}[CHAN{ifu:02d}]")
    return table


@reader
def read_vignetting_mask(path: str | os.PathLike) -> MuseMask:
    """The VIGNETTING_MASK: a 2D integer image in the primary HDU, non-zero = masked
    (``muse_mask_load`` / ``cpl_mask_load``: float images are rejected)."""
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        hdu = _hdu(hdul, 0, file_path)
        if hdu.header.get("NAXIS", 0) != 2:
            raise InputError(f"{file_path}: VIGNETTING_MASK needs a 2D image in the primary HDU, "
                             f"found NAXIS = {hdu.header.get('NAXIS', 0)}")
        if hdu.header.get("BITPIX") not in (8, 16, 32, 64):
            raise InputError(f"{file_path}: VIGNETTING_MASK must be an integer image, found BITPIX = "
                             f"{hdu.header.get('BITPIX')}")
        values = image_values(hdu, file_path)
        header = _strip_structural(hdu.header)
    return MuseMask(mask=values != 0, header=header, path=file_path)


# --------------------------------------------------------------------------- writers

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


def _hdu_class(header: fits.Header, class2: str, dq: str | None, stat: str | None,
               data: str = EXTNAME_DATA) -> None:
    """ESO data-format keywords of one image extension (``muse_utils_set_hduclass``)."""
    header.set("HDUCLASS", "ESO", "class name (ESO format)")
    header.set("HDUDOC", "DICD", "document with class description")
    header.set("HDUVERS", "DICD version 6", "version number (according to spec v2.5.1)")
    header.set("HDUCLAS1", "IMAGE", "Image data format")
    if class2 == "DATA":
        header.set("HDUCLAS2", "DATA", "this extension contains the data itself")
        if stat:
            header.set("ERRDATA", stat, "pointer to the variance extension")
        if dq:
            header.set("QUALDATA", dq, "pointer to the bad pixel mask extension")
    elif class2 == "ERROR":
        header.set("HDUCLAS2", "ERROR", "this extension contains variance")
        header.set("HDUCLAS3", "MSE", "the extension contains variances (sigma**2)")
        header.set("SCIDATA", data, "pointer to the data extension")
        if dq:
            header.set("QUALDATA", dq, "pointer to the bad pixel mask extension")
    else:
        header.set("HDUCLAS2", "QUALITY", "this extension contains bad pixel mask")
        header.set("HDUCLAS3", "FLAG32BIT", "extension contains 32bit Euro3D bad pixel information")
        header.set("QUALMASK", 0xFFFFFFFF, "all non-zero values are bad")
        header.set("SCIDATA", data, "pointer to the data extension")
        if stat:
            header.set("ERRDATA", stat, "pointer to the variance extension")


def primary_header_for_image(header: fits.Header) -> fits.Header:
    """The primary header ESO writes for an image: without BUNIT, WCS and HDU-class
    keywords and without structural keywords (``muse_image_save``)."""
    out = _strip_structural(header)
    for key in list(out.keys()):
        if key == "BUNIT" or WCS_KEY_PATTERN.search(key) or HDU_CLASS_KEY_PATTERN.search(key):
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
        if WCS_KEY_PATTERN.search(card.keyword):
            base.set(card.keyword, card.value, card.comment)
    unit = image.header.get("BUNIT")
    unit_comment = image.header.comments["BUNIT"] if unit is not None else None

    data_header = base.copy()
    data_header.set("EXTNAME", names[EXTNAME_DATA], "This extension contains data values")
    if unit is not None:
        data_header.set("BUNIT", unit, unit_comment)
    _hdu_class(data_header, "DATA", names[EXTNAME_DQ], names[EXTNAME_STAT], names[EXTNAME_DATA])
    if data_keywords is not None:
        for card in data_keywords.cards:
            if card.keyword not in STRUCTURAL_KEYS and not _NAXIS.match(card.keyword):
                data_header.set(hierarch(card.keyword), card.value, card.comment)

    dq_header = base.copy()
    dq_header.set("EXTNAME", names[EXTNAME_DQ], "This extension contains bad pixel status values")
    _hdu_class(dq_header, "QUALITY", names[EXTNAME_DQ], names[EXTNAME_STAT], names[EXTNAME_DATA])

    stat_header = base.copy()
    stat_header.set("EXTNAME", names[EXTNAME_STAT], "This extension contains data variance")
    if unit is not None:
        stat_header.set("BUNIT", f"({unit})**2")
    _hdu_class(stat_header, "ERROR", names[EXTNAME_DQ], names[EXTNAME_STAT], names[EXTNAME_DATA])

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
