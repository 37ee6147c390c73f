"""Combination of basic-processed exposures, bad-pixel interpolation and twilight QC.

Semantics are ESO's muse_combine / muse_twilight ones:

* only pixels with DQ == 0 enter a combination; where no exposure is good,
  the least-bad one (lowest DQ value, first one on ties) is copied with its
  DQ;
* ``average``: mean, variance sum / n^2; ``median``: middle value (mean of
  the two middle ones, variances added) after sorting by value then variance;
  ``minmax``: drop ``nlow`` lowest and ``nhigh`` highest, keep at least
  ``nkeep`` by adding bad pixels (their DQ ORed in); ``sigclip``: keep values
  within median - lsigma x mdev .. median + hsigma x mdev (mdev = mean
  absolute deviation from the median), then average;
* ``scale`` multiplies every exposure but the first by EXPTIME(first) /
  EXPTIME(its own), in place, like ESO (the input QC then sees scaled data).
"""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits
from numba import njit

from ..errors import InputError
from ..params import Combine, Settings
from .basicproc import NSAT_KEY
from .cplmath import median, median_of
from .images import MuseImage

CHUNK_ROWS = 128


@njit(cache=True, nogil=True)
def _fallback(dq, i, j):
    """Index and DQ of the least-bad input (ESO starts from 1<<31 and takes strict minima)."""
    best = 0
    outdq = np.uint32(2147483648)
    for k in range(dq.shape[0]):
        if dq[k, i, j] < outdq:
            best = k
            outdq = dq[k, i, j]
    return best, outdq


@njit(cache=True, nogil=True)
def _sort_desc(vals, stats, n):
    """Insertion sort of (value, variance) pairs, decreasing, ties by decreasing variance."""
    for a in range(1, n):
        v = vals[a]
        s = stats[a]
        b = a - 1
        while b >= 0 and (vals[b] < v or (vals[b] == v and stats[b] < s)):
            vals[b + 1] = vals[b]
            stats[b + 1] = stats[b]
            b -= 1
        vals[b + 1] = v
        stats[b + 1] = s


@njit(cache=True, nogil=True)
def _average(data, dq, stat, odata, odq, ostat):
    n, ny, nx = data.shape
    for i in range(ny):
        for j in range(nx):
            ngood = 0
            sd = 0.0
            ss = 0.0
            for k in range(n):
                if dq[k, i, j] == 0:
                    ngood += 1
                    sd += data[k, i, j]
                    ss += stat[k, i, j]
            if ngood:
                odata[i, j] = sd / ngood
                ostat[i, j] = ss / ngood / ngood
                odq[i, j] = 0
            else:
                best, outdq = _fallback(dq, i, j)
                odata[i, j] = data[best, i, j]
                ostat[i, j] = stat[best, i, j]
                odq[i, j] = outdq


@njit(cache=True, nogil=True)
def _good_values(data, dq, stat, i, j, vals, svals):
    """Copy the unflagged values (and variances) of pixel (i, j) of the stack; return their count."""
    ngood = 0
    for k in range(data.shape[0]):
        if dq[k, i, j] == 0:
            vals[ngood] = data[k, i, j]
            svals[ngood] = stat[k, i, j]
            ngood += 1
    return ngood


@njit(cache=True, nogil=True)
def _median(data, dq, stat, odata, odq, ostat):
    n, ny, nx = data.shape
    vals = np.empty(n, dtype=np.float64)
    svals = np.empty(n, dtype=np.float64)
    for i in range(ny):
        for j in range(nx):
            ngood = _good_values(data, dq, stat, i, j, vals, svals)
            if ngood:
                _sort_desc(vals, svals, ngood)
                m = ngood // 2
                if ngood & 1:
                    odata[i, j] = vals[m]
                    ostat[i, j] = svals[m]
                else:
                    odata[i, j] = 0.5 * (vals[m] + vals[m - 1])
                    ostat[i, j] = svals[m] + svals[m - 1]
                odq[i, j] = 0
            else:
                best, outdq = _fallback(dq, i, j)
                odata[i, j] = data[best, i, j]
                ostat[i, j] = stat[best, i, j]
                odq[i, j] = outdq


