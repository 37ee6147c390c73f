"""Readers of the MUSE file formats (the input edge of the package).

Every reader returns the containers of :mod:`musetwilight.core.images` or astropy
tables, and follows
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
* Archive files are read as ESO (CFITSIO) reads them: tile-compressed images
  (``.fits.fz``, fpack / astropy ``CompImageHDU``, RICE or GZIP tiles) give the same
  values as the uncompressed file, and a gzipped file (``.fits.gz``) is read whole.

Tables are returned as :class:`astropy.table.Table` with plain (unmasked),
native-byte-order NumPy columns in file order; ``table.meta`` holds ``path``,
``extension`` (HDU index), ``extname`` and ``header`` (the primary header, plus the
extension's EXTNAME when the primary has none, as ESO's ``muse_table_load``).

Every problem with an input file raises :class:`musetwilight.errors.InputError`
naming the file: the public readers are wrapped by :func:`reader`, files are checked
for truncation and trailing garbage while their HDUs are walked, and absurd NAXIS or
TFIELDS counts (on which astropy would loop for ever) are refused before astropy
parses a header.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..core.images import MuseImage, MuseMask, RawImage
from ..errors import InputError
from ..headers import hierarch, is_structural, strip_structural
from ..instrument import header_ifu, ifu_of_extname

log = logging.getLogger(__name__)

EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT = "DATA", "DQ", "STAT"
# tags whose files match every IFU (muse_frameset_find)
IFU_INDEPENDENT_TAGS = ("GEOMETRY_TABLE", "TWILIGHT_CUBE")

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
    """Open a FITS file lazily (each HDU's data read when used, into memory of its own rather
    than a file mapping that would stay resident until the file is closed); failures become
    InputError naming the file.

    Image data come unscaled (``do_not_scale_image_data``): use :func:`image_values`.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise InputError(f"{file_path}: file does not exist")
    _check_header_counts(file_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdul = fits.open(file_path, memmap=False, do_not_scale_image_data=True, mode="readonly")
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise InputError(f"{file_path}: not a readable FITS file ({err})") from None
    try:
        yield hdul
    finally:
        hdul.close()


_BLOCK = 2880
_COUNT_KEYS = {b"NAXIS   ": "NAXIS", b"TFIELDS ": "TFIELDS"}


def is_gzipped(path: str | os.PathLike) -> bool:
    """Whether the file is gzip-compressed (magic bytes 1f 8b, whatever its name)."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


@functools.lru_cache(maxsize=64)
def _gunzipped_size(path: str, mtime_ns: int, size: int) -> int:
    with gzip.open(path, "rb") as handle:
        total = 0
        while chunk := handle.read(1 << 24):
            total += len(chunk)
    return total


def file_size(path: str | os.PathLike) -> int:
    """Size of the FITS stream in bytes: of the decompressed stream for a gzipped file."""
    stat = os.stat(path)
    if not is_gzipped(path):
        return stat.st_size
    try:
        return _gunzipped_size(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"{path}: corrupt gzipped FITS file ({err})") from None


def _check_header_counts(path: Path) -> None:
    """Reject NAXIS or TFIELDS outside 0..999 (the FITS limit) before astropy parses a header:
    astropy loops over that many keywords, so a corrupt count of 10^9 would hang the run.

    Walks the headers in the raw bytes (of the decompressed stream for a gzipped file,
    skipping data units); anything it cannot follow is left to astropy, which reports it.
    """
    gzipped = is_gzipped(path)
    size = file_size(path)
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
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
            for name in _COUNT_KEYS.values():
                if name in values and not 0 <= values[name] <= 999:
                    raise InputError(f"{path}: corrupt FITS header of HDU {index}: {name} = {values[name]} "
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


def stored_header(hdu: fits.hdu.base._BaseHDU) -> fits.Header:
    """The header as stored in the file: a tile-compressed image's binary-table header
    (``ZBITPIX``, ``ZNAXISn``, the heap in ``PCOUNT``), else the HDU's own header."""
    if isinstance(hdu, fits.CompImageHDU):
        table = getattr(hdu, "_bintable", None)
        if table is not None:
            return table.header
    return hdu.header


def _hdu(hdul: fits.HDUList, index: int, path: str | os.PathLike) -> fits.hdu.base._BaseHDU:
    """HDU ``index``; a header that cannot be read (truncated file) is an InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hdul[index]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise InputError(f"{path}: cannot read the header of HDU {index} ({err})") from None


def iter_hdus(hdul: fits.HDUList, path: str | os.PathLike) -> Iterator[tuple[int, fits.hdu.base._BaseHDU]]:
    """(index, HDU) pairs, reading the headers one by one (lazily); a header announcing more
    data than the machine's memory is an InputError (:func:`check_data_size`)."""
    index = 0
    while True:
        try:
            hdu = _hdu(hdul, index, path)
        except IndexError:
            _check_complete(hdul, index - 1, path)
            return
        check_data_size(hdu.header, f"{path}: HDU {index}")
        yield index, hdu
        index += 1


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_data_size(header: fits.Header, where: str) -> None:
    """Refuse, before anything is allocated, an HDU whose header announces more data than this
    machine has memory (a corrupt or hostile NAXISn; a sparse file can even be that large)."""
    size = data_bytes(header)
    memory = physical_memory()
    if size > memory:
        dims = " x ".join(str(header.get(f"NAXIS{k}", 0)) for k in range(1, int(header.get("NAXIS", 0)) + 1))
        raise InputError(f"{where} announces {dims} values of BITPIX {header.get('BITPIX')} "
                         f"({size / 1e9:.1f} GB), more than the {memory / 1e9:.1f} GB of memory of this machine")


def _check_complete(hdul: fits.HDUList, last: int, path: str | os.PathLike) -> None:
    """After the last HDU astropy could read: bytes left over mean a truncated or corrupt
    HDU (astropy drops it with a warning only); a file shorter than the last HDU's data
    (padding not counted) is truncated."""
    if last < 0:
        return
    info = hdul.fileinfo(last)
    if not info or not info.get("filename"):
        return
    end = info["datLoc"] + info["datSpan"]
    size = file_size(info["filename"])
    if size > end:
        raise InputError(f"{path}: truncated or corrupt FITS file: {size - end} bytes after HDU {last} "
                         "do not form a complete HDU")
    needed = info["datLoc"] + data_bytes(stored_header(_hdu(hdul, last, path)))
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


def matching_hdu(headers: Iterable[fits.Header], ifu: int, tag: str | None = None) -> int | None:
    """The HDU index to use for ``ifu`` under ESO's frame-matching rule, None when the file
    does not match that IFU (``muse_frameset_find``, ``muse_utils_get_extension_for_ifu``).

    The file matches when an HDU (primary included) is named ``CHANnn`` for the IFU; then
    the first such index is returned.  Otherwise it matches (index 0 is returned) when the
    primary header names no IFU and has no ``PIPEFILE`` (a "generic" calibration), when
    ``ifu`` is 0, or when ``tag`` is GEOMETRY_TABLE or TWILIGHT_CUBE.  ``headers`` may be
    lazy: headers after the match are not read.
    """
    primary = None
    for index, header in enumerate(headers):
        if index == 0:
            primary = header
        if ifu_of_extname(header.get("EXTNAME")) == ifu:
            return index
    if primary is None:
        return None
    if ifu == 0 or tag in IFU_INDEPENDENT_TAGS:
        return 0
    if header_ifu(primary) is None and "PIPEFILE" not in primary:
        return 0
    return None


def _headers(hdul: fits.HDUList, path: str | os.PathLike) -> Iterator[fits.Header]:
    return (hdu.header for _, hdu in iter_hdus(hdul, path))


def ifu_extension(hdul: fits.HDUList, ifu: int, path: str | os.PathLike = "") -> int | None:
    """Index of the first HDU (primary = 0) whose EXTNAME names ``ifu``, else None."""
    for index, header in enumerate(_headers(hdul, path)):
        if ifu_of_extname(header.get("EXTNAME")) == ifu:
            return index
    return None


def find_ifu_hdu(hdul: fits.HDUList, ifu: int, path: Path | str = "", tag: str | None = None) -> int | None:
    """:func:`matching_hdu` of an open file."""
    return matching_hdu(_headers(hdul, path), ifu, tag)


@reader
def has_ifu_extension(path: str | os.PathLike, ifu: int) -> bool:
    """Whether an HDU of the file is named for ``ifu`` (what a raw exposure needs: a raw
    file matches every IFU by the generic rule, but ESO then fails to load a missing one,
    "does not contain data from IFU n", and skips that IFU)."""
    with open_fits(path) as hdul:
        return ifu_extension(hdul, ifu, path) is not None


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
    merged = strip_structural(primary)
    for card in extension.cards:
        key = card.keyword
        if is_structural(key):
            continue
        if key in ("COMMENT", "HISTORY", ""):
            merged.append(card, end=True)
        else:
            merged.set(hierarch(key), card.value, card.comment)
    return merged


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

def _detach(hdu: fits.hdu.base._BaseHDU, values: np.ndarray) -> bool:
    """Whether ``values`` (the HDU's data) may be changed in place: a writeable buffer of its
    own, not a file mapping, which the HDU is made to forget (a later access re-reads it)."""
    base: object = values
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap) or not base.flags.writeable:
            return False
        base = base.base
    if isinstance(base, mmap.mmap):
        return False
    try:
        del hdu.data
    except (AttributeError, TypeError):
        return False
    return True


