"""Basic CCD processing of one IFU of a raw MUSE exposure (ESO muse_basicproc semantics).

The chain, in ESO's order: bad-pixel table -> saturation flags -> overscan
statistics (with ``ovscreject`` none | dcr | fit) -> vertical overscan
polynomial (``overscan=vpoly``) -> trimming -> variance from the bias-subtracted
signal -> overscan offset (``overscan=offset``) or overscan level check ->
MASTER_BIAS subtraction -> adu to count -> MASTER_DARK (scaled by exposure
time) -> division by MASTER_FLAT.

Arithmetic follows ESO's float32/float64 mix so that results agree bit for
bit: images stay float32; gain, variance and the overscan polynomial are
applied in double precision and rounded to float32, while factors that CPL
casts to float (dark scaling, offset shifts) are applied in float32.  The
vertical-overscan fit reproduces cpl_polynomial_fit (mean-centred normal
equations summed in data order, Cholesky, Taylor shift back) and its
long-double Horner evaluation, because fits of order ~10-15 are so
ill-conditioned that any other least-squares solver gives visibly different
polynomials.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
from astropy.io import fits
from numba import njit

from .cplmath import cholesky_solve, running_mean
from ..io.frames import InputError
from ..io.formats import MuseImage, RawImage

log = logging.getLogger(__name__)

SATURATION_LIMIT = np.float32(65500.0)
FLT_EPSILON = float(np.finfo(np.float32).eps)
FLT_MIN = np.float32(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)
DBL_MIN = float(np.finfo(np.float64).tiny)

EURO3D_COSMICRAY = np.uint32(1 << 5)
EURO3D_SATURATED = np.uint32(1 << 12)

PORT_X_RIGHT = 4096  # ESO's hard-coded output-port positions (independent of CCD size)
PORT_Y_TOP = 4112

NSAT_KEY = "HIERARCH MUSE TMP NSATURATED"
OVSC_MEAN = "HIERARCH ESO DRS MUSE OVSC{} MEAN"
OVSC_STDEV = "HIERARCH ESO DRS MUSE OVSC{} STDEV"
OVSC_PNC = "HIERARCH ESO DRS MUSE OVSC{} POLY NCOEFF"
OVSC_PY = "HIERARCH ESO DRS MUSE OVSC{} POLY Y{}"
FLAT_FLUX_LAMP = "HIERARCH ESO DRS MUSE FLAT FLUX LAMP"


class OverscanError(InputError):
    """Raw overscan levels incompatible with the MASTER_BIAS (overscan=vpoly)."""


# --------------------------------------------------------------------------
# detector layout


@dataclass(frozen=True)
class Layout:
    """Quadrant geometry of one raw IFU (sizes already divided by the binning)."""

    nx: int  # data-section width of one quadrant
    ny: int
    prex: int
    prey: int
    ovx: int
    ovy: int
    ports: tuple[tuple[int, int], ...]  # (OUT X, OUT Y) of quadrants 1..4

    @property
    def raw_shape(self) -> tuple[int, int]:
        return 2 * (self.prey + self.ny + self.ovy), 2 * (self.prex + self.nx + self.ovx)

    @property
    def trimmed_shape(self) -> tuple[int, int]:
        return 2 * self.ny, 2 * self.nx

    def is_right(self, q: int) -> bool:
        return self.ports[q - 1][0] != 1

    def is_top(self, q: int) -> bool:
        return self.ports[q - 1][1] != 1


def _get(header: fits.Header, key: str, source: str) -> Any:
    try:
        return header[key]
    except KeyError:
        raise InputError(f"{source}: header keyword {key} is missing") from None


def layout_from_header(header: fits.Header, source: str = "raw image") -> Layout:
    """Read and verify the quadrant layout (ESO DET OUTi ..., DET BINX/BINY)."""
    binx = int(_get(header, "HIERARCH ESO DET BINX", source))
    biny = int(_get(header, "HIERARCH ESO DET BINY", source))
    if binx <= 0 or biny <= 0:
        raise InputError(f"{source}: invalid binning {binx}x{biny}")
    values = []
    for q in range(1, 5):
        pre = f"HIERARCH ESO DET OUT{q} "
        values.append(dict(
            x=int(_get(header, pre + "X", source)), y=int(_get(header, pre + "Y", source)),
            nx=int(_get(header, pre + "NX", source)) // binx,
            ny=int(_get(header, pre + "NY", source)) // biny,
            prex=int(_get(header, pre + "PRSCX", source)) // binx,
            prey=int(_get(header, pre + "PRSCY", source)) // biny,
            ovx=int(_get(header, pre + "OVSCX", source)) // binx,
            ovy=int(_get(header, pre + "OVSCY", source)) // biny,
        ))
    expected = [(1, 1), (PORT_X_RIGHT, 1), (PORT_X_RIGHT, PORT_Y_TOP), (1, PORT_Y_TOP)]
    ports = tuple((v["x"], v["y"]) for v in values)
    if list(ports) != expected:
        raise InputError(f"{source}: unsupported read-out port layout {ports}")
    for key in ("nx", "ny", "prex", "prey", "ovx", "ovy"):
        if len({v[key] for v in values}) != 1:
            raise InputError(f"{source}: quadrant {key} sizes differ: {[v[key] for v in values]}")
    v = values[0]
    if v["nx"] <= 0 or v["ny"] <= 0 or v["ovx"] <= 0 or v["ovy"] <= 0 or v["prex"] < 0 or v["prey"] < 0:
        raise InputError(f"{source}: invalid quadrant sizes {v}")
    return Layout(v["nx"], v["ny"], v["prex"], v["prey"], v["ovx"], v["ovy"], ports)


def data_window(layout: Layout, q: int, trimmed: bool) -> tuple[slice, slice]:
    """(rows, columns) of quadrant q's data section, raw or trimmed."""
    L = layout
    if trimmed:
        x0 = L.nx if L.is_right(q) else 0
        y0 = L.ny if L.is_top(q) else 0
    else:
        x0 = L.prex + (L.nx + 2 * L.ovx if L.is_right(q) else 0)
        y0 = L.prey + (L.ny + 2 * L.ovy if L.is_top(q) else 0)
    return slice(y0, y0 + L.ny), slice(x0, x0 + L.nx)