@njit(cache=True, nogil=True)
def _minmax(data, dq, stat, nlow, nhigh, nkeep, odata, odq, ostat):
    n, ny, nx = data.shape
    vals = np.empty(n, dtype=np.float64)
    svals = np.empty(n, dtype=np.float64)
    for i in range(ny):
        for j in range(nx):
            ngood = _good_values(data, dq, stat, i, j, vals, svals)
            npix = ngood - nhigh - nlow
            if ngood > 0:
                outdq = np.uint32(0)
                if npix > 0 and npix < nkeep:
                    for k in range(n):
                        if npix >= nkeep:
                            break
                        if dq[k, i, j] != 0:
                            vals[ngood] = data[k, i, j]
                            svals[ngood] = stat[k, i, j]
                            outdq |= dq[k, i, j]
                            ngood += 1
                            npix += 1
                _sort_desc(vals, svals, ngood)
                sd = 0.0
                ss = 0.0
                for k in range(nhigh, nhigh + max(npix, 0)):
                    sd += vals[k]
                    ss += svals[k]
                if npix == 0:
                    odata[i, j] = np.nan
                    ostat[i, j] = np.nan
                else:
                    odata[i, j] = sd / npix
                    ostat[i, j] = ss / npix / npix
                odq[i, j] = outdq
            else:
                best, outdq = _fallback(dq, i, j)
                odata[i, j] = data[best, i, j]
                ostat[i, j] = stat[best, i, j]
                odq[i, j] = outdq


@njit(cache=True, nogil=True)
def _sigclip_pixel(data, dq, stat, lsigma, hsigma, odata, odq, ostat, i, j, vals, svals, work):
    """Sigma clipping of one pixel of the stack (see the module docstring)."""
    ngood = _good_values(data, dq, stat, i, j, vals, svals)
    if ngood == 0:
        best, outdq = _fallback(dq, i, j)
        odata[i, j] = data[best, i, j]
        ostat[i, j] = stat[best, i, j]
        odq[i, j] = outdq
        return
    med = median(vals, ngood, work, 2.0)
    mdev = 0.0
    for k in range(ngood):
        mdev += abs(vals[k] - med)
    mdev /= ngood
    lo = med - lsigma * mdev
    hi = med + hsigma * mdev
    sd = 0.0
    ss = 0.0
    nkept = 0
    for k in range(ngood):
        if not (hi > lo) or (vals[k] >= lo and vals[k] <= hi):
            sd += vals[k]
            ss += svals[k]
            nkept += 1
    odata[i, j] = sd / nkept if nkept else np.nan
    ostat[i, j] = ss / nkept / nkept if nkept else np.nan
    odq[i, j] = 0


@njit(cache=True, nogil=True)
def _sigclip(data, dq, stat, lsigma, hsigma, odata, odq, ostat):
    n, ny, nx = data.shape
    vals = np.empty(n, dtype=np.float64)
    svals = np.empty(n, dtype=np.float64)
    work = np.empty(n + 100, dtype=np.float64)
    for i in range(ny):
        for j in range(nx):
            if n == 3 and dq[0, i, j] == 0 and dq[1, i, j] == 0 and dq[2, i, j] == 0:
                # the usual case written out: the same arithmetic in the same order as the pixel
                # function (the middle of three finite values is the median)
                a, b, c = np.float64(data[0, i, j]), np.float64(data[1, i, j]), np.float64(data[2, i, j])
                if a == a and b == b and c == c:
                    med = max(min(a, b), min(max(a, b), c))
                    mdev = (abs(a - med) + abs(b - med) + abs(c - med)) / 3
                    lo = med - lsigma * mdev
                    hi = med + hsigma * mdev
                    everything = not (hi > lo)
                    sd = 0.0
                    ss = 0.0
                    nkept = 0
                    if everything or (a >= lo and a <= hi):
                        sd += a
                        ss += np.float64(stat[0, i, j])
                        nkept += 1
                    if everything or (b >= lo and b <= hi):
                        sd += b
                        ss += np.float64(stat[1, i, j])
                        nkept += 1
                    if everything or (c >= lo and c <= hi):
                        sd += c
                        ss += np.float64(stat[2, i, j])
                        nkept += 1
                    odata[i, j] = sd / nkept
                    ostat[i, j] = ss / nkept / nkept
                    odq[i, j] = 0
                    continue
            _sigclip_pixel(data, dq, stat, lsigma, hsigma, odata, odq, ostat, i, j, vals, svals, work)