def image_values(hdu: fits.hdu.base._BaseHDU, path: Path | str = "") -> np.ndarray:
    """The scaled values of an image HDU opened by :func:`open_fits`, as a native array.

    BITPIX 16/32/64 with BSCALE 1 and BZERO 2**(bits-1) give uint16/uint32/uint64 (the
    FITS unsigned convention, exactly); other integer data keep their type; any other
    scaling gives float64 (float32 for 8/16-bit data); floats stay floats.  Only this
    HDU's data are read from the file; where they are a private buffer they are converted
    in place (no second full-size copy) and the HDU forgets them.
    """
    name = hdu.header.get("EXTNAME", "primary")
    check_data_size(hdu.header, f"{path}[{name}]")
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
    exact_types = (bscale == 1 and bzero == 0) or (
        raw.dtype.kind == "i" and bscale == 1 and bzero == 2 ** (8 * raw.dtype.itemsize - 1))
    if exact_types:
        if _detach(hdu, raw):
            if not raw.dtype.isnative:
                raw.byteswap(inplace=True)
            raw = raw.view(native)
        else:
            raw = np.array(raw, dtype=native)
    if bscale == 1 and bzero == 0:
        return raw
    if raw.dtype.kind == "i" and bscale == 1 and bzero == 2 ** (8 * raw.dtype.itemsize - 1):
        unsigned = raw.view(native.str.replace("i", "u"))
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
        header = merge_headers(primary, hdu.header) if index > 0 else strip_structural(primary)
        data = _read_image_hdu(hdul, index, file_path, None)
    header.set("BUNIT", "adu", "DATA is in analog-to-digital units")
    if check_keywords:
        check_keyword_types(header, file_path, f"[CHAN{ifu:02d}]", RAW_INT_KEYS, RAW_REAL_KEYS, RAW_STRING_KEYS)
        for key in ("ESO DET BINX", "ESO DET BINY"):
            if header[key] <= 0:
                raise InputError(f"{file_path}[CHAN{ifu:02d}]: {key} = {header[key]} must be positive")
    return RawImage(data=data, header=header, path=file_path, ifu=ifu)


