"""CPL's numerical primitives, reproduced to the last bit, in one place.

The stages follow ESO's results bit for bit where CPL's arithmetic decides them:
running means and variances, medians (and the selection behind them), Cholesky
solves, and the 1D and 2D least-squares polynomial fits with their summation
orders.  Everything here is a Numba kernel or a thin NumPy front end of one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def cholesky_solve(matrix, rhs):
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite matrix, as CPL does.

    CPL's cpl_matrix_decomp_chol reads the upper triangle and writes the factor below
    the diagonal (``matrix`` is overwritten); the forward and back substitutions follow
    cpl_matrix_solve_chol's order, so that results agree with CPL to the last bit.
    Returns ``(rhs, ok)``; ``ok`` is False when the matrix is not positive definite.
    """
    nc = matrix.shape[0]
    for i in range(nc):
        for j in range(i, nc):
            total = matrix[i, j]
            for k in range(i - 1, -1, -1):
                total -= matrix[i, k] * matrix[j, k]
            if j > i:
                matrix[j, i] = total / matrix[i, i]
            elif total > 0.0:
                matrix[i, i] = np.sqrt(total)
            else:
                return rhs, False
    for i in range(nc):
        total = rhs[i]
        for j in range(i - 1, -1, -1):
            total -= matrix[i, j] * rhs[j]
        rhs[i] = total / matrix[i, i]
    for i in range(nc - 1, -1, -1):
        total = rhs[i]
        for j in range(i + 1, nc):
            total -= matrix[j, i] * rhs[j]
        rhs[i] = total / matrix[i, i]
    return rhs, True


@njit(cache=True, nogil=True)
def running_mean(values):
    """Mean by the running recurrence m += (v - m) / (i + 1), as CPL computes vector means."""
    mean = 0.0
    for i in range(values.size):
        mean += (values[i] - mean) / (i + 1)
    return mean


@njit(cache=True, nogil=True)
def running_stdev(values):
    """Sample standard deviation from CPL's running variance recurrence."""
    varsum = 0.0
    mean = 0.0
    for i in range(values.size):
        delta = values[i] - mean
        varsum += i * delta * (delta / (i + 1))
        mean += delta / (i + 1)
    return math.sqrt(varsum / (values.size - 1))


@njit(cache=True, nogil=True)
def column_mean(values):
    """cpl_table_get_column_mean: the double sum in row order, divided by the count."""
    total = 0.0
    for i in range(values.size):
        total += values[i]
    return total / values.size


@njit(cache=True, nogil=True)
def ordered_dot(a, b):
    """sum(a * b) accumulated in index order (CPL's vector products)."""
    total = 0.0
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@njit(cache=True, nogil=True)
def polyfit_1d(x, y, nc):
    """cpl_polynomial_fit in 1D: least squares of degree nc-1 as CPL computes it.

    Mean-centred positions, the normal (Hankel) matrix accumulated with running
    powers, Cholesky solve, then the Taylor shift back to powers of x.  Fits of order
    10-15 are so ill-conditioned that any other solver gives visibly different
    polynomials.  Returns (coefficients in increasing powers, ok)."""
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


@njit(cache=True, nogil=True)
def polyfit_2d(x, y, values, xorder, yorder):
    """cpl_polynomial_fit in 2D: normal equations in CPL's summation order, Cholesky.

    Returns (coefficients, ok); the coefficient of x**i * y**j is at
    j * (xorder + 1) + i.  ``ok`` is False where CPL finds a non-positive pivot.
    """
    npts = values.size
    nc = (xorder + 1) * (yorder + 1)
    design = np.empty((nc, npts))
    for p in range(npts):
        yvalue = 1.0
        k = 0
        for _ in range(yorder + 1):
            xvalue = 1.0
            for _ in range(xorder + 1):
                design[k, p] = xvalue * yvalue
                k += 1
                xvalue *= x[p]
            yvalue *= y[p]
    normal = np.zeros((nc, nc))
    for i in range(nc):
        for j in range(i, nc):
            total = 0.0
            for p in range(npts):
                total += design[i, p] * design[j, p]
            normal[i, j] = total
    rhs = np.zeros(nc)
    for start in range(0, npts, 48):  # cpl_matrix_product's blocking
        stop = min(start + 48, npts)
        for i in range(nc):
            total = 0.0
            for p in range(start, stop):
                total += design[i, p] * values[p]
            rhs[i] += total
    rhs, ok = cholesky_solve(normal, rhs)
    if not ok:
        return rhs, False
    for i in range(nc):
        if np.isnan(rhs[i]):
            return rhs, False
    return rhs, True


