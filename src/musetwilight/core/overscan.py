"""Overscan statistics, cosmic-ray rejection in the overscans, and the vertical overscan fit.

ESO's muse_quadrants: per quadrant the mean and standard deviation of its
overscans (rejection ``none``, ``dcr`` -- Pych 2004 -- or an iterative constant
``fit``), and for ``overscan=vpoly`` a polynomial in y fitted to the vertical
overscan and subtracted row by row.  The fits reproduce cpl_polynomial_fit and its
long-double evaluation (see :mod:`.cplmath`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import FitError, InputError
from ..params import OverscanSpec, RejectSpec
from .cplmath import horner_long_double, ordered_dot, polyfit_1d, running_mean, running_stdev
from .detector import Layout, overscan_windows, quadrant_half

log = logging.getLogger(__name__)

FLT_MAX = float(np.finfo(np.float32).max)
DBL_MIN = float(np.finfo(np.float64).tiny)


# --------------------------------------------------------------------------
# DCR cosmic-ray flagging (Pych 2004)


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
                npx += _dcr_box(data, dq, np.int64(i), np.int64(i + xbox), np.int64(j), np.int64(j + ybox), thres)
                j += max(ybox // 2, 1)
            if jmax < ny:
                npx += _dcr_box(data, dq, np.int64(i), np.int64(i + xbox), np.int64(ny - ybox + 1), np.int64(ny), thres)
            i += max(xbox // 2, 1)
        if imax < nx:
            j = 1
            while j <= ny - ybox + 1:
                npx += _dcr_box(data, dq, np.int64(nx - xbox + 1), np.int64(nx), np.int64(j), np.int64(j + ybox), thres)
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
# ESO's iterative polynomial fit


def _fit_once(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """cpl_polynomial_fit of a 1D polynomial of degree ``order`` (0: the running mean)."""
    if order == 0:
        return np.array([running_mean(y)])
    if len(np.unique(x)) < order + 1:
        raise FitError("fewer distinct positions than coefficients")
    coeffs, ok = polyfit_1d(np.ascontiguousarray(x), np.ascontiguousarray(y), order + 1)
    if not ok:
        raise FitError("normal matrix is not positive definite")
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
            raise FitError("no points to fit")
        coeffs = _fit_once(xs, ys, order)
        if not np.isfinite(coeffs[0]):
            raise FitError("polynomial fit failed")
        res = ys - horner_long_double(coeffs, xs)
        ssq = ordered_dot(res, res)
        rms = math.sqrt(ssq / len(res))
        if rms == 0.0:
            rms = DBL_MIN
        nfree = len(res) - len(coeffs)
        chisq = ssq / nfree if nfree > 0 else float("inf")
        bad = ~(np.abs(res) < sigma * rms)
        if not bad.any():
            return PolyFit(coeffs, rms * rms, chisq, keep)
        if len(res) == 1:
            raise FitError("rejection would remove the last point")
        idx = np.flatnonzero(keep)
        keep = keep.copy()
        keep[idx[bad]] = False


# --------------------------------------------------------------------------
# overscans


@njit(cache=True, nogil=True)
def _subtract_rows(region, values):
    """region[r, :] -= values[r], in double precision, stored as float32."""
    for r in range(region.shape[0]):
        v = values[r]
        for c in range(region.shape[1]):
            region[r, c] = np.float64(region[r, c]) - v


@dataclass
class OverscanStats:
    mean: np.float32
    stdev: np.float32
    nrejected: int


def overscan_stats(data: np.ndarray, dq: np.ndarray, layout: Layout, reject: RejectSpec,
                   ignore: int) -> list[OverscanStats]:
    """Mean and stdev of each quadrant's overscans (good pixels), after optional rejection.

    ``dcr`` flags cosmic rays in the overscan DQ (they then also stay out of
    the vpoly fit); ``fit`` is an iterative constant fit (stdev = its RMS);
    otherwise mean and sample standard deviation.
    """
    L = layout
    method = reject.method
    if method == "dcr":
        if (reject.ybox > L.ovx or reject.ybox > L.ovy or reject.xbox > L.nx
                or reject.xbox > L.ny or reject.npass <= 0 or reject.threshold <= 0):
            log.warning("Detected illegal DCR parameters for overscan statistics (%dx%d, %d, %f; "
                        "overscan: %dx%d, output: %dx%d), not rejecting anything!",
                        reject.xbox, reject.ybox, reject.npass, reject.threshold,
                        L.ovx, L.ovy, L.nx, L.ny)
            method = "none"
    elif method == "fit" and reject.sigma <= 0:
        log.warning("Detected illegal fit sigma for overscan statistics, not rejecting anything!")
        method = "none"
    out = []
    for q in range(1, 5):
        hwin, vwin = overscan_windows(L, q, ignore)
        ncr = 0
        if method == "dcr":
            for win, (bx, by) in ((hwin, (reject.xbox, reject.ybox)), (vwin, (reject.ybox, reject.xbox))):
                sub_dq = dq[win].copy()
                h, w = sub_dq.shape
                ncr += dcr_flag(data[win], sub_dq, min(bx, w), min(by, h), reject.npass, reject.threshold)
                dq[win] = sub_dq
        # ESO collects column by column (x outer, y inner)
        values = np.concatenate([data[win].T[dq[win].T == 0] for win in (hwin, vwin)]).astype(np.float64)
        if method == "fit":
            fit = iterate_polyfit(np.zeros(len(values)), values, 0, reject.sigma)
            mean, stdev = fit.coeffs[0], math.sqrt(fit.mse)
            nrej = len(values) - int(fit.keep.sum())
        else:
            mean = running_mean(values)
            stdev = running_stdev(values)
            nrej = ncr
        out.append(OverscanStats(np.float32(mean), np.float32(stdev), nrej))
    return out


def vpoly_correct(data: np.ndarray, dq: np.ndarray, layout: Layout, spec: OverscanSpec, ignore: int,
                  sigma: float) -> list[np.ndarray]:
    """Fit each quadrant's vertical overscan vs. row and subtract it row by row.

    The order grows from 0 until both the RMS and the reduced chi^2 improve by
    less than ``spec.frms``/``spec.fchisq`` (or ``spec.order`` is reached; the higher
    order is kept); the final fit at that order rejects at ``sigma`` x RMS.  The fit is
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
        try:
            first = iterate_polyfit(x, y, 0, FLT_MAX)
        except FitError as err:
            raise InputError(f"vertical overscan fit of order 0 failed in quadrant {q}: {err}") from None
        rms1, chisq1 = math.sqrt(first.mse), first.chisq
        chosen = 0
        for norder in range(1, spec.order + 1):
            try:
                fit = iterate_polyfit(x, y, norder, FLT_MAX)
            except FitError as err:
                raise InputError(f"vertical overscan fit of order {norder} failed in quadrant {q}: "
                                 f"{err}") from None
            rms2, chisq2 = math.sqrt(fit.mse), fit.chisq
            if norder == spec.order or (rms1 / rms2 < spec.frms and chisq1 / chisq2 < spec.fchisq):
                chosen = norder
                break
            rms1, chisq1 = rms2, chisq2
        try:
            final = iterate_polyfit(x, y, chosen, sigma)
        except FitError as err:
            raise InputError(f"vertical overscan fit of order {chosen} failed in quadrant {q}: {err}") from None
        coeffs = final.coeffs
        result.append(coeffs)
        hrows, hcols = quadrant_half(L, q)
        sub = horner_long_double(coeffs, np.arange(hrows.start + 1, hrows.stop + 1, dtype=np.float64))
        _subtract_rows(data[hrows, hcols], sub)
    return result