def muse_image_layout(headers: Sequence[fits.Header], ifu: int | None) -> tuple[str, int] | None:
    """Where a file keeps the MUSE image of ``ifu``: (EXTNAME prefix, index of its DATA HDU).

    The per-IFU layout (a ``DATA`` extension; prefix "") when the file is this IFU's or
    a generic one (:func:`matching_hdu`), else the merged layout (``CHANnn.DATA``; prefix
    ``"CHANnn."``); None when the file holds neither.
    """
    names = [str(h.get("EXTNAME", "")).rstrip() for h in headers]
    if EXTNAME_DATA in names[1:] and (ifu is None or matching_hdu(headers[:1], ifu) is not None
                                     or header_ifu(headers[0]) == ifu):
        return "", names.index(EXTNAME_DATA, 1)
    if ifu is not None and f"CHAN{ifu:02d}.{EXTNAME_DATA}" in names[1:]:
        return f"CHAN{ifu:02d}.", names.index(f"CHAN{ifu:02d}.{EXTNAME_DATA}", 1)
    return None


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
        headers = [hdu.header for _, hdu in iter_hdus(hdul, file_path)]
        found = muse_image_layout(headers, ifu)
        if found is None and ifu is None:
            raise InputError(f"{file_path}: no DATA extension (and no IFU given to look for CHANnn.DATA)")
        if found is None:
            raise InputError(f"{file_path}: holds no image of IFU {ifu} (neither a DATA extension for this "
                             f"IFU nor a CHAN{ifu:02d}.DATA extension)")
        prefix, data_index = found
        merged = bool(prefix)
        names = {kind: prefix + kind for kind in (EXTNAME_DATA, EXTNAME_DQ, EXTNAME_STAT)}
        header = strip_structural(headers[0])
        if merged:
            header.set("EXTNAME", prefix.rstrip("."))
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
        indices: dict[str, int] = {}
        for kind in (EXTNAME_DQ, EXTNAME_STAT):
            at = find_extension(hdul, names[kind], file_path)
            if at is None:
                raise InputError(f"{file_path}: could not load extension {names[kind]} (missing)")
            indices[kind] = at
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
        repeat = re.sub(r"\D.*", "", tform.strip())  # the leading repeat count
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
        header = strip_structural(hdu.header)
    return MuseMask(mask=values != 0, header=header, path=file_path)


