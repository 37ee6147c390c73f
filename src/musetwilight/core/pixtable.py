"""The pixel table of one IFU, built as ESO's ``muse_pixtable_create`` builds it.

Every CCD pixel that lies inside a slice becomes one table row with its field
position (``xpos``, ``ypos``, in nominal spaxels of the geometry table), its
wavelength (``lambda``, Angstrom, air), its value, quality and variance, and
an ``origin`` bit field that records where on which CCD it came from.

Facts (ESO MUSE 2.8.7, ``muse_pixtable.c``, ``muse_tracing.c``,
``muse_wavecalib.c``, ``muse_geo.c``, ``muse_basicproc.c``):

* Slices are handled in CCD order 1..48, rows bottom to top, pixels left to
  right.  In row ``j`` (1-based) the slice covers the columns
  ``ceil(xl) .. floor(xr)`` of the left/right edge polynomials
  ``x(j) = sum_k tcE_0k j**k`` (E = 1 left, 2 right).  If an edge is not a
  normal number, ``xl < 1``, ``xr > nx`` or ``xl > xr``, ESO warns "faulty
  polynomial" and drops the rest of that slice from that row upwards.
* ``lambda = sum wlcXY x**X y**Y`` (absolute CCD column/row); pixels outside
  3000..11000 Angstrom (or not finite) are skipped.  The polynomial must give a
  normal, non-zero value at (2056, 2056), otherwise the whole table fails.
* With ``xc = (xl+xr)/2``, ``w = xr-xl``: ``dx = float32((xc - i)/w * width)``,
  ``xpos = dx cos(angle) + x``, ``ypos = dx sin(angle) + y`` from the
  geometry row of that CCD slice (rows of the IFU sorted by SliceCCD).
* ``origin = (i - off) << 24 | j << 11 | ifu << 6 | slice`` with the per-slice
  offset ``off = floor(xl(1)) - 20`` stored as the header keyword
  ``ESO DRS MUSE PIXTABLE EXP0 IFUnn SLICEnn XOFFSET``.
* AO modes flag the NaD notch range by *setting* dq to ``1 << 27``
  (``lmin < lambda < lmax``, float32 comparison).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from numba import njit

from ..errors import InputError
from ..headers import WCS_KEYS
from ..instrument import NUM_IFUS, NUM_SLICES, Euro3D, header_ifu, is_ao, notch_range

log = logging.getLogger(__name__)

LAMBDA_MIN_VALID = 3000.0
LAMBDA_MAX_VALID = 11000.0
WAVE_TEST_POSITION = 2056.0  # kMuseOutputYTop / 2
SLICE_SAFETY_OFFSET = -20
NOMINAL_SLICE_WIDTH = 75.0  # slice width of the geometry-less "SIMPLE" table
HI_LIKELY_SLICE_WIDTH = np.float32(82.2)  # slice spacing of ESO's geometry-less table
RAD_PER_DEG = 0.017453292519943295769236907684886127134

SHIFT_X = 24
SHIFT_Y = 11
SHIFT_IFU = 6

KEY_TYPE = "ESO DRS MUSE PIXTABLE TYPE"
KEY_XOFFSET = "ESO DRS MUSE PIXTABLE EXP{exp} IFU{ifu:02d} SLICE{slice:02d} XOFFSET"
KEY_LIMITS = "ESO DRS MUSE PIXTABLE LIMITS "

# Keywords ESO removes when it copies the image header into the table header
# (muse_pixtable_create: fixed list, ESO DRS MUSE OVSC*, MUSE_WCS_KEYS).  Note
# that "^WCSAXES[ A-Z]" does not match a plain WCSAXES, which therefore stays.
_DROP_KEYS = re.compile(
    r"^SIMPLE$|^BITPIX$|^NAXIS|^EXTEND$|^XTENSION$|^DATASUM$|^DATAMIN$|^DATAMAX$|"
    r"^DATAMD5$|^PCOUNT$|^GCOUNT$|^HDUVERS$|^BLANK$|^BZERO$|^BSCALE$|^BUNIT$|"
    r"^CHECKSUM$|^INHERIT$|^ESO DRS MUSE OVSC|" + WCS_KEYS.pattern
)

COLUMNS = ("xpos", "ypos", "lambda", "data", "dq", "stat", "origin")
COLUMN_UNITS = {"xpos": "pix", "ypos": "pix", "lambda": "Angstrom", "data": "count",
                "stat": "count**2"}


@dataclass
class PixTable:
    """A MUSE pixel table: one row per CCD pixel inside a slice.

    ``xpos``/``ypos`` are field positions in nominal spaxels ("pix", the units
    of the geometry table, relative to the field centre), ``lambda_`` is the air
    wavelength in Angstrom, ``data``/``stat`` are in count / count**2.
    """

    xpos: np.ndarray  # float32
    ypos: np.ndarray  # float32
    lambda_: np.ndarray  # float32
    data: np.ndarray  # float32
    stat: np.ndarray  # float32
    dq: np.ndarray  # uint32 Euro3D bits
    origin: np.ndarray | None  # uint32 bit field (see tools.eso.decode_origin); None when not needed
    header: fits.Header
    limits: tuple[float, float, float, float, float, float] | None = None  # x, y, lambda min/max of the rows

    @property
    def nrow(self) -> int:
        return int(self.xpos.shape[0])

    def column(self, name: str) -> np.ndarray:
        """The column by its FITS name (``lambda`` maps to ``lambda_``)."""
        return getattr(self, "lambda_" if name == "lambda" else name)

    @property
    def nbytes(self) -> int:
        return sum(self.column(name).nbytes for name in COLUMNS if self.column(name) is not None)


# --------------------------------------------------------------------------
# calibration tables


def _colnames(table: Any) -> list[str]:
    """Column names in file order of an astropy Table, FITS_rec or structured array."""
    names = getattr(table, "colnames", None)
    if names is None:
        names = table.dtype.names
    return list(names)


def _column(table: Any, name: str) -> np.ndarray:
    """Column values as float64, masked (NULL) entries as NaN."""
    col = table[name]
    if np.ma.isMaskedArray(col) or hasattr(col, "mask"):
        return np.ma.filled(np.ma.asarray(col).astype(np.float64), np.nan)
    return np.asarray(col, dtype=np.float64)


def _find_slice_rows(table: Any, what: str) -> np.ndarray:
    """Row index of slices 1..48 (first row whose SliceNo matches, -1 if none)."""
    if "SliceNo" not in _colnames(table):
        raise InputError(f"{what} has no SliceNo column")
    numbers = _column(table, "SliceNo")
    rows = np.full(NUM_SLICES, -1, dtype=np.int64)
    for islice in range(NUM_SLICES):
        hits = np.flatnonzero(numbers == islice + 1)
        if hits.size:
            rows[islice] = hits[0]
    return rows


def trace_order(trace: Any) -> int:
    """Polynomial order of a TRACE_TABLE from its number of columns (ESO's rule)."""
    return (len(_colnames(trace)) - 2) // 3 - 2


def trace_edges(trace: Any, ifu: int) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edge coefficients ``[48, order+1]`` (lowest power first).

    Rows of slices that are missing or have NULL coefficients are NaN.
    """
    order = trace_order(trace)
    if order < 0:
        raise InputError(f"TRACE_TABLE of IFU {ifu} has too few columns ({len(_colnames(trace))})")
    names = _colnames(trace)
    rows = _find_slice_rows(trace, f"TRACE_TABLE of IFU {ifu}")
    edges = []
    for edge in (1, 2):
        coeffs = np.full((NUM_SLICES, order + 1), np.nan)
        for k in range(order + 1):
            name = f"tc{edge}_{k:02d}"
            if name not in names:
                raise InputError(f"TRACE_TABLE of IFU {ifu} has no column {name}")
            values = _column(trace, name)
            present = rows >= 0
            coeffs[present, k] = values[rows[present]]
        edges.append(coeffs)
    return edges[0], edges[1]


def wavecal_orders(wavecal: Any) -> tuple[int, int]:
    """(xorder, yorder) parsed from the second-to-last column name (``wlcXY``)."""
    names = _colnames(wavecal)
    if len(names) < 2:
        raise InputError("WAVECAL_TABLE has fewer than two columns")
    name = names[-2]
    match = re.match(r"^wlc(\d)(\d)", name)
    if not match:
        raise InputError(f"WAVECAL_TABLE: second-to-last column {name!r} is no wlcXY coefficient")
    return int(match.group(1)), int(match.group(2))


def wavecal_coefficients(wavecal: Any, ifu: int) -> np.ndarray:
    """Coefficients ``[48, xorder+1, yorder+1]`` of lambda(x, y); NaN for missing slices."""
    xorder, yorder = wavecal_orders(wavecal)
    names = _colnames(wavecal)
    rows = _find_slice_rows(wavecal, f"WAVECAL_TABLE of IFU {ifu}")
    present = rows >= 0
    coeffs = np.full((NUM_SLICES, xorder + 1, yorder + 1), np.nan)
    for ix in range(xorder + 1):
        for iy in range(yorder + 1):
            name = f"wlc{ix}{iy}"
            if name not in names:
                raise InputError(f"WAVECAL_TABLE of IFU {ifu} has no column {name}")
            coeffs[present, ix, iy] = _column(wavecal, name)[rows[present]]
    return coeffs


def geometry_for_ifu(geometry: Any, ifu: int) -> dict[str, np.ndarray]:
    """x, y, angle [deg], width of the 48 slices of one IFU, sorted by SliceCCD."""
    names = _colnames(geometry)
    for name in ("SubField", "SliceCCD"):
        if name not in names:
            raise InputError(f"GEOMETRY_TABLE has no column {name}")
    field = _column(geometry, "SubField")
    rows = np.flatnonzero(field == ifu)
    if rows.size != NUM_SLICES:
        raise InputError(f"GEOMETRY_TABLE contains {rows.size} instead of {NUM_SLICES} slices "
                         f"for IFU {ifu}")
    rows = rows[np.argsort(_column(geometry, "SliceCCD")[rows], kind="stable")]
    missing = [name for name in ("x", "y", "angle", "width") if name not in names]
    if missing:
        raise InputError("GEOMETRY_TABLE is missing column(s) " + ", ".join(missing))
    return {name: _column(geometry, name)[rows] for name in ("x", "y", "angle", "width")}


# --------------------------------------------------------------------------
# numerics


def _horner(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """sum_k coeffs[k] x**k, evaluated like cpl_polynomial_eval_1d (Horner)."""
    result = np.full_like(x, coeffs[-1], dtype=np.float64)
    for c in coeffs[-2::-1]:
        result = result * x + c
    return result


def _normal(x: np.ndarray) -> np.ndarray:
    """C isnormal(): finite, non-zero and not subnormal."""
    ax = np.abs(x)
    return np.isfinite(x) & (ax >= np.finfo(np.float64).tiny)


def slice_edges(left: np.ndarray, right: np.ndarray, nx: int, ny: int,
                ifu: int, islice: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges xl, xr of one slice for rows 1..n, cut at the first faulty row."""
    rows = np.arange(1, ny + 1, dtype=np.float64)
    xl = _horner(left, rows)
    xr = _horner(right, rows)
    bad = ~_normal(xl) | ~_normal(xr) | (xl < 1) | (xr > nx) | (xl > xr)
    if bad.any():
        first = int(np.argmax(bad))
        log.warning("slice %2d of IFU %d: faulty polynomial detected at y=%d "
                    "(borders: %f ... %f)", islice + 1, ifu, first + 1, xl[first], xr[first])
        xl, xr = xl[:first], xr[:first]
    return xl, xr


@njit(cache=True, nogil=True)
def _fill_slice(xl, xr, wave, gx, gy, cosa, sina, width, ifu, slice_no, offset,
                img_data, img_dq, img_stat, use_geometry, simple_a, simple_b, lmin, lmax, with_origin,
                xpos, ypos, lam, data, dq, stat, origin, start):
    """Write the rows of one slice from table row ``start``; return the next free row.

    Only rows with lmin <= lambda <= lmax (float32 comparison, as ESO's wavelength cut) are
    written; the origin bits only ``with_origin``."""
    nxw = wave.shape[0]
    nyw = wave.shape[1]
    cx = np.empty(nxw)
    k = start
    for jj in range(xl.shape[0]):
        j = jj + 1
        x1 = xl[jj]
        x2 = xr[jj]
        xc = (x1 + x2) / 2.0
        w = x2 - x1
        # coefficients of lambda as a polynomial in x for this row
        for ix in range(nxw):
            c = wave[ix, nyw - 1]
            for iy in range(nyw - 2, -1, -1):
                c = c * j + wave[ix, iy]
            cx[ix] = c
        ileft = int(math.ceil(x1))
        iright = int(math.floor(x2))
        ybits = np.uint32(j) << np.uint32(SHIFT_Y)
        base = ybits | (np.uint32(ifu) << np.uint32(SHIFT_IFU)) | np.uint32(slice_no)
        for i in range(ileft, iright + 1):
            lval = cx[nxw - 1]
            for ix in range(nxw - 2, -1, -1):
                lval = lval * i + cx[ix]
            if not (lval >= LAMBDA_MIN_VALID and lval <= LAMBDA_MAX_VALID):
                continue
            lam32 = np.float32(lval)
            if not (lam32 >= lmin and lam32 <= lmax):
                continue
            dxf = np.float32((xc - i) / w * width)
            dxd = np.float64(dxf)
            if use_geometry:
                xpos[k] = np.float32(dxd * cosa + gx)
                ypos[k] = np.float32(dxd * sina + gy)
            else:
                # ESO: float dx + float (islice * 82.2f), then + double 82.2f / 2
                xpos[k] = np.float32(np.float64(dxf + simple_a) + simple_b)
                ypos[k] = np.float32(0.0)
            lam[k] = lam32
            data[k] = img_data[j - 1, i - 1]
            dq[k] = np.uint32(img_dq[j - 1, i - 1])
            stat[k] = img_stat[j - 1, i - 1]
            if with_origin:
                xbits = (np.uint32((i - offset) & 0xFF)) << np.uint32(SHIFT_X)
                origin[k] = xbits | base
            k += 1
    return k


def _compact(array: np.ndarray, n: int) -> np.ndarray:
    """Shrink a freshly allocated column to n rows in place (no second copy)."""
    if array.shape[0] == n:
        return array
    try:
        array.resize(n, refcheck=False)
        return array
    except ValueError:
        return array[:n].copy()


# --------------------------------------------------------------------------
# building


def build_pixtable(image: Any, trace: Any, wavecal: Any, geometry: Any | None,
                   ifu: int | None = None, mode: str | None = None,
                   flag_notch: bool = True, lambda_range: tuple[float, float] | None = None,
                   with_origin: bool = True) -> PixTable:
    """Build the pixel table of one IFU from its processed CCD image.

    Parameters
    ----------
    image
        ``io.MuseImage`` (data float32, dq uint32, stat float32, header) of the
        trimmed CCD, in count.
    trace, wavecal
        TRACE_TABLE and WAVECAL_TABLE of this IFU (astropy Table, FITS_rec or
        structured array; column order as in the file matters, as in ESO).
    geometry
        The GEOMETRY_TABLE (all IFUs); ``None`` gives ESO's "SIMPLE" table
        (slices side by side, ypos = 0).
    ifu
        IFU number; default from the image header's ``EXTNAME = CHANnn``.
    mode
        ``ESO INS MODE``; default from the image header.  AO modes get the NaD
        notch range flagged when ``flag_notch`` is true.
    lambda_range
        Keep only the rows of this wavelength range (the recipe's cut, inclusive, compared
        in float32 as ESO's muse_pixtable_restrict_wavelength), instead of cutting later.
    with_origin
        Whether the table needs its origin column (only the ILLUM correction reads it).
    """
    header = image.header
    if ifu is None:
        ifu = header_ifu(header) or 0
    if not 1 <= ifu <= NUM_IFUS:
        raise InputError(f"no valid IFU number (EXTNAME CHANnn) for the pixel table: {ifu}")
    bunit = header.get("BUNIT")
    if bunit is None:
        raise InputError(f"Input data of IFU {ifu} does not contain a data unit (\"BUNIT\"), "
                         "cannot proceed!")
    if str(bunit) != "count":
        raise InputError(f"Input data of IFU {ifu} is not in \"count\" units but in "
                         f"\"{bunit}\", not suitable for a new pixel table!")

    ny, nx = image.data.shape
    left, right = trace_edges(trace, ifu)
    wave = wavecal_coefficients(wavecal, ifu)
    geo = geometry_for_ifu(geometry, ifu) if geometry is not None else None
    xorder, yorder = wave.shape[1] - 1, wave.shape[2] - 1
    log.info("Creating pixel table for IFU %d, using order %d for trace solution and orders "
             "%d/%d for wavelength solution", ifu, left.shape[1] - 1, xorder, yorder)

    out_header = _table_header(header, geometry is not None)

    # validate every slice and find its rows first, so that the table can be
    # allocated once at its final size (an upper bound: only the few pixels
    # outside 3000..11000 Angstrom are skipped later)
    edges = []
    for islice in range(NUM_SLICES):
        test = _lambda_at(wave[islice], WAVE_TEST_POSITION, WAVE_TEST_POSITION)
        if not (np.isfinite(test) and abs(test) >= np.finfo(np.float64).eps):
            raise InputError(f"Wavelength calibration polynomial for slice {islice + 1} of IFU "
                             f"{ifu} is not well defined!")
        if not np.all(np.isfinite(left[islice])) or not np.all(np.isfinite(right[islice])):
            raise InputError(f"Tracing polynomials for slice {islice + 1} of IFU {ifu} are not "
                             "well defined!")
        xl1 = _horner(left[islice], np.array([1.0]))[0]
        offset = (math.floor(xl1) if np.isfinite(xl1) else 0) + SLICE_SAFETY_OFFSET
        # ESO stores the unsigned offset with cpl_propertylist_update_int
        stored = int(np.array([offset & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)[0])
        out_header["HIERARCH " + KEY_XOFFSET.format(exp=0, ifu=ifu, slice=islice + 1)] = (
            stored, "x-offset of given slice in given IFU of given exposure")
        xl, xr = slice_edges(left[islice], right[islice], nx, ny, ifu, islice)
        edges.append((xl, xr, offset))
    nmax = sum(int(np.maximum(np.floor(xr) - np.ceil(xl) + 1, 0).sum()) for xl, xr, _ in edges)

    columns = {name: np.empty(nmax, dtype=np.float32) for name in ("xpos", "ypos", "lambda",
                                                                   "data", "stat")}
    columns["dq"] = np.empty(nmax, dtype=np.uint32)
    columns["origin"] = np.empty(nmax if with_origin else 0, dtype=np.uint32)
    lmin, lmax = (np.float32(v) for v in (lambda_range or (-np.inf, np.inf)))
    data = np.ascontiguousarray(image.data, dtype=np.float32)
    dqimg = as_uint32(image.dq)
    stat = np.ascontiguousarray(image.stat, dtype=np.float32)
    k = 0
    for islice, (xl, xr, offset) in enumerate(edges):
        if geo is not None:
            angle = geo["angle"][islice] * RAD_PER_DEG
            gx, gy, width = geo["x"][islice], geo["y"][islice], geo["width"][islice]
            cosa, sina = math.cos(angle), math.sin(angle)
        else:
            gx = gy = 0.0
            cosa, sina = 1.0, 0.0
            width = NOMINAL_SLICE_WIDTH
        simple_a = np.float32(np.float32(islice) * HI_LIKELY_SLICE_WIDTH)
        simple_b = float(np.float64(HI_LIKELY_SLICE_WIDTH) / 2.0)
        k = _fill_slice(xl, xr, np.ascontiguousarray(wave[islice]), float(gx), float(gy),
                        float(cosa), float(sina), float(width), ifu, islice + 1, offset,
                        data, dqimg, stat, geo is not None, simple_a, simple_b, lmin, lmax, with_origin,
                        columns["xpos"], columns["ypos"], columns["lambda"], columns["data"],
                        columns["dq"], columns["stat"], columns["origin"], k)
    for name in COLUMNS:
        if name != "origin" or with_origin:
            columns[name] = _compact(columns[name], k)

    table = PixTable(columns["xpos"], columns["ypos"], columns["lambda"], columns["data"],
                     columns["stat"], columns["dq"], columns["origin"] if with_origin else None, out_header)
    compute_limits(table)
    if mode is None:
        mode = str(header.get("ESO INS MODE", "WFM-NOAO-N"))
    if flag_notch and is_ao(mode):
        flag_nad_notch(table, mode, ifu)
    return table


def expected_rows(trace: Any, wavecal: Any, ifu: int, ccd_shape: tuple[int, int],
                  lambda_range: tuple[float, float]) -> int:
    """Rows of the IFU's pixel table after the wavelength cut, counted without building it.

    In every CCD row a slice covers ``ceil(xl) .. floor(xr)``; the row counts when the
    wavelength at the slice centre lies strictly inside ``lambda_range``.  A size
    estimate (for scratch space): exact up to the pixels of faulty trace rows and the
    variation of the wavelength across a slice; slices with undefined polynomials
    count nothing.
    """
    ny, nx = ccd_shape
    left, right = trace_edges(trace, ifu)
    wave = wavecal_coefficients(wavecal, ifu)
    rows = np.arange(1, ny + 1, dtype=np.float64)
    low, high = lambda_range
    total = 0
    for islice in range(NUM_SLICES):
        if not (np.isfinite(left[islice]).all() and np.isfinite(right[islice]).all()
                and np.isfinite(wave[islice]).all()):
            continue
        xl, xr = _horner(left[islice], rows), _horner(right[islice], rows)
        width = np.floor(np.minimum(xr, nx)) - np.ceil(np.maximum(xl, 1.0)) + 1
        centre = 0.5 * (xl + xr)
        lam = np.zeros_like(rows)
        for ix in range(wave.shape[1] - 1, -1, -1):
            lam = lam * centre + _horner(wave[islice, ix], rows)
        inside = (lam > low) & (lam < high) & (width > 0)
        total += int(width[inside].sum())
    return total


def _lambda_at(coeffs: np.ndarray, x: float, y: float) -> float:
    """lambda(x, y) of one slice's coefficient matrix [X, Y]."""
    cx = [_horner(coeffs[ix], np.array([y]))[0] for ix in range(coeffs.shape[0])]
    return float(_horner(np.array(cx), np.array([x]))[0])


def _table_header(image_header: fits.Header, full: bool) -> fits.Header:
    """Image header minus the keywords ESO drops, plus the table type."""
    out = fits.Header()
    for card in image_header.cards:
        if card.keyword in ("", "COMMENT", "HISTORY"):
            out.append(card, end=True)
            continue
        if _DROP_KEYS.search(card.keyword):
            continue
        out.append(card, end=True)
    if full:
        out["HIERARCH " + KEY_TYPE] = ("GEOFULL", "pixel table with full geometry information")
    else:
        out["HIERARCH " + KEY_TYPE] = ("SIMPLE", "pixel table without y coordinates")
    return out


def compute_limits(table: PixTable) -> None:
    """Write ESO's ``ESO DRS MUSE PIXTABLE LIMITS ...`` keywords (pixel coordinates)."""
    header = table.header
    for key in [k for k in header.keys() if k.startswith(KEY_LIMITS)]:
        del header[key]
    table.limits = None
    if table.nrow == 0:
        return
    table.limits = (float(table.xpos.min()), float(table.xpos.max()), float(table.ypos.min()),
                    float(table.ypos.max()), float(table.lambda_.min()), float(table.lambda_.max()))
    values = list(zip(("X LOW", "X HIGH", "Y LOW", "Y HIGH", "LAMBDA LOW", "LAMBDA HIGH"), table.limits))
    if table.origin is not None:
        ifus = (table.origin >> np.uint32(SHIFT_IFU)) & np.uint32(0x1F)
        slices = table.origin & np.uint32(0x3F)
        values += [("IFU LOW", int(ifus.min())), ("IFU HIGH", int(ifus.max())),
                   ("SLICE LOW", int(slices.min())), ("SLICE HIGH", int(slices.max()))]
    for name, value in values:
        header["HIERARCH " + KEY_LIMITS + name] = value


def flag_nad_notch(table: PixTable, mode: str, ifu: int = 0) -> int:
    """Set dq = NaD-notch bit (replacing other bits, as ESO) inside the notch range.

    Returns the number of flagged rows; 0 (with ESO's warning) in modes without
    a notch filter.
    """
    limits = notch_range(mode)
    if limits is None:
        log.warning("No notch filter for mode %s!", mode)
        return 0
    lmin, lmax = np.float32(limits[0]), np.float32(limits[1])
    log.info("%s mode: marking NaD region (%.1f..%.1f Angstrom) of IFU %d as 0x%08x",
             mode, lmin, lmax, ifu, int(Euro3D.NAD_NOTCH))
    inside = (table.lambda_ > lmin) & (table.lambda_ < lmax)
    table.dq[inside] = Euro3D.NAD_NOTCH
    return int(np.count_nonzero(inside))


# --------------------------------------------------------------------------
# origin


def as_uint32(values: np.ndarray) -> np.ndarray:
    """The bits of an int32/uint32 array (any byte order) as native uint32."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" and values.dtype.itemsize == 4:
        native = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
        return native.view(np.uint32)
    return (values.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