def horner_long_double(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Evaluate like cpl_polynomial_eval_1d: Horner's rule in long double, rounded to double."""
    xl = np.asarray(x, dtype=np.float64).astype(np.longdouble)
    result = np.full(xl.shape, np.longdouble(c[-1]))
    for coef in c[-2::-1]:
        result = xl * result + np.longdouble(coef)
    return result.astype(np.float64)


@njit(cache=True, nogil=True)
def kth_smallest(buf, n, k):
    """The k-th smallest (0-based) of buf[:n] by quickselect; partially reorders buf."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = buf[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return buf[k]
    return buf[k]


@njit(cache=True, nogil=True)
def middle_pair(vals, n, k, work):
    """The k-th and (k+1)-th smallest of vals[:n] (0-based; the second is meaningful
    only for k + 1 < n), in the precision of ``vals``.  A sorted sample brackets the k-th value, one pass keeps the
    values inside the bracket, and only those are selected; falls back to a
    full quickselect when the bracket misses.  ``work`` needs n + 100 slots."""
    nsample = 100
    if n > 4 * nsample:
        sample = work[n:n + nsample]
        stride = n // nsample
        for m in range(nsample):  # insertion sort of an evenly strided sample
            v = vals[m * stride]
            q = m
            while q > 0 and sample[q - 1] > v:
                sample[q] = sample[q - 1]
                q -= 1
            sample[q] = v
        pos = (k * nsample) // n
        lo = sample[pos - 12] if pos >= 12 else -np.inf
        hi = sample[pos + 13] if pos + 13 < nsample else np.inf
        nlow = 0
        nmid = 0
        for m in range(n):
            v = vals[m]
            nlow += v < lo
            work[nmid] = v
            nmid += (v >= lo) & (v <= hi)
        if nlow <= k and k + 1 < nlow + nmid:
            first = kth_smallest(work, np.int64(nmid), np.int64(k - nlow))
            second = work[k - nlow + 1] if k - nlow + 1 < nmid else first  # in the data's precision
            for m in range(k - nlow + 2, nmid):
                if work[m] < second:
                    second = work[m]
            return first, second
    for m in range(n):
        work[m] = vals[m]
    first = kth_smallest(work, n, k)
    second = work[k + 1] if k + 1 < n else first
    for m in range(k + 2, n):
        if work[m] < second:
            second = work[m]
    return first, second


@njit(cache=True, nogil=True)
def median(vals, n, work, two):
    """CPL's median of vals[:n] (unchanged): the middle value, or ``a + (b - a) / two``
    of the two middle ones.  ``two`` is 2 in the arithmetic's precision: np.float32(2)
    for CPL's float images and columns, 2.0 for double vectors.  ``work`` (of the type of
    vals, n + 100 slots) holds the selection."""
    if n == 3:  # the usual stack of three exposures: branch-free middle of three (no NaN)
        a, b, c = vals[0], vals[1], vals[2]
        if a == a and b == b and c == c:
            return max(min(a, b), min(max(a, b), c))
    if n <= 16:  # a few values (e.g. one pixel of a stack of exposures): insertion sort
        for a in range(n):
            v = vals[a]
            b = a - 1
            while b >= 0 and work[b] > v:
                work[b + 1] = work[b]
                b -= 1
            work[b + 1] = v
        if n % 2 == 1:
            return work[(n - 1) // 2]
        return work[n // 2 - 1] + (work[n // 2] - work[n // 2 - 1]) / two
    if n % 2 == 1:
        return middle_pair(vals, n, (n - 1) // 2, work)[0]
    a, b = middle_pair(vals, n, n // 2 - 1, work)
    return a + (b - a) / two


@njit(cache=True, nogil=True)
def median_float(vals, n, work):
    """CPL's median of float32 data held in a float64 buffer vals[:n]: the middle pair selected
    in double (the same values), the midpoint a + (b - a) / 2 in single precision."""
    if n % 2 == 1:
        return np.float32(median(vals, n, work, 2.0))
    a, b = middle_pair(vals, n, n // 2 - 1, work)
    low, high = np.float32(a), np.float32(b)
    return low + (high - low) / np.float32(2.0)


def median_of(values: np.ndarray, overwrite: bool = False) -> float:
    """CPL's median of a NumPy array in its own precision (float32 for CPL float data): the
    middle value, or ``a + (b - a) / 2`` of the middle pair computed in that precision.

    One partition at the upper middle: the lower middle is then the largest value before it.
    With ``overwrite`` the array (a private copy of the caller's) is partitioned in place."""
    values = np.ravel(values)
    n = values.size
    if n == 0:
        return float("nan")
    work = values if overwrite else values.copy()
    half = n // 2
    work.partition(half)
    high = work[half]
    if n % 2:
        return float(high)
    low = work[:half].max()
    two = values.dtype.type(2) if values.dtype.kind == "f" else 2.0
    return float(low + (high - low) / two)