def overscan_windows(layout: Layout, q: int, ignore: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Horizontal and vertical overscan windows (rows, columns) of quadrant q.

    The horizontal overscan spans the data columns; the vertical one spans the
    full height without the prescan and includes the corner square.  The
    ``ignore`` pixels next to the data section are left out.
    """
    L = layout
    if ignore >= L.ovx:
        raise InputError(f"ovscignore={ignore} is not smaller than the overscan width {L.ovx}")
    if L.is_right(q):
        hx = slice(L.prex + L.nx + 2 * L.ovx, L.prex + 2 * L.nx + 2 * L.ovx)
        vx = slice(L.prex + L.nx + L.ovx, L.prex + L.nx + 2 * L.ovx - ignore)
    else:
        hx = slice(L.prex, L.prex + L.nx)
        vx = slice(L.prex + L.nx + ignore, L.prex + L.nx + L.ovx)
    if L.is_top(q):
        hy = slice(L.prey + L.ny + L.ovy, L.prey + L.ny + 2 * L.ovy - ignore)
        vy = slice(L.prey + L.ny + L.ovy, L.prey + 2 * L.ny + 2 * L.ovy)
    else:
        hy = slice(L.prey + L.ny + ignore, L.prey + L.ny + L.ovy)
        vy = slice(L.prey, L.prey + L.ny + L.ovy)
    return (hy, hx), (vy, vx)


def quadrant_half(layout: Layout, q: int) -> tuple[slice, slice]:
    """The whole raw half-by-half region of quadrant q (data plus its pre/overscans)."""
    H, W = layout.raw_shape
    rows = slice(H // 2, H) if layout.is_top(q) else slice(0, H // 2)
    cols = slice(W // 2, W) if layout.is_right(q) else slice(0, W // 2)
    return rows, cols


def gains(header: fits.Header, source: str = "raw image") -> list[float]:
    """ESO DET OUTi GAIN (count/adu) of the four quadrants."""
    return [float(_get(header, f"HIERARCH ESO DET OUT{q} GAIN", source)) for q in range(1, 5)]


def trim(array: np.ndarray, layout: Layout) -> np.ndarray:
    """Cut the four data sections out of a raw-format array and join them."""
    out = np.empty(layout.trimmed_shape, dtype=array.dtype)
    for q in range(1, 5):
        out[data_window(layout, q, True)] = array[data_window(layout, q, False)]
    return out


# --------------------------------------------------------------------------
# parameter strings


def parse_ovscreject(value: str) -> tuple[str, dict]:
    """``none`` | ``dcr[:xbox,ybox,npass,thres]`` | ``fit[:sigma]`` -> (method, options)."""
    method, _, rest = value.partition(":")
    args = [a for a in rest.split(",")] if rest else []
    if method == "dcr":
        opts = dict(box1=128, box2=32, npass=3, thres=2.5)
        for key, arg, conv in zip(("box1", "box2", "npass", "thres"), args, (int, int, int, float)):
            opts[key] = conv(arg)
        return "dcr", opts
    if method == "fit":
        return "fit", dict(sigma=float(args[0]) if args else 5.0)
    if method == "none":
        return "none", {}
    raise InputError(f"unknown overscan rejection type {value!r}")


def parse_overscan(value: str) -> tuple[str, dict]:
    """``none`` | ``offset`` | ``vpoly[:order,frms,fchisq]`` -> (method, options)."""
    method, _, rest = value.partition(":")
    if method == "vpoly":
        args = rest.split(",") if rest else []
        opts = dict(order=15, frms=1.00001, fchisq=1.00001)
        for key, arg, conv in zip(("order", "frms", "fchisq"), args, (int, float, float)):
            opts[key] = conv(arg)
        if not (opts["frms"] > 1 and opts["fchisq"] > 1):
            raise InputError(f"overscan={value!r}: frms and fchisq must be > 1")
        return "vpoly", opts
    if method in ("none", "offset"):
        return method, {}
    raise InputError(f"unknown overscan method {value!r}")


# --------------------------------------------------------------------------
# bad pixels and saturation


def apply_badpix(dq: np.ndarray, tables: Iterable[Any] | None, source: str = "BADPIX_TABLE") -> int:
    """OR the status of each bad-pixel table entry into ``dq`` (raw, 1-based xpos/ypos).

    Each table needs columns xpos, ypos, status.  Entries outside the frame
    are skipped and counted (ESO warns); returns that count.
    """
    outside = 0
    for table in tables or ():
        x = np.asarray(table["xpos"], dtype=np.int64) - 1
        y = np.asarray(table["ypos"], dtype=np.int64) - 1
        status = np.asarray(table["status"]).astype(np.int64).astype(np.uint32)
        inside = (x >= 0) & (x < dq.shape[1]) & (y >= 0) & (y < dq.shape[0])
        outside += int(np.count_nonzero(~inside))
        np.bitwise_or.at(dq, (y[inside], x[inside]), status[inside])
    if outside:
        log.warning("%s contained %d entries outside the CCD", source, outside)
    return outside


def flag_saturated(data: np.ndarray, dq: np.ndarray) -> int:
    """Flag pixels above 65500 adu or below FLT_EPSILON; return how many."""
    bad = (data > SATURATION_LIMIT) | (data < np.float32(FLT_EPSILON))
    dq[bad] |= EURO3D_SATURATED
    return int(np.count_nonzero(bad))


# --------------------------------------------------------------------------
# DCR cosmic-ray flagging (Pych 2004) as used for overscan statistics


@njit(cache=True, nogil=True)
def _dcr_box(data, dq, x1, x2, y1, y2, thres):
    """Flag pixels above the first wide histogram gap in one box (1-based inclusive)."""
    ny, nx = data.shape
    i0 = max(x1 - 1, 0)
    i1 = min(x2, nx)
    j0 = max(y1 - 1, 0)
    j1 = min(y2, ny)
    dsum = 0.0
    dsq = 0.0
    vmin = 3.4028234663852886e38
    vmax = -3.4028234663852886e38
    n = 0
    for j in range(j0, j1):
        for i in range(i0, i1):
            if dq[j, i] != 0:
                continue
            v = data[j, i]
            dsum += v
            dsq += v * v  # float32 product, as ESO
            n += 1
            if v < vmin:
                vmin = v
            if v > vmax:
                vmax = v
    if n == 0:
        return 0
    mean = dsum / n
    var = (dsq - dsum * dsum / n) / n
    if var < 0 or not np.isfinite(mean) or not np.isfinite(var):
        return 0
    sigma = math.sqrt(var)
    lo = mean - sigma * thres
    hi = mean + sigma * thres
    hlength = int(math.floor((vmax - vmin) + 1.0 + 0.5))
    hist = np.zeros(hlength, dtype=np.int64)
    dsum = 0.0
    dsq = 0.0
    n = 0
    for j in range(j0, j1):
        for i in range(i0, i1):
            if dq[j, i] != 0:
                continue
            v = data[j, i]
            hist[int(math.floor((np.float64(v) - vmin) + 0.5))] += 1
            if v > lo and v < hi:
                dsum += v
                dsq += v * v
                n += 1
    mean = dsum / n if n > 0 else np.nan
    sigma = math.sqrt((dsq - dsum * dsum / n) / n) if n > 0 else np.nan
    mode = 0
    for k in range(1, hlength):
        if hist[k] > hist[mode]:
            mode = k
    gapwidth = sigma * thres
    k = mode
    found = False
    while k < hlength:
        if hist[k] == 0:
            e = k + 1
            while e < hlength and hist[e] == 0:
                e += 1
            if e >= hlength:
                return 0
            if (e - k) > gapwidth:
                found = True
                break
            k = e
        k += 1
    if not found:
        return 0
    cut = k + vmin
    ncr = 0
    for j in range(j0, j1):
        for i in range(i0, i1):
            if dq[j, i] == 0 and data[j, i] > cut:
                dq[j, i] |= 32
                ncr += 1
    return ncr


@njit(cache=True, nogil=True)
def _dcr(data, dq, xbox, ybox, npass, thres):
    """DCR over overlapping boxes (half-box steps, extra boxes at the top/right edges)."""
    ny, nx = data.shape
    ncr = 0
    for _ in range(npass):
        imax = 0
        jmax = 0
        npx = 0
        i = 1
        while i <= nx - xbox + 1:
            j = 1
            while j <= ny - ybox + 1:
                imax = max(imax, i + xbox)
                jmax = max(jmax, j + ybox)
                npx += _dcr_box(data, dq, i, i + xbox, j, j + ybox, thres)
                j += max(ybox // 2, 1)
            if jmax < ny:
                npx += _dcr_box(data, dq, i, i + xbox, ny - ybox + 1, ny, thres)
            i += max(xbox // 2, 1)
        if imax < nx:
            j = 1
            while j <= ny - ybox + 1:
                npx += _dcr_box(data, dq, nx - xbox + 1, nx, j, j + ybox, thres)
                j += max(ybox // 2, 1)
        if imax < nx and jmax < ny:
            # ESO uses the x box size for the y start of this corner box
            npx += _dcr_box(data, dq, nx - xbox + 1, nx, ny - xbox + 1, ny, thres)
        ncr += npx
        if npx == 0:
            break
    return ncr


def dcr_flag(data: np.ndarray, dq: np.ndarray, xbox: int, ybox: int, npass: int, thres: float) -> int:
    """Flag cosmic rays (bit 5) in ``dq`` of a (sub)image with ESO's DCR; return the count."""
    sub_dq = np.ascontiguousarray(dq)
    n = _dcr(np.ascontiguousarray(data, dtype=np.float32), sub_dq, int(xbox), int(ybox),
             int(npass), float(np.float32(thres)))
    dq[...] = sub_dq
    return int(n)


# --------------------------------------------------------------------------
# CPL-compatible iterative polynomial fit


@njit(cache=True, nogil=True)
def running_stdev(values):
    """Sample standard deviation from CPL's running variance sum."""
    varsum = 0.0
    mean = 0.0
    for i in range(values.size):
        delta = values[i] - mean
        varsum += i * delta * (delta / (i + 1))
        mean += delta / (i + 1)
    return math.sqrt(varsum / (values.size - 1))


@njit(cache=True, nogil=True)
def _dot(a, b):
    total = 0.0
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@njit(cache=True, nogil=True)
def _solve_normal(x, y, nc):
    """Least squares of degree nc-1 the way CPL does it: mean-centred positions,
    normal (Hankel) matrix accumulated with running powers, Cholesky solve, then
    the Taylor shift back to powers of x.  Returns (coefficients, ok)."""
    n = x.size
    mean = running_mean(x)
    xh = x - mean
    H = np.zeros((nc, nc))
    b = np.zeros(nc)
    H[0, 0] = float(n)
    p = xh.copy()
    hsum = 0.0
    vsum = 0.0
    vsum0 = 0.0
    for k in range(n):
        hsum += p[k]
        vsum += y[k] * p[k]
        vsum0 += y[k]
    b[0] = vsum0
    b[1] = vsum
    H[0, 1] = hsum
    for j in range(2, nc):
        hsum = 0.0
        vsum = 0.0
        for k in range(n):
            p[k] *= xh[k]
            hsum += p[k]
            vsum += y[k] * p[k]
        b[j] = vsum
        i = 0
        kk = j
        while i <= kk:
            H[i, kk] = hsum
            i += 1
            kk -= 1
    for i in range(1, nc):
        hsum = 0.0
        for k in range(n):
            p[k] *= xh[k]
            hsum += p[k]
        kk = i
        jj = nc - 1
        while kk <= jj:
            H[kk, jj] = hsum
            kk += 1
            jj -= 1
    b, ok = cholesky_solve(H, b)
    if not ok:
        return b, False
    u = -mean
    for j in range(nc - 1):
        for i in range(1, nc - j):
            b[nc - 1 - i] += b[nc - i] * u
    return b, True


def _horner(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Evaluate like cpl_polynomial_eval_1d: Horner's rule in long double, rounded to double."""
    xl = np.asarray(x, dtype=np.float64).astype(np.longdouble)
    result = np.full(xl.shape, np.longdouble(c[-1]))
    for coef in c[-2::-1]:
        result = xl * result + np.longdouble(coef)
    return result.astype(np.float64)


def _fit_once(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """cpl_polynomial_fit of a 1D polynomial of degree ``order`` (0: the running mean)."""
    if order == 0:
        return np.array([running_mean(y)])
    if len(np.unique(x)) < order + 1:
        raise np.linalg.LinAlgError("fewer distinct positions than coefficients")
    coeffs, ok = _solve_normal(np.ascontiguousarray(x), np.ascontiguousarray(y), order + 1)
    if not ok:
        raise np.linalg.LinAlgError("normal matrix is not positive definite")
    # CPL stores only non-zero coefficients; trailing zeros lower the degree
    last = np.flatnonzero(coeffs)
    return coeffs[: last[-1] + 1] if last.size else coeffs[:1] * 0.0


@dataclass
class PolyFit:
    coeffs: np.ndarray  # increasing powers, absolute positions
    mse: float
    chisq: float
    keep: np.ndarray  # boolean mask of the points left after rejection


def iterate_polyfit(x: np.ndarray, y: np.ndarray, order: int, sigma: float) -> PolyFit:
    """Fit, reject |residual| >= sigma x RMS, refit until nothing is rejected (ESO's loop).

    RMS = sqrt(mean squared residual); chisq = sum of squared residuals / (n - ncoeff).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(y)
    while True:
        xs, ys = x[keep], y[keep]
        if xs.size == 0:
            raise np.linalg.LinAlgError("no points to fit")
        coeffs = _fit_once(xs, ys, order)
        if not np.isfinite(coeffs[0]):
            raise np.linalg.LinAlgError("polynomial fit failed")
        res = ys - _horner(coeffs, xs)
        ssq = _dot(res, res)
        rms = math.sqrt(ssq / len(res))
        if rms == 0.0:
            rms = DBL_MIN
        nfree = len(res) - len(coeffs)
        chisq = ssq / nfree if nfree > 0 else float("inf")
        bad = ~(np.abs(res) < sigma * rms)
        if not bad.any():
            return PolyFit(coeffs, rms * rms, chisq, keep)
        if len(res) == 1:
            raise np.linalg.LinAlgError("rejection would remove the last point")
        idx = np.flatnonzero(keep)
        keep = keep.copy()
        keep[idx[bad]] = False


# --------------------------------------------------------------------------
# overscans


@dataclass
class OverscanStats:
    mean: np.float32
    stdev: np.float32
    nrejected: int


def overscan_stats(data: np.ndarray, dq: np.ndarray, layout: Layout, ovscreject: str,
                   ignore: int) -> list[OverscanStats]:
    """Mean and stdev of each quadrant's overscans (good pixels), after optional rejection.

    ``dcr`` flags cosmic rays in the overscan DQ (they then also stay out of
    the vpoly fit); ``fit`` is an iterative constant fit (stdev = its RMS);
    otherwise mean and sample standard deviation.
    """
    method, opts = parse_ovscreject(ovscreject)
    L = layout
    if method == "dcr":
        if (opts["box2"] > L.ovx or opts["box2"] > L.ovy or opts["box1"] > L.nx
                or opts["box1"] > L.ny or opts["npass"] <= 0 or opts["thres"] <= 0):
            log.warning("Detected illegal DCR parameters for overscan statistics (%dx%d, %d, %f; "
                        "overscan: %dx%d, output: %dx%d), not rejecting anything!",
                        opts["box1"], opts["box2"], opts["npass"], opts["thres"],
                        L.ovx, L.ovy, L.nx, L.ny)
            method = "none"
    elif method == "fit" and opts["sigma"] <= 0:
        log.warning("Detected illegal fit sigma for overscan statistics, not rejecting anything!")
        method = "none"
    out = []
    for q in range(1, 5):
        hwin, vwin = overscan_windows(L, q, ignore)
        ncr = 0
        if method == "dcr":
            for win, (bx, by) in ((hwin, (opts["box1"], opts["box2"])),
                                  (vwin, (opts["box2"], opts["box1"]))):
                sub_dq = dq[win].copy()
                h, w = sub_dq.shape
                ncr += dcr_flag(data[win], sub_dq, min(bx, w), min(by, h), opts["npass"], opts["thres"])
                dq[win] = sub_dq
        # ESO collects column by column (x outer, y inner)
        values = np.concatenate([data[win].T[dq[win].T == 0] for win in (hwin, vwin)]).astype(np.float64)
        if method == "fit":
            fit = iterate_polyfit(np.zeros(len(values)), values, 0, opts["sigma"])
            mean, stdev = fit.coeffs[0], math.sqrt(fit.mse)
            nrej = len(values) - int(fit.keep.sum())
        else:
            mean = running_mean(values)
            stdev = running_stdev(values)
            nrej = ncr
        out.append(OverscanStats(np.float32(mean), np.float32(stdev), nrej))
    return out


def vpoly_correct(data: np.ndarray, dq: np.ndarray, layout: Layout, ignore: int, order: int,
                  sigma: float, frms: float, fchisq: float) -> list[np.ndarray]:
    """Fit each quadrant's vertical overscan vs. row and subtract it row by row.

    The order grows from 0 until both the RMS and the reduced chi^2 improve by
    less than ``frms``/``fchisq`` (or ``order`` is reached; the higher order is
    kept); the final fit at that order rejects at ``sigma`` x RMS.  The fit is
    subtracted from every row of the quadrant's half of the raw frame,
    including its pre- and overscans.  Returns the coefficients per quadrant.
    """
    L = layout
    if L.prex <= 0 or L.prey <= 0:
        raise InputError("overscan=vpoly needs positive prescan sizes")
    result = []
    for q in range(1, 5):
        _, (vy, vx) = overscan_windows(L, q, ignore)
        block = data[vy, vx]
        good = dq[vy, vx] == 0
        rows = np.arange(vy.start + 1, vy.stop + 1, dtype=np.float64)  # 1-based raw rows
        rows = np.broadcast_to(rows[:, None], block.shape)
        x = rows.T[good.T]
        y = block.T[good.T].astype(np.float64)
        if x.size == 0:
            raise InputError(f"no usable pixel in the vertical overscan of quadrant {q} "
                             "(all flagged: saturated or bad)")
        first = iterate_polyfit(x, y, 0, FLT_MAX)
        rms1, chisq1 = math.sqrt(first.mse), first.chisq
        chosen = 0
        for norder in range(1, order + 1):
            try:
                fit = iterate_polyfit(x, y, norder, FLT_MAX)
                rms2, chisq2 = math.sqrt(fit.mse), fit.chisq
            except np.linalg.LinAlgError:
                raise InputError(f"vertical overscan fit of order {norder} failed in quadrant {q}")
            if norder == order or (rms1 / rms2 < frms and chisq1 / chisq2 < fchisq):
                chosen = norder
                break
            rms1, chisq1 = rms2, chisq2
        final = iterate_polyfit(x, y, chosen, sigma)
        coeffs = final.coeffs
        result.append(coeffs)
        hrows, hcols = quadrant_half(L, q)
        sub = _horner(coeffs, np.arange(hrows.start + 1, hrows.stop + 1, dtype=np.float64))
        _subtract_rows(data[hrows, hcols], sub)
    return result



# --------------------------------------------------------------------------
# per-pixel kernels (one pass, no temporaries; float64 factors, float32 storage)


@njit(cache=True, nogil=True)
def _subtract_rows(region, values):
    """region[r, :] -= values[r], in double precision, stored as float32."""
    for r in range(region.shape[0]):
        v = values[r]
        for c in range(region.shape[1]):
            region[r, c] = np.float64(region[r, c]) - v


@njit(cache=True, nogil=True)
def _variance(stat, data, bias, gain, floor):
    """stat = float32(data - bias) / gain, values <= 0 replaced by ``floor`` (FLT_MIN)."""
    for r in range(stat.shape[0]):
        for c in range(stat.shape[1]):
            v = np.float64(np.float32(data[r, c] - bias[r, c])) / gain
            stat[r, c] = v
            if stat[r, c] <= 0:
                stat[r, c] = floor


@njit(cache=True, nogil=True)
def _apply_gain(data, stat, gain):
    """adu -> count: data x gain, variance x gain^2 (double factors)."""
    g2 = gain * gain
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            data[r, c] = np.float64(data[r, c]) * gain
            stat[r, c] = np.float64(stat[r, c]) * g2


@njit(cache=True, nogil=True)
def _subtract_image(data, stat, dq, sdata, sstat, sdq, factor, factor2):
    """data -= float32(factor) * sdata, stat += float32(factor2) * sstat, dq |= sdq."""
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            data[r, c] -= sdata[r, c] * factor
            stat[r, c] += sstat[r, c] * factor2
            dq[r, c] |= sdq[r, c]


@njit(cache=True, nogil=True)
def _divide_flat(data, stat, dq, fdata, fstat, fdq):
    """Flat division with Gaussian propagation; a zero flat leaves the pixel undivided."""
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            f = fdata[r, c]
            d = data[r, c]
            term2 = d * d * fstat[r, c]
            if f != 0:
                f2 = f * f
                data[r, c] = d / f
                stat[r, c] = (stat[r, c] + term2 / f2) / f2
            else:
                stat[r, c] = stat[r, c] + term2
            dq[r, c] |= fdq[r, c]


# --------------------------------------------------------------------------
# the chain


def _check_setup(raw: RawImage, calib: MuseImage, catg: str, is_illum: bool = False) -> None:
    """ESO's raw-vs-calibration checks: binning (error), read-out mode and chip (bias: error)."""
    h, c = raw.header, calib.header
    src = f"{raw.path}[CHAN{raw.ifu:02d}] vs {catg}"
    for key in ("HIERARCH ESO DET BINX", "HIERARCH ESO DET BINY"):
        if h.get(key) != c.get(key):
            raise InputError(f"{src}: binning does not match ({key} {h.get(key)} / {c.get(key)})")
    read1, read2 = h.get("HIERARCH ESO DET READ CURID"), c.get("HIERARCH ESO DET READ CURID")
    chip1 = (h.get("HIERARCH ESO DET CHIP NAME"), h.get("HIERARCH ESO DET CHIP ID"))
    chip2 = (c.get("HIERARCH ESO DET CHIP NAME"), c.get("HIERARCH ESO DET CHIP ID"))
    chipinfo = None not in chip1 and None not in chip2
    if catg == "MASTER_BIAS":
        if read1 != read2:
            raise InputError(f"{src}: read-out mode does not match ({read1} / {read2})")
        if chipinfo and chip1 != chip2:
            raise InputError(f"{src}: CHIP information does not match ({chip1} / {chip2})")
    if catg == "MASTER_FLAT" and not is_illum:
        mode1, mode2 = h.get("HIERARCH ESO INS MODE"), c.get("HIERARCH ESO INS MODE")
        if mode1 != mode2:
            raise InputError(f"{src}: instrument modes do not match ({mode1} / {mode2})")
    if read1 != read2:
        log.warning("%s: read-out mode does not match (%s / %s)", src, read1, read2)
    if chipinfo and chip1 != chip2:
        log.warning("%s: CHIP information does not match (%s / %s)", src, chip1, chip2)


def _bias_parameters_match(bias_header: fits.Header, settings) -> bool:
    """Compare the MASTER_BIAS's recorded overscan parameters (PRO REC1 PARAMk) with ours."""
    params = {}
    for k in range(1, 100):
        name = bias_header.get(f"HIERARCH ESO PRO REC1 PARAM{k} NAME")
        if name is None:
            break
        params[name] = bias_header.get(f"HIERARCH ESO PRO REC1 PARAM{k} VALUE")
    try:
        return (str(params["overscan"]) == settings.overscan
                and str(params["ovscreject"]) == settings.ovscreject
                and abs(float(params["ovscsigma"]) - settings.ovscsigma) < 1e-14
                and int(params["ovscignore"]) == settings.ovscignore)
    except (KeyError, ValueError, TypeError):
        return False


def _bias_overscan(bias: MuseImage, q: int, source: str) -> tuple[np.float32, np.float32]:
    """MASTER_BIAS's DRS MUSE OVSCq MEAN/STDEV; missing ones read as 0 (as CPL returns on error)."""
    try:
        return (np.float32(bias.header[OVSC_MEAN.format(q)]), np.float32(bias.header[OVSC_STDEV.format(q)]))
    except KeyError:
        return np.float32(0.0), np.float32(0.0)


@dataclass
class _Exposure:
    """One exposure between the steps of the chain."""

    raw: RawImage
    source: str
    layout: Layout
    gain: list[float]
    header: fits.Header
    data: np.ndarray
    dq: np.ndarray
    stats: list[OverscanStats]
    overscan: str
    stat: np.ndarray | None = None


def _raw_stage(raw: RawImage, settings, badpix) -> _Exposure:
    """Bad pixels, saturation, overscan statistics, vpoly, trimming."""
    source = f"{raw.path}[CHAN{raw.ifu:02d}]"
    layout = layout_from_header(raw.header, source)
    if raw.data.shape != layout.raw_shape:
        raise InputError(f"{source}: image size {raw.data.shape[::-1]} does not match the "
                         f"header layout {layout.raw_shape[::-1]}")
    gain = gains(raw.header, source)
    header = raw.header.copy()
    data = np.asarray(raw.data, dtype=np.float32).copy()
    dq = np.zeros(data.shape, dtype=np.uint32)

    if badpix is not None:
        tables = badpix if isinstance(badpix, (list, tuple)) else [badpix]
        apply_badpix(dq, tables)
    nsat = flag_saturated(data, dq)
    npix = data.size
    if nsat > 0.01 * npix:
        log.error("Raw exposure %s is strongly saturated (%d of %d pixels)!", source, nsat, npix)
    elif nsat > 0.001 * npix:
        log.warning("Raw exposure %s is probably saturated (%d of %d pixels)!", source, nsat, npix)
    header[NSAT_KEY] = nsat

    stats = overscan_stats(data, dq, layout, settings.ovscreject, settings.ovscignore)
    for q, st in enumerate(stats, start=1):
        header[OVSC_MEAN.format(q)] = float(st.mean)
        header[OVSC_STDEV.format(q)] = float(st.stdev)

    method, opts = parse_overscan(settings.overscan)
    if method == "vpoly":
        try:
            coeffs = vpoly_correct(data, dq, layout, settings.ovscignore, opts["order"],
                                   settings.ovscsigma, opts["frms"], opts["fchisq"])
        except InputError as err:
            raise InputError(f"{source}: {err}") from None
        for q, c in enumerate(coeffs, start=1):
            header[OVSC_PNC.format(q)] = len(c)
            for k, value in enumerate(c):
                header[OVSC_PY.format(q, k)] = float(value)

    tdata = trim(data, layout)
    del data
    tdq = trim(dq, layout)
    for key in list(header.keys()):
        if (key.startswith("NAXIS") or key in ("DATASUM", "DATAMIN", "DATAMAX", "DATAMD5")
                or (key.startswith("ESO DET OUT") and ("PRSC" in key or "OVSC" in key))):
            del header[key]
    return _Exposure(raw, source, layout, gain, header, tdata, tdq, stats, method)


def _bias_stage(e: _Exposure, bias: MuseImage, settings) -> None:
    """Variance from the bias-subtracted signal, overscan offset or check, bias subtraction, adu->count."""
    _check_setup(e.raw, bias, "MASTER_BIAS")
    if bias.data.shape != e.data.shape:
        raise InputError(f"{e.source}: MASTER_BIAS size {bias.data.shape[::-1]} differs from the "
                         f"trimmed raw size {e.data.shape[::-1]}")
    data, header, layout, gain, stats = e.data, e.header, e.layout, e.gain, e.stats
    stat = np.empty_like(data)
    bdata = np.asarray(bias.data, dtype=np.float32)
    for q in range(1, 5):
        win = data_window(layout, q, True)
        _variance(stat[win], data[win], bdata[win], gain[q - 1], FLT_MIN)
    if e.overscan == "offset":
        for q in range(1, 5):
            refmean, refstdev = _bias_overscan(bias, q, "MASTER_BIAS")
            win = data_window(layout, q, True)
            data[win] += np.float32(refmean - stats[q - 1].mean)  # float arithmetic, as CPL
            sd = stats[q - 1].stdev
            stat[win] += np.float32(float(np.float32(refstdev * refstdev + sd * sd)) / gain[q - 1])
            header[OVSC_MEAN.format(q)] = float(refmean)
    else:
        limit_sigma = 100.0 if e.overscan == "vpoly" else settings.ovscsigma
        for q in range(1, 5):
            refmean, refstdev = _bias_overscan(bias, q, "MASTER_BIAS")
            hi = np.float32(float(refmean) + limit_sigma * float(refstdev))
            lo = np.float32(float(refmean) - limit_sigma * float(refstdev))
            mean = stats[q - 1].mean
            if mean > hi or mean < lo:
                msg = (f"{e.source}: overscan of quadrant {q} ({mean:.3f}+/-{stats[q - 1].stdev:.3f}) "
                       f"differs from MASTER_BIAS ({refmean:.3f}+/-{refstdev:.3f})")
                if e.overscan == "vpoly":
                    raise OverscanError(msg + ": very different overscan levels, incompatible "
                                        "overscan parameters?")
                log.warning(msg)
    _subtract_image(data, stat, e.dq, bdata, np.asarray(bias.stat, dtype=np.float32),
                    np.asarray(bias.dq, dtype=np.uint32), np.float32(1), np.float32(1))
    for q in range(1, 5):
        win = data_window(layout, q, True)
        _apply_gain(data[win], stat[win], gain[q - 1])
    header["BUNIT"] = ("count", "DATA is in electrons")
    e.stat = stat


def _dark_stage(e: _Exposure, dark: MuseImage) -> None:
    """Subtract the MASTER_DARK scaled by EXPTIME(raw) / EXPTIME(dark) (if the latter is > 0)."""
    _check_setup(e.raw, dark, "MASTER_DARK")
    scale = float(e.header.get("EXPTIME", 0.0))
    dexp = float(dark.header.get("EXPTIME", 0.0))
    if dexp > 0:
        scale /= dexp
    # the dark is scaled with cpl_image_multiply_scalar, i.e. by a float factor
    _subtract_image(e.data, e.stat, e.dq, np.asarray(dark.data, dtype=np.float32),
                    np.asarray(dark.stat, dtype=np.float32), np.asarray(dark.dq, dtype=np.uint32),
                    np.float32(scale), np.float32(scale * scale))


def _flat_stage(e: _Exposure, flat: MuseImage, is_illum: bool) -> None:
    """Divide by the MASTER_FLAT and record its integrated flux (DRS MUSE FLAT FLUX LAMP)."""
    _check_setup(e.raw, flat, "MASTER_FLAT", is_illum)
    _divide_flat(e.data, e.stat, e.dq, np.asarray(flat.data, dtype=np.float32),
                 np.asarray(flat.stat, dtype=np.float32), np.asarray(flat.dq, dtype=np.uint32))
    e.header[FLAT_FLUX_LAMP] = float(flat.header.get("HIERARCH ESO QC FLAT MASTER INTFLUX", 0.0))


Calibration = Union[MuseImage, Callable[[], MuseImage]]


def _load(calib: Calibration | None, catg: str | None = None) -> MuseImage | None:
    """The calibration image; with ``catg``, checked to be finite where it is used."""
    image = calib() if callable(calib) else calib
    if image is not None and catg is not None:
        check_finite(image, catg)
    return image


def check_finite(image: MuseImage, catg: str) -> None:
    """A master calibration must be finite in every pixel its DQ does not flag.

    ESO subtracts or divides NaN/inf straight into the data (and then cannot even write
    the NaN QC keywords into its product); we refuse the calibration for this IFU.
    """
    bad = (~np.isfinite(image.data) | ~np.isfinite(image.stat)) & (image.dq == 0)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        ifu = image.header.get("EXTNAME", "")
        where = f"{image.path}" if image.path is not None else catg
        raise InputError(f"{catg} {where}{f' [{ifu}]' if ifu else ''}: {int(bad.sum())} unflagged pixel(s) "
                         f"are NaN or inf (first at x={x + 1}, y={y + 1})")


def process_exposures(raws: Sequence[RawImage], settings, bias: Calibration,
                      flat: Calibration | None = None, dark: Calibration | None = None,
                      badpix: Sequence[Any] | Any | None = None,
                      illum: Sequence[bool] | None = None) -> list[MuseImage]:
    """Basic-process one IFU of several raw exposures step by step, as ESO's muse_basicproc_load.

    Each calibration is a MuseImage or a function returning one; functions
    are called when the step needs the calibration and the image is dropped
    after the step, so only one calibration is in memory at a time.
    ``illum[k]`` marks ILLUM exposures (exempt from the MASTER_FLAT mode check).
    """
    illum = list(illum) if illum is not None else [False] * len(raws)
    work = [_raw_stage(raw, settings, badpix) for raw in raws]
    image = _load(bias, "MASTER_BIAS")
    if not _bias_parameters_match(image.header, settings):
        log.warning("overscan parameters differ between MASTER_BIAS and recipe parameters!")
    for e in work:
        _bias_stage(e, image, settings)
    del image
    if dark is not None:
        image = _load(dark, "MASTER_DARK")
        for e in work:
            _dark_stage(e, image)
        del image
    if flat is not None:
        image = _load(flat, "MASTER_FLAT")
        for e, is_illum in zip(work, illum):
            _flat_stage(e, image, is_illum)
        del image
    return [MuseImage(data=e.data, dq=e.dq, stat=e.stat, header=e.header) for e in work]


def process_exposure(raw: RawImage, bias: Calibration, settings, flat: Calibration | None = None,
                     dark: Calibration | None = None, badpix: Sequence[Any] | Any | None = None,
                     is_illum: bool = False) -> MuseImage:
    """Basic-process one IFU of one raw exposure: trimmed, in count, flat-fielded.

    ``badpix`` is one bad-pixel table (columns xpos, ypos, status) or a list of
    them.  The header gets ESO's records (DRS MUSE OVSCi ..., BUNIT, FLAT FLUX
    LAMP) and the temporary ``MUSE TMP NSATURATED`` count used by the QC.
    Raises InputError (OverscanError) where ESO stops processing the IFU.
    """
    return process_exposures([raw], settings, bias, flat=flat, dark=dark, badpix=badpix,
                             illum=[is_illum])[0]


def flat_rejected(flat: Calibration | None) -> np.ndarray | None:
    """Pixels that ESO's flat division leaves undivided (flat == 0) and that CPL's image
    statistics (QC TWILIGHTm INPUTi) then skip; None where there are none."""
    flat = _load(flat)
    if flat is None:
        return None
    zero = flat.data == 0
    return zero if zero.any() else None