@dataclass
class SkyflatCube:
    """A DATACUBE_SKYFLAT read back: cube, white-light image and headers."""

    cube: np.ndarray  # float32 (nz, ny, nx)
    white: np.ndarray | None  # the "white" extension, if it is the first collapsed image
    primary_header: fits.Header
    data_header: fits.Header  # the DATA extension header (cube WCS, BUNIT)
    path: Path


@reader
def read_datacube_skyflat(path: str | os.PathLike) -> SkyflatCube:
    """Read a DATACUBE_SKYFLAT as ESO's skip mode (MUSE_TWILIGHT_SKIP) does.

    The white-light image is the extension right after STAT when it is called
    ``white``; otherwise ``white`` is None and the smoothing collapses the cube (empty
    spaxels then hold 0 instead of NaN, as in ESO).
    """
    file_path = Path(path)
    with open_fits(file_path) as hdul:
        headers = [hdu.header for _, hdu in iter_hdus(hdul, file_path)]
        names = [str(h.get("EXTNAME", "")).strip() for h in headers]
        if "DATA" not in names[1:]:
            raise InputError(f"{file_path}: no DATA extension, not a MUSE cube")
        idata = names.index("DATA", 1)
        cube = image_values(hdul[idata], file_path)
        if cube.ndim != 3:
            raise InputError(f"{file_path}: DATA extension is not a 3D cube")
        # ESO looks for collapsed images after STAT (without STAT it starts at extension 1,
        # finds DATA first and collapses the cube itself)
        white = None
        if "STAT" in names[1:]:
            following = names.index("STAT", 1) + 1
            if following < len(names) and names[following] == "white":
                white = image_values(hdul[following], file_path).astype(np.float32)
        return SkyflatCube(cube=cube.astype(np.float32), white=white, primary_header=headers[0].copy(),
                           data_header=headers[idata].copy(), path=file_path)
