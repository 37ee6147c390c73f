"""A joint illumination and vignetting model for TWILIGHT_CUBE (``--illum-model=joint``).

ESO's model (:func:`musetwilight.core.smooth.postprocess`, the default) treats every wavelength
plane of DATACUBE_SKYFLAT on its own: a 5x7 median filter, one global 2D polynomial,
normalisation, and a separate polynomial fit of the vignetted edge on the white-light image.
That model class cannot hold what the data carry:

- the recipe divides every IFU by its integrated flux relative to IFU 1 (``ESO DRS MUSE FLAT
  FLUX SKYn``; the science merge restores the IFU levels from that keyword), so the cube has
  a level step at every IFU boundary, and each IFU has its own relay optics (its own
  sky-versus-lamp illumination);
- the 4 slicer stacks of an IFU are separate optics too (steps at stack boundaries);
- the illumination changes smoothly with wavelength, so fitting 17 planes independently
  spends the noise of each plane on its own;
- the vignetting has a shape of its own, which a thresholded 4x4 polynomial fitted after the
  global field (and on top of its errors) follows only roughly, and that fit can fail.

This module fits the whole cube at once, in log space (all factors are multiplicative)::

    log D(s, k) = alpha_k + sum_r L_r(w_k) Phi_r(s) + noise,   r = 0 .. lambda_order

- ``alpha_k``: the level of plane k (twilight spectrum over lamp; arbitrary, each output plane
  is normalised to mean 1 over all spaxels, as ESO does);
- ``L_r``: Legendre polynomials in the wavelength mapped onto -1..1: smooth in wavelength,
  fitted at the mean wavelength of each plane's data (the end planes are halved by the
  wavelength cut) and evaluated at the plane centres;
- ``Phi_r(s)`` for spaxel s: a global field (Legendre tensor in u, v: the whole instrument
  field of GEOMETRY_TABLE mapped onto -1..1, with a weak Gaussian prior) + per-IFU terms
  (level; x slope u; y slope eta = (y - yc)/6 over the IFU's 12 slice rows; in A_1 a
  chromatic level) + per-stack terms (level, x slope over the stack width) + the vignetting (a
  cubic B-spline surface over the vignetted zone: the adapted VIGNETTING_MASK in WFM or the top
  ``vignnfmmask`` rows in NFM, widened by a margin; zero, with zero slope, on its sides inside
  the field; a curvature prior in log per spaxel^2).  Per-IFU and per-stack terms enter a
  spaxel with the fraction of its area that the IFU's / stack's slices cover (from
  GEOMETRY_TABLE), so a stack edge inside a spaxel is modelled as such; spaxels outside the
  slices take the terms of their row neighbours;
- ``A_0`` also has one random level per slice (what ILLUM corrects: slice efficiencies left
  by the lamp flat), with a scatter estimated from the data; it is marginalised in the fit
  (so the smooth terms get their real uncertainty) and left out of the product.

It is solved as a sequence of weighted least-squares problems that together are the joint
fit: per spaxel, the spectrum (minus ``alpha``) is fitted with the ``L_r`` (inverse-variance
weights from the Poisson level of the model, the scale from the residuals; a Numba kernel);
the coefficient images ``A_r(s)`` are then fitted with the spatial model (sparse normal
equations, the slice levels eliminated by a Schur complement; weights 1 / (noise variance of
A_r + a structure term estimated from the residuals)); ``alpha``, the voxel weights and the
clipping are updated and the loop repeated.  Per-IFU levels have no prior: the recipe's flux
scaling makes them arbitrary.  The prior scales of the per-IFU slopes and of the per-stack
terms are estimated from the data (empirical Bayes, from groups of at least 8 terms; terms of
IFUs inside the vignetted zone share them without setting them), so that terms the data do
not support shrink towards zero.  Robustness: Tukey biweights on the spaxel residuals of
``A_0``, a 5-sigma clip of voxel residuals (cosmic rays), and the partly illuminated spaxels
next to slice-stack edges are not fitted, only evaluated.  Planes without data take the
smooth wavelength model.

The options (:class:`JointOptions`) were chosen on the training seeds (0-4) of the truth
families of :mod:`musetwilight.tools.simulate` (``benchmarks/bench_illumination.py``); the
benchmark reports on seeds 5-9.

Pure functions on NumPy arrays; the TWILIGHT_CUBE keeps ESO's layout
(:func:`postprocess_joint` returns a :class:`musetwilight.core.smooth.TwilightResult`).
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit
from numpy.polynomial import legendre
from scipy import sparse
from scipy.interpolate import BSpline
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.ndimage import binary_dilation, distance_transform_edt

from ..errors import InputError
from ..instrument import IFU_HALF_HEIGHT, SLICES_PER_STACK, is_nfm
from ..params import Settings
from .smooth import (
    TwilightResult,
    _divide,
    _edge_exclusion,
    _mean_good,
    _scale,
    adapt_vignetting_mask,
    checked_cube_and_white,
    collapse,
    nfm_vignetting_mask,
    white_light_mask,
)

log = logging.getLogger(__name__)

STACKS_PER_IFU = 4
TUKEY_MAD = 1.4826  # MAD -> sigma of a Gaussian


@dataclass(frozen=True)
class JointOptions:
    """Choices of the joint model (fixed on the training seeds; see the module docstring).

    Orders are maximum powers; ``global_order`` is for the wavelength-mean image ``A_0``,
    ``chroma_order`` for ``A_r``, r >= 1.  Per-IFU terms enter ``A_r`` for
    r <= ``ifu_lambda_order``, per-stack and vignetting terms for r <= their own orders.
    ``sigma_*`` are prior standard deviations (log units): where empirical Bayes applies they
    are only the starting values (and the scales of groups too small to estimate).
    ``vign_intervals`` / ``nfm_intervals`` are the B-spline knot intervals (x, y) over the
    zone, ``vign_margin`` how far (spaxels) the zone reaches beyond the mask,
    ``vign_curvature`` / ``nfm_curvature`` the prior standard deviations of the surface's
    second derivatives (log per spaxel^2, x and y).  ``iterations`` outer loops (spectra and
    voxel weights), ``inner_iterations`` spatial solves per loop; ``edge_exclusion``: spaxels
    closer than this (spaxels) to a stack edge are not fitted.
    """

    lambda_order: int = 3
    global_order: tuple[int, int] = (2, 2)
    chroma_order: tuple[int, int] = (3, 3)
    ifu_terms: bool = True
    ifu_lambda_order: int = 1
    sigma_ifu_level: float = 1.0
    sigma_ifu_slope: float = 0.003
    sigma_ifu_chroma: float = 0.003
    stack_terms: bool = True
    stack_lambda_order: int = 0
    sigma_stack_level: float = 0.003
    sigma_stack_slope: float = 0.003
    vign_intervals: tuple[int, int] = (8, 8)
    nfm_intervals: tuple[int, int] = (4, 10)
    vign_margin: int = 3
    vign_curvature: tuple[float, float] = (0.03, 0.03)  # WFM corner: x, y [log per spaxel^2]
    nfm_curvature: tuple[float, float] = (0.001, 0.03)  # NFM top band: x, y [log per spaxel^2]
    vign_edge_stiffness: float = 30.0
    sigma_vign: float = 1.0
    sigma_global: float = 0.5
    slice_sigma_max: float = 0.02
    vign_lambda_order: int = 0
    tukey: float = 4.685
    voxel_clip: float = 5.0
    iterations: int = 2
    inner_iterations: int = 3
    min_planes: int = 6
    edge_exclusion: float = 1.5
    min_coverage: float = 0.0
    slice_terms: bool = True
    slice_sigma_start: float = 0.005
    empirical_bayes: bool = True
    eb_min_terms: int = 8
    sigma_floor: float = 1e-4
    sigma_cap: float = 0.02

    def replace(self, **changes: Any) -> JointOptions:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return JointOptions(**values)


@dataclass
class FieldLayout:
    """Which IFU and slice stack covers each spaxel (fractions of its area), from GEOMETRY_TABLE.

    ``stack_frac`` is a sparse (ny * nx, n_labels) matrix, label = index of (IFU, stack) in
    ``labels`` (:meth:`label_image` gives one as an image); ``coverage`` (ny, nx) the covered
    area fraction (before normalising the fractions).
    ``ifu_yc`` and ``stack_xc`` / ``stack_hw`` are the centres and half widths the slopes use.
    """

    labels: np.ndarray  # (n_labels, 2) int: IFU number, stack 0..3
    stack_frac: sparse.csr_matrix  # (ny * nx, n_labels), each covered row sums to 1
    coverage: np.ndarray  # float (ny, nx)
    ifu_yc: dict[int, float]
    stack_xc: np.ndarray  # (n_labels,)
    stack_hw: np.ndarray
    edge_distance: np.ndarray | None = None  # (ny, nx) distance [spaxels] to the nearest stack x edge
    slice_id: np.ndarray | None = None  # (ny, nx) index of the slice covering most of a spaxel, -1 none
    extent: tuple[float, float, float, float] | None = None  # x0, x1, y0, y1 of the whole instrument field

    @property
    def ifus(self) -> list[int]:
        return sorted({int(i) for i in self.labels[:, 0]})

    def label_image(self, index: int) -> np.ndarray:
        """Area fraction (ny, nx) of label ``index`` (an IFU's slice stack)."""
        return self.stack_frac[:, [index]].toarray().reshape(self.coverage.shape)

    def ifu_frac(self) -> tuple[list[int], np.ndarray]:
        """IFU numbers and their area fractions (n_ifu, ny, nx)."""
        ifus = self.ifus
        onehot = (self.labels[:, 0][:, None] == np.array(ifus)[None, :]).astype(float)
        frac = np.asarray(self.stack_frac @ onehot).T.reshape((len(ifus),) + self.coverage.shape)
        return ifus, frac


def _overlap(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Length of [lo, hi] inside each unit cell [c - 0.5, c + 0.5]: (n_intervals, n_cells)."""
    return np.clip(np.minimum(hi[:, None], centres[None, :] + 0.5)
                   - np.maximum(lo[:, None], centres[None, :] - 0.5), 0.0, None)


def layout_from_geometry(subfield, slice_sky, x, y, width, crval1: float, crval2: float, nx: int, ny: int,
                         ifus=None) -> FieldLayout:
    """:class:`FieldLayout` of a cube grid (spaxel (i, j) at crval1 + i, crval2 + j) from geometry columns.

    A slice covers x - width/2 .. x + width/2 and y - 0.5 .. y + 0.5 (one slice row); its stack
    is (SliceSky - 1) // 12.  ``ifus`` restricts the layout to the IFUs in the cube.
    """
    subfield = np.asarray(subfield, int)
    stack = (np.asarray(slice_sky, int) - 1) // SLICES_PER_STACK
    x, y, width = (np.asarray(a, float) for a in (x, y, width))
    extent = (float((x - width / 2).min()), float((x + width / 2).max()), float(y.min() - 0.5), float(y.max() + 0.5))
    keep = np.ones(subfield.size, bool) if ifus is None else np.isin(subfield, list(ifus))
    subfield, stack, x, y, width = subfield[keep], stack[keep], x[keep], y[keep], width[keep]
    ox = _overlap(x - width / 2, x + width / 2, crval1 + np.arange(nx))
    oy = _overlap(y - 0.5, y + 0.5, crval2 + np.arange(ny))
    oy[oy < 0.2] = 0.0  # a sliver of the next slice row (geometry jitter) does not make a spaxel its own
    label_of = subfield * STACKS_PER_IFU + stack
    codes, label_index = np.unique(label_of, return_inverse=True)
    order = np.argsort(label_index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(label_index, minlength=codes.size))])
    xc, hw = np.zeros(codes.size), np.ones(codes.size)
    slice_for_row = np.full((codes.size, ny), -1, np.int64)  # the slice of a label that covers a row most
    parts = []
    for index in range(codes.size):  # one small block per (IFU, stack), not per spaxel
        members = order[starts[index]:starts[index + 1]]
        oym, oxm = oy[members], ox[members]
        rows, cols = np.nonzero(oym.any(axis=0))[0], np.nonzero(oxm.any(axis=0))[0]
        lo, hi = (x - width / 2)[members].min(), (x + width / 2)[members].max()
        xc[index], hw[index] = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
        if rows.size == 0 or cols.size == 0:
            continue
        block = oym[:, rows].T @ oxm[:, cols]
        keep = block > 0
        pixel = rows[:, None] * nx + cols[None, :]
        parts.append((np.full(int(keep.sum()), index), pixel[keep], block[keep]))
        best = np.argmax(oym[:, rows], axis=0)
        slice_for_row[index, rows] = members[best]
    lab, pix, val = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in range(3))
    lab, pix = lab.astype(np.int64), pix.astype(np.int64)
    coverage = np.bincount(pix, val, ny * nx)
    ranked = np.lexsort((-val, pix))  # per spaxel, the label covering most of it first
    first = ranked[np.unique(pix[ranked], return_index=True)[1]]
    dominant = np.full(ny * nx, -1, np.int64)
    dominant[pix[first]] = lab[first]
    frac = sparse.csr_matrix((val / coverage[pix], (pix, lab)), shape=(ny * nx, codes.size), dtype=np.float64)
    coverage = coverage.reshape(ny, nx)
    ifu_yc = {int(i): float(y[subfield == i].mean()) for i in np.unique(subfield)}
    labels = np.column_stack([codes // STACKS_PER_IFU, codes % STACKS_PER_IFU]).astype(int)
    # distance of each spaxel centre to the x edges of the stack that covers most of it (slice-edge
    # CCD pixels are partly illuminated: the cube is low within about a spaxel of a stack edge)
    xs = crval1 + np.arange(nx)
    edges = np.minimum(np.abs(xs[None, :] - (xc - hw)[:, None]), np.abs(xs[None, :] - (xc + hw)[:, None]))
    covered = dominant >= 0
    col, row = np.arange(ny * nx) % nx, np.arange(ny * nx) // nx
    dist: np.ndarray = np.zeros(ny * nx)  # no slice there: data only by the resampling's spill, not fitted
    dist[covered] = edges[dominant[covered], col[covered]]
    slice_id: np.ndarray = np.full(ny * nx, -1, np.int32)
    slice_id[covered] = slice_for_row[dominant[covered], row[covered]]
    dist, slice_id = dist.reshape(ny, nx), slice_id.reshape(ny, nx)
    return FieldLayout(labels, frac, coverage, ifu_yc, xc, hw, dist, slice_id, extent)


def _extend_labels(layout: FieldLayout, covered: np.ndarray) -> sparse.csr_matrix:
    """Label fractions (ny * nx, n_labels) with every uncovered spaxel given those of the nearest covered one."""
    if covered.all() or not covered.any():
        return layout.stack_frac
    # nearest along the row first (the IFUs are stacked in rows: a spaxel beyond the end of a
    # slice row belongs to that row's IFU), then across rows
    _, (iy, ix) = distance_transform_edt(~covered, sampling=(16.0, 1.0), return_indices=True)
    return layout.stack_frac[(iy * covered.shape[1] + ix).ravel()]


# --------------------------------------------------------------------------------------------
# OpenBLAS threads


@contextmanager
def single_threaded_blas():
    """Run the enclosed code with one OpenBLAS thread (restored afterwards).

    The matrices of the joint fit are small (a few hundred rows); OpenBLAS's threads then
    cost more than they give, and on a busy machine their spin-waits make the fit several
    times slower.  The libraries loaded by NumPy and SciPy are found in /proc/self/maps and set
    through their ``*openblas_set_num_threads*`` entry points (as threadpoolctl does); where
    that is not possible nothing changes.
    """
    restore = []
    try:
        maps = open("/proc/self/maps").read()
        paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps)))
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                try:
                    getter = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                    setter = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                except AttributeError:
                    continue
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                restore.append((setter, int(getter())))
                setter(1)
                break
            else:
                continue
            break
    try:
        yield
    finally:
        for setter, threads in restore:
            setter(threads)


# --------------------------------------------------------------------------------------------
# the spectrum of every spaxel in Legendre polynomials


@njit(cache=True, nogil=True)
def _spectra_fit(y, w, leg, alpha):
    """Per spaxel n: weighted least squares of y[:, n] - alpha in the columns of ``leg``.

    ``y``, ``w`` (nz, n): log data and inverse variances (0 = unused); ``leg`` (nz, nr).
    Returns the coefficients and their variances, (nr, n) each (Cholesky of the nr x nr
    normal equations with a relative ridge of 1e-9; variance = diagonal of the inverse).
    """
    nz, n = y.shape
    nr = leg.shape[1]
    coef = np.zeros((nr, n))
    var = np.full((nr, n), np.inf)
    g = np.empty((nr, nr))
    b = np.empty(nr)
    lower = np.empty((nr, nr))
    for j in range(n):
        g[:, :] = 0.0
        b[:] = 0.0
        for k in range(nz):
            wk = w[k, j]
            if wk <= 0.0:
                continue
            rk = wk * (y[k, j] - alpha[k])
            for r in range(nr):
                lr = leg[k, r]
                b[r] += rk * lr
                for t in range(r + 1):
                    g[r, t] += wk * lr * leg[k, t]
        trace = 0.0
        for r in range(nr):
            trace += g[r, r]
        if trace <= 0.0:
            continue
        ok = True
        for r in range(nr):  # Cholesky, lower triangle
            for t in range(r + 1):
                total = g[r, t] + (1e-9 * trace if r == t else 0.0)
                for m in range(t):
                    total -= lower[r, m] * lower[t, m]
                if r == t:
                    if total <= 0.0:
                        ok = False
                        break
                    lower[r, r] = np.sqrt(total)
                else:
                    lower[r, t] = total / lower[t, t]
            if not ok:
                break
        if not ok:
            continue
        # solve L L^T x = b
        x = np.empty(nr)
        for r in range(nr):
            total = b[r]
            for m in range(r):
                total -= lower[r, m] * x[m]
            x[r] = total / lower[r, r]
        for r in range(nr - 1, -1, -1):
            total = x[r]
            for m in range(r + 1, nr):
                total -= lower[m, r] * x[m]
            x[r] = total / lower[r, r]
        # diagonal of the inverse: sum over columns of L^-1 squared
        inv = np.zeros((nr, nr))
        for c in range(nr):
            for r in range(c, nr):
                total = 1.0 if r == c else 0.0
                for m in range(c, r):
                    total -= lower[r, m] * inv[m, c]
                inv[r, c] = total / lower[r, r]
        for r in range(nr):
            coef[r, j] = x[r]
            total = 0.0
            for m in range(r, nr):
                total += inv[m, r] * inv[m, r]
            var[r, j] = total
    return coef, var


# --------------------------------------------------------------------------------------------
# bases


def _legendre(t: np.ndarray, order: int) -> np.ndarray:
    """Legendre polynomials P_0..P_order at t: (t.size, order + 1)."""
    return legendre.legvander(np.asarray(t, float).ravel(), order)


def _unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return 2.0 * (values - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(values, dtype=float)


def _bspline_basis(t: np.ndarray, lo: float, hi: float, intervals: int) -> sparse.csr_matrix:
    """Cubic B-spline design matrix (sparse) on [lo, hi] with ``intervals`` equal knot intervals."""
    intervals = max(1, min(int(intervals), int(hi - lo) or 1))
    inner = np.linspace(lo, hi, intervals + 1)
    knots = np.concatenate([[lo] * 3, inner, [hi] * 3])
    return BSpline.design_matrix(np.clip(t, lo, hi), knots, 3).tocsr()


def _clamped_columns(nbx: int, nby: int, interior: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Indices (j * nbx + i) of the tensor B-splines kept when the sides (left, right, bottom,
    top) marked interior are clamped to value and slope 0."""
    left, right, bottom, top = interior
    ix = np.arange(2 if left else 0, nbx - (2 if right else 0))
    iy = np.arange(2 if bottom else 0, nby - (2 if top else 0))
    return (iy[:, None] * nbx + ix[None, :]).ravel()


def _curvature_penalty(nbx: int, nby: int, sigma: tuple[float, float],
                       free: tuple[bool, bool, bool, bool] = (False, False, False, False),
                       edge_factor: float = 1.0) -> np.ndarray:
    """Prior precision of a (nby, nbx) coefficient grid: squared second differences along x and
    along y, with prior standard deviations ``sigma`` = (x, y) (log units).

    On the sides marked ``free`` (left, right, bottom, top: the field edge, where the spaxels
    are not fitted) the outermost second difference has ``edge_factor`` times the precision:
    the surface continues about linearly over the unfitted edge instead of bending freely.
    """
    def second(n, low, high):
        if n < 3:
            return np.zeros((0, n))
        d = np.zeros((n - 2, n))
        rows = np.arange(n - 2)
        d[rows, rows], d[rows, rows + 1], d[rows, rows + 2] = 1.0, -2.0, 1.0
        scale = np.ones(n - 2)
        if low:
            scale[0] = math.sqrt(edge_factor)
        if high:
            scale[-1] = math.sqrt(edge_factor)
        return d * scale[:, None]
    dx = np.kron(np.eye(nby), second(nbx, free[0], free[1]))
    dy = np.kron(second(nby, free[2], free[3]), np.eye(nbx))
    return dx.T @ dx / sigma[0] ** 2 + dy.T @ dy / sigma[1] ** 2


@dataclass
class _Design:
    """Spatial design matrix over a set of spaxels, in named groups of columns.

    Parameter order: the global polynomial (``dense``, n x Pg), the sparse groups (IFU, stack,
    vignetting: ``sparse_part``, n x Ps) and the slice random effects (``slice_ids``: one
    non-zero of 1 per row, -1 for none; ``nslice`` columns).
    """

    dense: np.ndarray
    sparse_part: sparse.csr_matrix
    groups: dict[str, slice]
    prior: np.ndarray  # prior precision per column (0 = none)
    penalty: dict[str, np.ndarray] = field(default_factory=dict)  # group -> extra precision block
    slice_ids: np.ndarray | None = None
    nslice: int = 0
    hyper: dict[str, np.ndarray] = field(default_factory=dict)  # prior-scale name -> the columns setting it
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # ... and further columns taking it

    @property
    def nparams(self) -> int:
        return self.dense.shape[1] + self.sparse_part.shape[1] + self.nslice

    def part(self, group: str, beta: np.ndarray) -> np.ndarray:
        """The contribution of one group of terms at every row."""
        s = self.groups[group]
        pg = self.dense.shape[1]
        if group == "global":
            return self.dense @ beta[s]
        if group == "slice":
            assert self.slice_ids is not None
            out = np.zeros(self.dense.shape[0])
            inside = self.slice_ids >= 0
            out[inside] = beta[s][self.slice_ids[inside]]
            return out
        return self.sparse_part[:, s.start - pg:s.stop - pg] @ beta[s]

    def predict(self, beta: np.ndarray) -> np.ndarray:
        total = np.zeros(self.dense.shape[0])
        for group in self.groups:
            total = total + self.part(group, beta)
        return total


def _spatial_design(rows_y: np.ndarray, rows_x: np.ndarray, shape: tuple[int, int], opts: JointOptions,
                    order: tuple[int, int], fracs: sparse.csr_matrix | None, layout: FieldLayout | None,
                    crval: tuple[float, float], with_ifu: bool, with_stack: bool,
                    vign: dict | None, with_vign: bool, chroma: bool, with_slice: bool = False) -> _Design:
    """Design matrix of one coefficient image over the spaxels (rows_y, rows_x)."""
    ny, nx = shape
    if layout is not None and layout.extent is not None:  # the whole instrument field spans -1..1
        x0, x1, y0, y1 = layout.extent
        u = _unit(rows_x.astype(float) + crval[0], x0, x1)
        v = _unit(rows_y.astype(float) + crval[1], y0, y1)
    else:
        u = _unit(rows_x.astype(float), 0, nx - 1)
        v = _unit(rows_y.astype(float), 0, ny - 1)
    pu, pv = _legendre(u, order[0]), _legendre(v, order[1])
    glob = (pv[:, :, None] * pu[:, None, :]).reshape(len(u), -1)
    gprior = np.full(glob.shape[1], 1.0 / opts.sigma_global ** 2)
    gprior[0] = 1e-8  # the constant is free (each plane is normalised)
    blocks, groups, priors, start = [None], {"global": slice(0, glob.shape[1])}, \
        [gprior], glob.shape[1]
    hyper: dict[str, np.ndarray] = {}  # prior scales estimated from the data (empirical Bayes)
    shared: dict[str, np.ndarray] = {}  # columns that take a prior scale without setting it
    inzone_label = None
    if vign is not None and layout is not None and (with_ifu or with_stack):
        # labels mostly inside the vignetted zone: their terms trade off against the vignetting
        # surface there, so they share the prior scale without setting it
        assert fracs is not None
        f = fracs[rows_y * nx + rows_x]
        zone_rows = vign["zone"][rows_y, rows_x].astype(float)
        total = np.asarray(f.sum(axis=0)).ravel()
        inzone_label = np.asarray(f.T @ zone_rows).ravel() > 0.5 * np.maximum(total, 1e-12)
    n = len(u)
    if layout is not None and (with_ifu or with_stack):
        assert fracs is not None
        f = fracs[rows_y * nx + rows_x].tocoo()  # (n, n_labels)
        big = f.data > 1e-4
        row, lab, val = f.row[big].astype(np.int64), f.col[big].astype(np.int64), f.data[big].astype(float)
        if with_ifu:
            ifus = layout.ifus
            position = {ifu: k for k, ifu in enumerate(ifus)}
            ifu_of_label = np.array([position[int(i)] for i in layout.labels[:, 0]])
            col_ifu = ifu_of_label[lab]
            yc = np.array([layout.ifu_yc[i] for i in ifus])
            y_world = rows_y.astype(float)[row] + crval[1]
            eta = (y_world - yc[col_ifu]) / IFU_HALF_HEIGHT
            terms = [np.ones_like(val)] if chroma else [np.ones_like(val), u[row], eta]
            sig = ([opts.sigma_ifu_chroma] if chroma else
                   [opts.sigma_ifu_level, opts.sigma_ifu_slope, opts.sigma_ifu_slope])
            nt = len(terms)
            data = np.concatenate([val * t for t in terms])
            cols = np.concatenate([col_ifu * nt + k for k in range(nt)])
            rr = np.tile(row, nt)
            block = sparse.coo_matrix((data, (rr, cols)), shape=(n, len(ifus) * nt)).tocsr()
            blocks.append(block)
            groups["ifu"] = slice(start, start + block.shape[1])
            priors.append(np.tile(1.0 / np.square(sig), len(ifus)))
            names = ["ifu_chroma"] if chroma else [None, "ifu_x_slope", "ifu_y_slope"]
            outside = np.ones(len(ifus), bool)
            if inzone_label is not None:
                for k, ifu in enumerate(ifus):
                    outside[k] = not np.all(inzone_label[layout.labels[:, 0] == ifu])
            for k, name in enumerate(names):
                if name:
                    hyper[name] = (start + nt * np.arange(len(ifus)) + k)[outside]
                    shared[name] = (start + nt * np.arange(len(ifus)) + k)[~outside]
            start += block.shape[1]
        if with_stack:
            x_world = rows_x.astype(float)[row] + crval[0]
            zeta = (x_world - layout.stack_xc[lab]) / layout.stack_hw[lab]
            terms = [np.ones_like(val), zeta]
            nt = len(terms)
            data = np.concatenate([val * t for t in terms])
            cols = np.concatenate([lab * nt + k for k in range(nt)])
            rr = np.tile(row, nt)
            block = sparse.coo_matrix((data, (rr, cols)), shape=(n, len(layout.labels) * nt)).tocsr()
            blocks.append(block)
            groups["stack"] = slice(start, start + block.shape[1])
            priors.append(np.tile(1.0 / np.square([opts.sigma_stack_level, opts.sigma_stack_slope]),
                                  len(layout.labels)))
            outside = np.ones(len(layout.labels), bool) if inzone_label is None else ~inzone_label
            for k, name in enumerate(("stack_level", "stack_slope")):
                hyper[name] = (start + nt * np.arange(len(layout.labels)) + k)[outside]
                shared[name] = (start + nt * np.arange(len(layout.labels)) + k)[~outside]
            start += block.shape[1]
    penalty = {}
    if vign is not None and with_vign:
        zone = vign["zone"]
        inzone = zone[rows_y, rows_x]
        kx, ky = vign["intervals"]
        zrows = np.nonzero(inzone)[0]
        bx = _bspline_basis(rows_x[zrows].astype(float), vign["x0"], vign["x1"], kx)
        by = _bspline_basis(rows_y[zrows].astype(float), vign["y0"], vign["y1"], ky).tocsc()
        nbx, nby = bx.shape[1], by.shape[1]
        # row-wise tensor product: column j * nbx + i = By_j * Bx_i
        tensor = sparse.hstack([sparse.csr_matrix(bx.multiply(by[:, [j]])) for j in range(nby)], format="csr")
        # the surface and its slope vanish on the zone sides inside the cube (not on the field
        # edge): drop the two outer B-splines there, so it joins the unvignetted field smoothly
        keep = _clamped_columns(nbx, nby, vign["interior"])
        pick = sparse.coo_matrix((np.ones(zrows.size), (zrows, np.arange(zrows.size))), shape=(n, zrows.size))
        block = (pick.tocsr() @ tensor[:, keep]).tocsr()
        block.eliminate_zeros()
        blocks.append(block)
        groups["vign"] = slice(start, start + block.shape[1])
        priors.append(np.full(block.shape[1], 1.0 / opts.sigma_vign ** 2))
        low_x, high_x, low_y, high_y = (not side for side in vign["interior"])
        free = (low_x, high_x, low_y, high_y)
        penalty["vign"] = _curvature_penalty(nbx, nby, vign["curvature"], free,
                                             opts.vign_edge_stiffness)[np.ix_(keep, keep)]
        start += block.shape[1]
    sid, nslice = None, 0
    if with_slice and layout is not None and layout.slice_id is not None:
        # slice random effects: one level per slice (what ILLUM would correct), last group,
        # one non-zero per row (each fitted spaxel lies in one slice), prior set by _solve
        sid = layout.slice_id[rows_y, rows_x].astype(np.int64)
        nslice = int(layout.slice_id.max()) + 1
        groups["slice"] = slice(start, start + nslice)
        priors.append(np.zeros(nslice))
        start += nslice
    rest = (sparse.hstack(blocks[1:], format="csr") if len(blocks) > 1
            else sparse.csr_matrix((n, 0)))
    return _Design(glob, rest, groups, np.concatenate(priors), penalty, sid, nslice, hyper, shared)


def _solve(design: _Design, target: np.ndarray, weight: np.ndarray,
           slice_sigma: float | None = None, sigmas: dict[str, float] | None = None,
           posterior: bool = False):
    """Weighted least squares with Gaussian priors and the vignetting curvature penalty.

    ``curvature`` is the prior standard deviation of the second differences of the
    vignetting B-spline coefficients (log units).
    The slice random effects (group ``slice``, prior standard deviation ``slice_sigma``)
    have a diagonal block in the normal equations: they are eliminated first (Schur
    complement), so the dense system stays the size of the other terms.
    """
    g, sp = design.dense, design.sparse_part
    pg, ps = g.shape[1], sp.shape[1]
    gw = g * weight[:, None]
    normal = np.empty((pg + ps, pg + ps))
    normal[:pg, :pg] = gw.T @ g
    rhs = np.concatenate([gw.T @ target, np.zeros(ps)])
    if ps:
        spw = sparse.diags(weight) @ sp
        normal[pg:, pg:] = (sp.T @ spw).toarray()
        normal[:pg, pg:] = np.asarray(spw.T @ g).T
        normal[pg:, :pg] = normal[:pg, pg:].T
        rhs[pg:] = spw.T @ target
    prior = design.prior[:pg + ps].copy()
    for name, columns in design.hyper.items():
        if sigmas and name in sigmas:
            prior[columns] = 1.0 / sigmas[name] ** 2
            prior[design.shared.get(name, columns[:0])] = 1.0 / sigmas[name] ** 2
    normal[np.diag_indices_from(normal)] += prior
    for group, block in design.penalty.items():
        s = design.groups[group]
        normal[s, s] += block
    if design.nslice:
        assert design.slice_ids is not None
        sid, inside = design.slice_ids, design.slice_ids >= 0
        ids, w_in = sid[inside], weight[inside]
        precision = 1.0 / max(slice_sigma or 1.0, 1e-6) ** 2
        diag = np.bincount(ids, w_in, design.nslice) + precision  # one-hot rows: diagonal block
        cross = np.empty((pg + ps, design.nslice))
        for c in range(pg):
            cross[c] = np.bincount(ids, gw[inside, c], design.nslice)
        if ps:
            onehot = sparse.csr_matrix((w_in, (ids, np.nonzero(inside)[0])), shape=(design.nslice, len(sid)))
            cross[pg:] = (onehot @ sp).toarray().T
        rhs_s = np.bincount(ids, w_in * target[inside], design.nslice)
        scaled = cross / diag
        normal -= scaled @ cross.T
        rhs = rhs - scaled @ rhs_s
    try:
        factor = cho_factor(normal, lower=False, check_finite=False)
        beta = cho_solve(factor, rhs, check_finite=False)
        variance = (np.diag(cho_solve(factor, np.eye(len(rhs)), check_finite=False)) if posterior
                    else None)
    except (LinAlgError, ValueError):
        beta = np.linalg.lstsq(normal, rhs, rcond=None)[0]
        variance = np.diag(np.linalg.pinv(normal)) if posterior else None
    if design.nslice:
        beta = np.concatenate([beta, (rhs_s - cross.T @ beta) / diag])
    return beta, variance


def _slice_sigma(design: _Design, beta: np.ndarray, resid: np.ndarray, weight: np.ndarray,
                 previous: float) -> float:
    """Empirical-Bayes scatter of the slice levels: variance of the per-slice mean residuals
    (slice terms put back) beyond their noise."""
    assert design.slice_ids is not None
    inside = design.slice_ids >= 0
    ids = design.slice_ids[inside]
    wsum = np.bincount(ids, weight[inside], design.nslice)
    have = wsum > 0
    if have.sum() < 3:
        return previous
    part = resid + design.part("slice", beta)
    mean = np.bincount(ids, (weight * part)[inside], design.nslice)[have] / wsum[have]
    spread = _mad_sigma(mean)  # robust: a badly fitted corner must not inflate it
    var = spread * spread - float(np.median(1.0 / wsum[have]))
    return math.sqrt(max(var, 1e-10))


def _start_sigma(opts: JointOptions, name: str) -> float:
    return {"ifu_x_slope": opts.sigma_ifu_slope, "ifu_y_slope": opts.sigma_ifu_slope,
            "ifu_chroma": opts.sigma_ifu_chroma, "stack_level": opts.sigma_stack_level,
            "stack_slope": opts.sigma_stack_slope}[name]


def _prior_scale(beta: np.ndarray, variance: np.ndarray, sigma: float, opts: JointOptions) -> float:
    """Empirical-Bayes scale of a group of terms (method of moments): the scatter of their
    unshrunk estimates beyond their noise.  ``beta`` and ``variance`` are the posterior means
    and variances under the prior scale ``sigma``; the data precision of each term is its
    posterior precision less the prior's (diagonal approximation)."""
    if beta.size < opts.eb_min_terms:  # too few terms to measure their scatter: the option's scale
        return sigma
    prior_precision = 1.0 / sigma ** 2
    data_precision = np.maximum(1.0 / np.maximum(variance, 1e-300) - prior_precision, 1e-300)
    unshrunk = beta * (1.0 / np.maximum(variance, 1e-300)) / data_precision
    var = float(np.mean(unshrunk ** 2 - 1.0 / data_precision))
    return min(max(math.sqrt(max(var, 0.0)), opts.sigma_floor), opts.sigma_cap)


def _tukey(z: np.ndarray, c: float) -> np.ndarray:
    t = np.clip(np.abs(z) / c, 0.0, 1.0)
    return (1.0 - t * t) ** 2


def _mad_sigma(values: np.ndarray) -> float:
    """Robust standard deviation (1.4826 MAD); from a regular subsample of large arrays."""
    if values.size > 40000:
        values = values[:: values.size // 20000]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    return TUKEY_MAD * float(np.median(np.abs(values - np.median(values))))


# --------------------------------------------------------------------------------------------
# the fit


@dataclass
class JointFit:
    """What the joint model fitted.

    ``log_model`` (nz, ny, nx) is log of the smooth cube before normalisation; the
    components (ny, nx, wavelength mean unless noted): ``global_field`` (log), ``ifu_stack``
    (log, per-IFU + per-stack terms), ``vignetting`` (log; 0 outside the zone; None without a
    zone), ``zone`` (bool).  ``ifu_terms``: IFU -> {level, x_slope, y_slope, chroma} (log units:
    level difference, slope per unit u / eta, per unit of the wavelength coordinate);
    ``stack_terms``: (IFU, stack) -> {level, x_slope}.  ``residual_rms``: robust scatter of the
    wavelength-mean image about the model; ``noise_scale``: per-voxel relative noise at a level
    of 1 (the ``kappa`` of var = kappa / D); ``iterations`` done.
    """

    log_model: np.ndarray
    global_field: np.ndarray
    ifu_stack: np.ndarray
    vignetting: np.ndarray | None
    zone: np.ndarray | None
    ifu_terms: dict[int, dict[str, float]] = field(default_factory=dict)
    stack_terms: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    residual_rms: float = math.nan
    noise_scale: float = math.nan
    slice_sigma: float = math.nan
    prior_sigmas: dict[str, float] = field(default_factory=dict)
    lambda_order: int = 0
    rejected_spaxels: int = 0
    clipped_voxels: int = 0
    options: JointOptions | None = None

    def summary(self) -> dict:
        """JSON-able summary (per-IFU and per-stack terms, vignetting peak, fit quality)."""
        vpeak = None
        if self.vignetting is not None and self.zone is not None and self.zone.any():
            values = self.vignetting[self.zone]
            vpeak = float(np.expm1(values[np.argmax(np.abs(values))]))
        return {"model": "joint", "lambda_order": self.lambda_order, "residual_rms": self.residual_rms,
                "slice_sigma": self.slice_sigma, "prior_sigmas": self.prior_sigmas,
                "noise_scale": self.noise_scale, "rejected_spaxels": self.rejected_spaxels,
                "clipped_voxels": self.clipped_voxels, "vignetting_peak": vpeak,
                "ifu_terms": {str(k): v for k, v in self.ifu_terms.items()},
                "stack_terms": {f"{k[0]}.{k[1] + 1}": v for k, v in self.stack_terms.items()}}


def vignetting_zone(shape: tuple[int, int], mask: np.ndarray | None, margin: int, nfm: bool) -> np.ndarray | None:
    """The zone where the vignetting surface is free: the mask widened by ``margin`` spaxels.

    In NFM (a band of top rows) it is widened downwards only.
    """
    if mask is None or not np.any(mask):
        return None
    mask = np.asarray(mask, bool)
    if margin <= 0:
        return mask.copy()
    if nfm:
        rows = np.nonzero(mask.any(axis=1))[0]
        zone = mask.copy()
        zone[max(rows.min() - margin, 0):rows.min(), :] = True
        return zone
    return binary_dilation(mask, np.ones((2 * margin + 1, 2 * margin + 1), bool))


def fit_joint(cube: np.ndarray, wavelengths: np.ndarray, layout: FieldLayout | None = None,
              vignetting: np.ndarray | None = None, nfm: bool = False, crval: tuple[float, float] = (0.0, 0.0),
              options: JointOptions | None = None, data_wavelengths: np.ndarray | None = None) -> JointFit:
    """Fit the joint model to a DATACUBE_SKYFLAT cube (nz, ny, nx; NaN or <= 0 = no data).

    ``wavelengths`` (nz) are the plane wavelengths (where the model is evaluated),
    ``data_wavelengths`` the mean wavelength of the data in each plane (where it is fitted;
    default the same: they differ in the end planes, which the wavelength cut halves),
    ``layout`` the IFU / stack coverage of the
    spaxels (None: no per-IFU or per-stack terms), ``vignetting`` the vignetted-area mask
    (WFM: adapted VIGNETTING_MASK, NFM: the top rows; None: no vignetting surface),
    ``crval`` the world position of spaxel (0, 0) (for the IFU y slopes).
    """
    opts = options or JointOptions()
    cube = np.asarray(cube, np.float64)
    if cube.ndim != 3:
        raise InputError(f"joint illumination model: expected a 3D cube, got shape {cube.shape}")
    nz, ny, nx = cube.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = np.isfinite(cube) & (cube > 0)
        y = np.where(valid, np.log(np.where(valid, cube, 1.0)), 0.0)
    if not valid.any():
        raise InputError("joint illumination model: the cube has no usable voxel")
    lam = np.asarray(wavelengths, float)
    lam_data = lam if data_wavelengths is None else np.asarray(data_wavelengths, float)
    lo, hi = (lam.min(), lam.max()) if nz > 1 else (lam[0] - 1.0, lam[0] + 1.0)
    order = min(opts.lambda_order, max(nz - 1, 0))
    leg = _legendre(_unit(lam_data, lo, hi), order)  # (nz, R + 1): the fit
    leg_out = _legendre(_unit(lam, lo, hi), order)  # the product
    nr = order + 1

    zone = vignetting_zone((ny, nx), vignetting, opts.vign_margin, nfm)
    vinfo: dict[str, Any] | None = None
    if zone is not None:
        zy, zx = np.nonzero(zone)
        vinfo = {"zone": zone, "x0": float(zx.min()), "x1": float(zx.max()), "y0": float(zy.min()),
                 "y1": float(zy.max()), "intervals": opts.nfm_intervals if nfm else opts.vign_intervals,
                 "interior": (zx.min() > 0, zx.max() < nx - 1, zy.min() > 0, zy.max() < ny - 1),
                 "curvature": opts.nfm_curvature if nfm else opts.vign_curvature}
        # the curvature prior is in log per spaxel^2: second differences of the coefficients
        # are curvature x (knot spacing)^2
        kx, ky = vinfo["intervals"]
        hx = max(float(zx.max() - zx.min()), 1.0) / kx
        hy = max(float(zy.max() - zy.min()), 1.0) / ky
        vinfo["curvature"] = (vinfo["curvature"][0] * hx * hx, vinfo["curvature"][1] * hy * hy)
    covered_any = valid.any(axis=0)
    if layout is not None and layout.edge_distance is not None and opts.edge_exclusion > 0:
        covered_any &= layout.edge_distance >= opts.edge_exclusion  # not fitted, evaluated
    fracs = None
    if layout is not None:
        # spaxels barely covered (field edges) take the labels of their row neighbours
        fracs = _extend_labels(layout, layout.coverage > opts.min_coverage)

    # the spaxels that enter the fit, and their voxels as (nz, n) arrays
    ok = (valid.sum(axis=0) >= max(opts.min_planes, nr + 1)) & covered_any
    if not ok.any():
        raise InputError("joint illumination model: no spaxel has enough planes with data")
    ry, rx = np.nonzero(ok)
    rows = (ry, rx, ok)
    yv, vv = y[:, ok], valid[:, ok]
    level = np.where(vv, cube[:, ok], 0.0)  # Poisson weights: data first, then the model
    designs: dict[int, _Design] = {}
    for r in range(nr):
        chroma = r > 0
        designs[r] = _spatial_design(
            ry, rx, (ny, nx), opts, opts.chroma_order if chroma else opts.global_order, fracs, layout,
            crval, layout is not None and opts.ifu_terms and r <= opts.ifu_lambda_order,
            layout is not None and opts.stack_terms and r <= opts.stack_lambda_order,
            vinfo, vinfo is not None and r <= opts.vign_lambda_order, chroma,
            with_slice=r == 0 and opts.slice_terms)
    n = ry.size
    in_zone = zone[ry, rx] if zone is not None else np.zeros(n, bool)
    alpha = np.array([np.median(yv[k][vv[k]]) if vv[k].any() else 0.0 for k in range(nz)])
    kappa = 1.0
    clip = np.zeros_like(vv)
    rob = np.ones(n)
    phis = np.zeros((nr, n))
    sys_var = np.zeros(nr)
    slice_sigma = opts.slice_sigma_start
    sigmas: dict[str, float] = {}  # empirical-Bayes prior scales (start: the options' values)
    fit_result = {}
    for iteration in range(max(1, opts.iterations)):
        # per spaxel: the spectrum (minus the plane levels) in Legendre polynomials
        wvox = np.where(vv & ~clip, level / kappa, 0.0)  # inverse relative variance
        coeffs, variances = _spectra_fit(yv, wvox, leg, alpha)
        bad = ~np.isfinite(variances[0])
        coeffs[:, bad], variances[:, bad] = 0.0, 1e30  # no usable plane left: no weight
        # the coefficient images with the spatial model; the weights, the slice scatter and
        # the prior scales are re-estimated between solves (cheap next to the spectra)
        for r in range(nr):
            target, noise = coeffs[r], variances[r]
            for inner in range(max(1, opts.inner_iterations)):
                weight = rob / (noise + sys_var[r])
                # prior scales from the second solve on (the first, with the options' scales and
                # no structure term yet, sets up the weights)
                estimate = opts.empirical_bayes and bool(designs[r].hyper) and (iteration > 0 or inner > 0)
                beta, post = _solve(designs[r], target, weight, slice_sigma, sigmas, posterior=estimate)
                if post is not None:
                    for name, columns in designs[r].hyper.items():
                        sigmas[name] = _prior_scale(beta[columns], post[columns],
                                                    sigmas.get(name, _start_sigma(opts, name)), opts)
                phis[r] = designs[r].predict(beta)
                resid = target - phis[r]
                if "slice" in designs[r].groups:
                    slice_sigma = min(_slice_sigma(designs[r], beta, resid, weight, slice_sigma),
                                      opts.slice_sigma_max)
                # structure term: the scatter about the model beyond the noise (robust)
                sigma = _mad_sigma(resid[rob > 0])
                sys_var[r] = max(sigma * sigma - float(np.median(noise)), 0.0) + 1e-12
                if r == 0:
                    # Tukey weights on the residuals scaled per region: inside the vignetted
                    # zone the surface follows the data less closely than the field does
                    # elsewhere, and one scale for both would reject the deepest spaxels
                    z = resid / np.sqrt(noise + sys_var[0])
                    scale = np.full(n, _mad_sigma(z[~in_zone]) if (~in_zone).any() else 1.0)
                    if in_zone.any():
                        scale[in_zone] = max(_mad_sigma(z[in_zone]), scale[0])
                    rob = _tukey(z / np.where(scale > 0, scale, 1.0), opts.tukey)
            fit_result[r] = beta
        if iteration == opts.iterations - 1:
            break
        # plane levels, noise scale and voxel clipping from the full model
        # (the plane levels only shift every A_r by a constant, which the global terms absorb)
        model = leg @ phis
        fitted = vv & ~clip
        resid = yv - model
        count = fitted.sum(axis=1)
        alpha = np.where(count > 0, np.where(fitted, resid, 0.0).sum(axis=1) / np.maximum(count, 1), alpha)
        resid -= alpha[:, None]
        level = np.exp(np.clip(model + alpha[:, None], -50, 50))
        e2d = resid * resid * level
        sample = e2d[fitted][::7]  # the noise scale from a subsample of the voxels (a median)
        kappa = max(float(np.median(sample) / 0.4549) if sample.size else 1.0, 1e-30)
        clip = vv & (e2d > opts.voxel_clip ** 2 * kappa)
        log.debug("joint model iteration %d: kappa %.3g, %d clipped voxels, %d rejected spaxels",
                  iteration + 1, kappa, int(clip.sum()), int((rob == 0).sum()))
    robust = np.zeros((ny, nx))
    robust[ok] = rob

    fit = _assemble(fit_result, designs, rows, leg_out, (nz, ny, nx), layout, fracs, crval, zone, vinfo, opts,
                    order, robust, kappa, clip, sys_var)
    fit.slice_sigma = slice_sigma if opts.slice_terms and layout is not None else math.nan
    fit.prior_sigmas = dict(sigmas)
    return fit


def _assemble(beta: dict, designs: dict, rows, leg, shape, layout, fracs, crval, zone, vinfo, opts, order, rob,
              kappa, clip, sys_var) -> JointFit:
    """Evaluate the fitted model over every spaxel of the cube and split it into its components."""
    nz, ny, nx = shape
    nr = order + 1
    ay, ax = np.mgrid[0:ny, 0:nx]
    ay, ax = ay.ravel(), ax.ravel()
    phi = np.zeros((nr, ny * nx))
    parts = {"global": np.zeros((nr, ny * nx)), "ifu": np.zeros((nr, ny * nx)), "stack": np.zeros((nr, ny * nx)),
             "vign": np.zeros((nr, ny * nx))}
    ifu_terms: dict[int, dict[str, float]] = {}
    stack_terms: dict[tuple[int, int], dict[str, float]] = {}
    for r in range(nr):
        fitted = designs[r]
        full = _spatial_design(ay, ax, (ny, nx), opts, opts.chroma_order if r else opts.global_order, fracs,
                               layout, crval, "ifu" in fitted.groups, "stack" in fitted.groups,
                               vinfo if "vign" in fitted.groups else None, "vign" in fitted.groups, r > 0)
        for group in full.groups:
            if group not in parts:
                continue
            part = full.part(group, beta[r])
            parts[group][r] = part
            phi[r] += part
        if layout is not None:
            ifus = layout.ifus
            if "ifu" in fitted.groups:
                values = beta[r][fitted.groups["ifu"]]
                if r == 0:
                    for k, ifu in enumerate(ifus):
                        ifu_terms.setdefault(ifu, {}).update(level=float(values[3 * k]),
                                                             x_slope=float(values[3 * k + 1]),
                                                             y_slope=float(values[3 * k + 2]))
                elif r == 1:
                    for k, ifu in enumerate(ifus):
                        ifu_terms.setdefault(ifu, {})["chroma"] = float(values[k])
            if "stack" in fitted.groups and r == 0:
                values = beta[r][fitted.groups["stack"]]
                for k, (ifu, stack) in enumerate(layout.labels):
                    stack_terms[(int(ifu), int(stack))] = {"level": float(values[2 * k]),
                                                           "x_slope": float(values[2 * k + 1])}
    log_model = np.einsum("kr,rn->kn", leg, phi).reshape(nz, ny, nx)

    def mean0(p):
        return p[0].reshape(ny, nx)

    vignetting = mean0(parts["vign"]) if zone is not None else None
    ry, rx, _ = rows
    return JointFit(log_model=log_model, global_field=mean0(parts["global"]),
                    ifu_stack=mean0(parts["ifu"]) + mean0(parts["stack"]), vignetting=vignetting, zone=zone,
                    ifu_terms=ifu_terms, stack_terms=stack_terms,
                    residual_rms=float(math.sqrt(sys_var[0])), noise_scale=float(math.sqrt(kappa)),
                    lambda_order=order, rejected_spaxels=int((rob[ry, rx] == 0).sum()),
                    clipped_voxels=int(clip.sum()), options=opts)


# --------------------------------------------------------------------------------------------
# TWILIGHT_CUBE in ESO's layout


def _normalise_planes(planes: np.ndarray) -> np.ndarray:
    """float32 planes, each scaled to mean 1 over all spaxels as ESO does (double mean, float32 product)."""
    out = np.empty(planes.shape, np.float32)
    for k in range(planes.shape[0]):
        plane = planes[k].astype(np.float32)
        mean = _mean_good(plane)
        out[k] = _scale(plane, 1.0 / mean if mean else np.inf)
    return out


def postprocess_joint(cube: np.ndarray, settings: Settings, mode: str, *, white: np.ndarray | None = None,
                      vignetting_mask: np.ndarray | None = None, wavelengths: np.ndarray | None = None,
                      crval: tuple[float, float] = (0.0, 0.0), layout: FieldLayout | None = None,
                      options: JointOptions | None = None) -> tuple[TwilightResult, JointFit]:
    """TWILIGHT_CUBE from the joint model, in ESO's layout (same extensions as ESO would write).

    Arguments as :func:`musetwilight.core.smooth.postprocess` (``wavelengths``: the plane
    centres, here needed: default 5000 + 1.25 A per plane), plus ``crval`` (the field
    coordinates of spaxel (0, 0), as GEOMETRY_TABLE's x and y) and the spaxel ``layout``
    (:func:`layout_from_geometry`; None: no per-IFU and per-stack terms).  The vignetted
    area is ESO's: the adapted VIGNETTING_MASK in WFM, the top ``vignnfmmask`` rows in NFM.
    DATA: exp(model), each plane normalised to mean 1 over all spaxels (float32).
    ``white_global_fit``: the model without the vignetting, collapsed; ``white_div_global``:
    the normalised white-light image over it; ``vign_fit``: exp(vignetting surface), 1 outside
    the zone; ``white_cor``: white_div_global / vign_fit; ``white_div_global_excl_edges`` (WFM,
    ``vignmaskedges`` > 0) as ESO computes it, for the same diagnostic.
    """
    cube, white = checked_cube_and_white(cube, white)
    nz, ny, nx = cube.shape
    nfm = is_nfm(mode)
    white_bad = white_light_mask(white)
    vign: np.ndarray | None
    if nfm:
        vign = nfm_vignetting_mask(ny, nx, int(settings.vignnfmmask))
    else:
        vign = (adapt_vignetting_mask(np.asarray(vignetting_mask) != 0, ny, nx)
                if vignetting_mask is not None else None)
    if wavelengths is None:
        wavelengths = 5000.0 + 1.25 * np.arange(nz)
    lam = np.asarray(wavelengths, float)
    if lam.shape != (nz,):
        raise InputError(f"{lam.size} wavelengths for a cube of {nz} planes")
    step = float(lam[1] - lam[0]) if nz > 1 else 1.25
    log.info("Joint illumination model: %d planes, wavelength order %d, %s, %s", nz,
             (options or JointOptions()).lambda_order,
             f"{len(layout.ifus)} IFUs / {len(layout.labels)} slice stacks" if layout is not None
             else "no IFU layout", "vignetted zone" if vign is not None else "no vignetting")
    # the data of a plane come from lambda +- step/2 within lambdamin..lambdamax (drizzle)
    lmin, lmax = float(settings.lambdamin), float(settings.lambdamax)
    lam_data = (np.clip(lam - step / 2, lmin, lmax) + np.clip(lam + step / 2, lmin, lmax)) / 2
    with single_threaded_blas():
        fit = fit_joint(cube, lam, layout, vign, nfm, crval, options, data_wavelengths=lam_data)

    vlog = fit.vignetting if fit.vignetting is not None else 0.0
    illum = _normalise_planes(np.exp(fit.log_model - vlog))
    planes = _normalise_planes(np.exp(fit.log_model))
    white_global_fit, _ = collapse(illum)
    whiten = _scale(white, 1.0 / _mean_good(white, white_bad))
    wdiv, zero = _divide(whiten, white_global_fit)
    result = TwilightResult(cube=planes, white_global_fit=white_global_fit, white_div_global=wdiv,
                            white_div_global_dq=white_bad | zero)
    if vign is not None:
        smooth_bad = white_bad | ~vign
        edges = float(settings.vignmaskedges)
        if not nfm and edges > 0:
            filled, excl = _edge_exclusion(wdiv, smooth_bad, edges)
            result.white_div_global_excl_edges = filled
            result.white_div_global_excl_edges_dq = excl
        zone = fit.zone if fit.zone is not None else np.zeros((ny, nx), bool)
        vign_fit = np.exp(np.where(zone, vlog, 0.0)).astype(np.float32)
        fitbad = white_bad | ~zone
        white_cor, zero = _divide(wdiv, vign_fit)
        result.vign_fit, result.vign_fit_dq = vign_fit, fitbad
        result.white_cor, result.white_cor_dq = white_cor, smooth_bad | fitbad | zero
    return result, fit