def scale_to_first_exptime(images: list[MuseImage]) -> None:
    """Scale exposures 2..n in place to the first one's EXPTIME (data x f, variance x f^2, f as float32)."""
    t0 = float(images[0].header["EXPTIME"])
    for image in images[1:]:
        scale = t0 / float(image.header["EXPTIME"])
        image.data *= np.float32(scale)  # float factors, as cpl_image_multiply_scalar
        image.stat *= np.float32(scale * scale)
        image.header["EXPTIME"] = t0


def _combined_header(header: fits.Header) -> fits.Header:
    out = header.copy()
    for key in list(out.keys()):
        if key.startswith("MUSE TMP"):
            del out[key]
    return out


def combine_exposures(images: list[MuseImage], settings: Settings) -> MuseImage:
    """Combine processed exposures of one IFU with ``settings.combine`` (see module doc).

    With ``settings.scale`` the inputs are scaled in place first.  The
    output header is the first input's, without temporary keywords.
    """
    if not images:
        raise InputError("no exposures to combine")
    if len(images) == 1:
        only = images[0]
        return MuseImage(only.data.copy(), only.dq.copy(), only.stat.copy(), _combined_header(only.header))
    shape = images[0].data.shape
    for image in images:
        if image.data.shape != shape:
            raise InputError("exposures to combine have different sizes")
    if settings.scale:
        scale_to_first_exptime(images)
    method = settings.combine
    n = len(images)
    if method is Combine.MINMAX:
        if n - settings.nhigh - settings.nlow < settings.nkeep or n - settings.nhigh <= 0:
            raise InputError(f"Not enough images left after minmax rejection: {n} input images, "
                             f"min={settings.nlow}, max={settings.nhigh}, keep={settings.nkeep}")
    elif method is Combine.SIGCLIP and n < 3:
        raise InputError("Sigma clipping requires at least 3 images!")
    odata = np.empty(shape, dtype=np.float32)
    odq = np.empty(shape, dtype=np.uint32)
    ostat = np.empty(shape, dtype=np.float32)
    for r0 in range(0, shape[0], CHUNK_ROWS):
        rows = slice(r0, min(r0 + CHUNK_ROWS, shape[0]))
        data = np.stack([im.data[rows] for im in images]).astype(np.float32, copy=False)
        dq = np.stack([im.dq[rows] for im in images]).astype(np.uint32, copy=False)
        stat = np.stack([im.stat[rows] for im in images]).astype(np.float32, copy=False)
        out = (odata[rows], odq[rows], ostat[rows])
        if method is Combine.AVERAGE:
            _average(data, dq, stat, *out)
        elif method is Combine.MEDIAN:
            _median(data, dq, stat, *out)
        elif method is Combine.MINMAX:
            _minmax(data, dq, stat, settings.nlow, settings.nhigh, settings.nkeep, *out)
        else:
            _sigclip(data, dq, stat, settings.lsigma, settings.hsigma, *out)
    return MuseImage(odata, odq, ostat, _combined_header(images[0].header))


# --------------------------------------------------------------------------
# bad-pixel interpolation


@njit(cache=True, nogil=True)
def _interpolate(values, bad):
    """Replace bad pixels by the mean of their good 8-neighbours, pass after pass.

    A pass only uses pixels that were good at its start; pixels without any
    good neighbour wait for the next pass.
    """
    ny, nx = values.shape
    current = bad.copy()
    while True:
        snapshot = current.copy()
        progress = False
        left = False
        for i in range(ny):
            for j in range(nx):
                if not snapshot[i, j]:
                    continue
                s = 0.0
                c = 0
                if j > 0:
                    if not snapshot[i, j - 1]:
                        s += values[i, j - 1]
                        c += 1
                    if i > 0 and not snapshot[i - 1, j - 1]:
                        s += values[i - 1, j - 1]
                        c += 1
                    if i + 1 < ny and not snapshot[i + 1, j - 1]:
                        s += values[i + 1, j - 1]
                        c += 1
                if i > 0 and not snapshot[i - 1, j]:
                    s += values[i - 1, j]
                    c += 1
                if i + 1 < ny and not snapshot[i + 1, j]:
                    s += values[i + 1, j]
                    c += 1
                if j + 1 < nx:
                    if not snapshot[i, j + 1]:
                        s += values[i, j + 1]
                        c += 1
                    if i > 0 and not snapshot[i - 1, j + 1]:
                        s += values[i - 1, j + 1]
                        c += 1
                    if i + 1 < ny and not snapshot[i + 1, j + 1]:
                        s += values[i + 1, j + 1]
                        c += 1
                if c > 0:
                    values[i, j] = s / c
                    current[i, j] = False
                    progress = True
                else:
                    left = True
        if not left or not progress:
            return not left


def interpolate_bad_pixels(image: MuseImage, in_place: bool = False) -> MuseImage:
    """Interpolate DQ-flagged pixels of data and variance from their neighbours; keep the DQ.

    With ``in_place`` the image's own arrays are changed (and it is returned).
    """
    bad = image.dq != 0
    if not in_place:
        image = MuseImage(image.data.copy(), image.dq.copy(), image.stat.copy(), image.header.copy())
    if bad.any():
        if bad.all():
            raise InputError("the combined image has no unflagged pixel (saturated or bad in every "
                             "exposure), nothing to interpolate from")
        _interpolate(image.data, bad)
        _interpolate(image.stat, bad)
    return image


# --------------------------------------------------------------------------
# QC


def image_stats(data: np.ndarray, rejected: np.ndarray | None = None) -> dict[str, float]:
    """cpl_stats of a float image: median (float arithmetic), mean, stdev (n-1), min, max, flux."""
    values = data[~rejected] if rejected is not None else data.ravel()
    values = np.ascontiguousarray(values, dtype=np.float32)
    n = values.size
    if n == 0:
        raise InputError("no good pixels for image statistics")
    total, mean, varsum, vmin, vmax = _moments(values)  # in pixel order, before the partition
    middle = median_of(values, overwrite=rejected is not None)  # a fresh copy then: partitioned in place
    stdev = math.sqrt(varsum / (n - 1)) if n > 1 else 0.0
    return dict(MEDIAN=middle, MEAN=mean, STDEV=stdev, MIN=float(vmin), MAX=float(vmax),
                INTFLUX=total)


@njit(cache=True, nogil=True)
def _moments(values):
    """Sum, mean, sum of squared deviations (two passes, double), min and max of a float array."""
    total = 0.0
    vmin = values[0]
    vmax = values[0]
    for v in values:
        total += v
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    mean = total / values.size
    varsum = 0.0
    for v in values:
        d = v - mean
        varsum += d * d
    return total, mean, varsum, vmin, vmax


def _f32(value: float) -> float:
    return float(np.float32(value))


def exposure_qc(images: list[MuseImage], ifu: int, rejected: np.ndarray | None = None) -> dict[str, float | int]:
    """QC TWILIGHTm INPUTi MEDIAN/MEAN/STDEV/MIN/MAX (float) and NSATURATED of the inputs.

    ``rejected``: pixels ESO's image statistics skip (flat == 0, see
    basicproc.ProcessedExposures.flat_zero).  Call after combine_exposures, as ESO does (scaled data).
    """
    qc: dict[str, float | int] = {}
    for k, image in enumerate(images, start=1):
        prefix = f"ESO QC TWILIGHT{ifu} INPUT{k}"
        stats = image_stats(image.data, rejected)
        for key in ("MEDIAN", "MEAN", "STDEV", "MIN", "MAX"):
            qc[f"{prefix} {key}"] = _f32(stats[key])
        qc[f"{prefix} NSATURATED"] = int(image.header.get(NSAT_KEY, 0))
    return qc


def master_qc(master: MuseImage, ifu: int) -> dict[str, float]:
    """QC TWILIGHTm MASTER MEDIAN/MEAN/STDEV/MIN/MAX/INTFLUX of the combined image (all pixels)."""
    stats = image_stats(master.data)
    prefix = f"ESO QC TWILIGHT{ifu} MASTER"
    return {f"{prefix} {key}": _f32(stats[key])
            for key in ("MEDIAN", "MEAN", "STDEV", "MIN", "MAX", "INTFLUX")}


def add_qc(header: fits.Header, qc: dict) -> None:
    """Write QC values into a header (HIERARCH keywords)."""
    for key, value in qc.items():
        header[f"HIERARCH {key}"] = value
