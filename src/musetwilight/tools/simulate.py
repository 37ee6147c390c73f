"""Simulated MUSE twilight data sets (raw frames, master calibrations, SOF, truth).

``simulate_dataset`` writes, in the real MUSE file formats, everything
``muse_twilight`` needs: raw SKYFLAT (and optionally ILLUM) exposures with
pre-/overscans, MASTER_BIAS/DARK/FLAT, TRACE/WAVECAL/GEOMETRY tables, an
optional BADPIX_TABLE and VIGNETTING_MASK, the SOF, and ``truth.json`` with
the injected instrument and sky properties.

Two scales: ``full`` is the real instrument (24 IFUs, 4096 x 4112 data pixels
per CCD, 32-pixel pre-/overscans, slices ~72 pixels wide).  ``mini`` keeps
48 slices, the real keyword set and 32-pixel pre-/overscans but uses a
512 x 256 pixel CCD (quadrants 256 x 128, the smallest that ESO's DCR
overscan rejection accepts), slices ~9 pixels wide, ~18.6 A per CCD row
(about 4515..9315 A), and by default IFUs 1, 2, 3 (NFM: 1, 23, 24): a
39 x 36 spaxel field that ESO's muse_twilight reduces in about a second with
no warning other than one per non-simulated IFU.  Everything is generated IFU
by IFU with vectorised NumPy, so memory stays bounded by a few CCD-sized
arrays (~1.3 GB at full scale).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.polynomial import Polynomial

from ..instrument import (
    IFU_HALF_HEIGHT,
    MODES,
    NOTCH_RANGES,
    NUM_IFUS,
    NUM_SLICES,
    PORT_X_RIGHT,
    PORT_Y_TOP,
    SATURATION_LIMIT,
    SLICES_PER_STACK,
    Euro3D,
    is_nfm,
)

log = logging.getLogger(__name__)

__all__ = ["SimulatedSet", "simulate_dataset", "LAYOUTS", "MODES",
           "CcdLayout", "build_instrument", "pixel_maps", "twilight_spectrum", "lamp_spectrum",
           "notch_transmission"]

SCALES = ("mini", "full")
NSLICES, NIFUS, SATURATION = NUM_SLICES, NUM_IFUS, SATURATION_LIMIT
# CCD slice -> sky slice (4 stacks of 12) as on the real instrument
CCD_TO_SKY = np.array([9, 8, 1, 10, 7, 2, 11, 6, 3, 12, 5, 4])
CCD_TO_SKY = np.concatenate([CCD_TO_SKY + 12 * k for k in range(4)])
NAD_RANGES = NOTCH_RANGES
# Euro3D bits used here (muse_bias marks bad hot/dark column segments DEAD)
DQ_HOT, DQ_DARK, DQ_DEAD, DQ_TRAP = (int(b) for b in (Euro3D.HOT_PIXEL, Euro3D.DARK_PIXEL, Euro3D.DEAD_PIXEL,
                                                       Euro3D.MUSE_TRAP))
# the parameters of ESO's muse_bias that the twilight recipe compares with its own
# (values formatted exactly as ESO's muse_bias writes them, doubles without a decimal point)
BIAS_REC_PARAMS = (("nifu", "0"), ("overscan", "vpoly"), ("ovscreject", "dcr"), ("ovscsigma", "30"),
                   ("ovscignore", "3"), ("combine", "sigclip"), ("nlow", "1"), ("nhigh", "1"),
                   ("nkeep", "1"), ("lsigma", "3"), ("hsigma", "3"), ("losigmabadpix", "30"),
                   ("hisigmabadpix", "3"), ("merge", "true"))
PIPE_ID = "muse/2.8.7"
ILLUM_EXPTIME = 5.0


@dataclass(frozen=True)
class CcdLayout:
    """Sizes of one MUSE CCD: data section per quadrant and pre-/overscans."""

    nx: int  # data columns per quadrant
    ny: int  # data rows per quadrant
    prscx: int = 32
    prscy: int = 32
    ovscx: int = 32
    ovscy: int = 32

    @property
    def width(self) -> int:
        return 2 * self.nx

    @property
    def height(self) -> int:
        return 2 * self.ny

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (2 * (self.prscy + self.ny + self.ovscy), 2 * (self.prscx + self.nx + self.ovscx))

    def raw_x(self, x):
        """Raw (untrimmed) 1-based column of trimmed 1-based column ``x``."""
        x = np.asarray(x)
        return np.where(x <= self.nx, x + self.prscx, x + self.prscx + 2 * self.ovscx)

    def raw_y(self, y):
        y = np.asarray(y)
        return np.where(y <= self.ny, y + self.prscy, y + self.prscy + 2 * self.ovscy)

    def data_slices(self, q: int) -> tuple[slice, slice]:
        """0-based raw-array (rows, cols) of the data section of quadrant q (1..4)."""
        rows = slice(self.prscy, self.prscy + self.ny) if q in (1, 2) else \
            slice(self.prscy + self.ny + 2 * self.ovscy, self.prscy + 2 * self.ny + 2 * self.ovscy)
        cols = slice(self.prscx, self.prscx + self.nx) if q in (1, 4) else \
            slice(self.prscx + self.nx + 2 * self.ovscx, self.prscx + 2 * self.nx + 2 * self.ovscx)
        return rows, cols

    def quadrant_slices(self, q: int) -> tuple[slice, slice]:
        """0-based raw-array (rows, cols) of the whole quadrant q incl. its pre-/overscans."""
        h, w = self.raw_shape
        rows = slice(0, h // 2) if q in (1, 2) else slice(h // 2, h)
        cols = slice(0, w // 2) if q in (1, 4) else slice(w // 2, w)
        return rows, cols

    def trimmed_slices(self, q: int) -> tuple[slice, slice]:
        rows = slice(0, self.ny) if q in (1, 2) else slice(self.ny, 2 * self.ny)
        cols = slice(0, self.nx) if q in (1, 4) else slice(self.nx, 2 * self.nx)
        return rows, cols


LAYOUTS = {"mini": CcdLayout(nx=256, ny=128), "full": CcdLayout(nx=2048, ny=2056)}
DEFAULT_IFUS = {("mini", False): [1, 2, 3], ("mini", True): [1, 23, 24],
                ("full", False): list(range(1, NIFUS + 1)), ("full", True): list(range(1, NIFUS + 1))}


@dataclass
class SimulatedSet:
    """Where a simulated set was written and what it holds."""

    out_dir: Path
    sof: Path
    truth_path: Path
    files: dict[str, list[Path]]
    ifus: list[int]
    scale: str
    mode: str

    def truth(self) -> dict:
        """The injected truth (``truth.json``)."""
        return json.loads(self.truth_path.read_text())


# --------------------------------------------------------------------------------------------
# instrument model


@dataclass
class Instrument:
    """Deterministic instrument model (geometry, calibrations, detector) for one seed."""

    layout: CcdLayout
    mode: str
    seed: int
    trace: dict[int, np.ndarray] = field(default_factory=dict)  # ifu -> (48, 3, order+1)
    wave: dict[int, np.ndarray] = field(default_factory=dict)  # ifu -> (48, 3, 7) wlcXY
    geometry: np.ndarray = field(default_factory=lambda: np.zeros(0))  # structured (24*48,), set by build_instrument
    sky_width: float = 75.0

    @property
    def nfm(self) -> bool:
        return is_nfm(self.mode)


def _poly_in_y(coeffs_t, centre: float, scale: float, order: int) -> np.ndarray:
    """Coefficients in absolute y of a polynomial given in t = (y - centre) / scale."""
    coeffs_t = np.asarray(coeffs_t, dtype=float)
    return _shift_matrix(centre, scale, order + 1, coeffs_t.size) @ coeffs_t


@functools.lru_cache(maxsize=16)
def _shift_matrix(centre: float, scale: float, nout: int, nin: int) -> np.ndarray:
    """M with M @ c_t = c_y: ((y - centre)/scale)^k = sum_j C(k, j) (-centre)^(k-j) y^j / scale^k."""
    m = np.zeros((nout, nin))
    for k in range(nin):
        for j in range(min(k, nout - 1) + 1):
            m[j, k] = math.comb(k, j) * (-centre) ** (k - j) / scale**k
    return m


def build_instrument(layout: CcdLayout, mode: str, seed: int) -> Instrument:
    """Trace, wavelength and geometry solutions for all 24 IFUs (deterministic in seed)."""
    rng = np.random.default_rng([seed, 1])
    inst = Instrument(layout, mode, seed)
    ny = layout.height
    yc, ys = (ny + 1) / 2.0, ny / 2.0
    pitch = (layout.width - 4.0) / NSLICES
    width = 0.85 * pitch
    inst.sky_width = float(np.round(width, 1))
    for ifu in range(1, NIFUS + 1):
        # bounded distortions keep every edge on the CCD (margin 2.5 + (pitch - width) / 2)
        shift = np.clip(rng.normal(0.0, 0.02 * pitch), -0.04 * pitch, 0.04 * pitch)
        tilt = np.clip(rng.normal(0.0, 0.01 * pitch, NSLICES), -0.025 * pitch, 0.025 * pitch)
        curv = np.clip(rng.normal(0.0, 0.005 * pitch, NSLICES), -0.015 * pitch, 0.015 * pitch)
        dwidth = np.clip(rng.normal(0.0, 0.005 * width, NSLICES), -0.01 * width, 0.01 * width)
        trace = np.zeros((NSLICES, 3, 6))
        for s in range(NSLICES):
            centre = 2.5 + (s + 0.5) * pitch + shift
            half = (width + dwidth[s]) / 2.0
            for k, offset in enumerate((0.0, -half, half)):
                coef_t = [centre + offset, tilt[s], curv[s], 0.002 * pitch * (k - 1)]
                trace[s, k] = _poly_in_y(coef_t, yc, ys, 5)
        inst.trace[ifu] = trace
        # wavelength: lambda(x, y) = A(t) + b1 (x - xc) + b2 (x - xc)^2, t = (y - yc)/ys
        wave = np.zeros((NSLICES, 3, 7))
        lshift = rng.normal(0.0, 8.0, NSLICES)
        span = 4750.0 / 2
        dldy = span / ys
        for s in range(NSLICES):
            xc = 2.5 + (s + 0.5) * pitch + shift
            a_t = [6975.0 + lshift[s], span, -60.0, 25.0]
            b1 = rng.normal(0.0, 0.02) * dldy
            b2 = 0.3 * dldy / (width / 2.0) ** 2
            base = _poly_in_y(a_t, yc, ys, 6)
            wave[s, 0] = base
            wave[s, 0, 0] += -b1 * xc + b2 * xc * xc
            wave[s, 1, 0] = b1 - 2.0 * b2 * xc
            wave[s, 2, 0] = b2
        inst.wave[ifu] = wave
    # geometry: 4 stacks side by side in x, 12 slice rows per IFU, IFU 1 at the bottom
    dtype = [("SubField", "i4"), ("SliceCCD", "i4"), ("SliceSky", "i4"), ("x", "f8"), ("xerr", "f8"),
             ("y", "f8"), ("yerr", "f8"), ("angle", "f8"), ("angleerr", "f8"), ("width", "f8"),
             ("widtherr", "f8")]
    geo = np.zeros(NIFUS * NSLICES, dtype=dtype)
    gap = 0.4
    for ifu in range(1, NIFUS + 1):
        dx_ifu = rng.normal(0.0, 0.15)
        for s in range(NSLICES):
            sky = int(CCD_TO_SKY[s])
            stack, row = (sky - 1) // SLICES_PER_STACK, (sky - 1) % SLICES_PER_STACK
            r = (ifu - 1) * NSLICES + s
            geo[r] = (ifu, s + 1, sky,
                      (stack - 1.5) * (inst.sky_width + gap) + dx_ifu + rng.normal(0.0, 0.03), 0.01,
                      (ifu - 1) * 12 + row - (NIFUS * 12 - 1) / 2.0 + rng.normal(0.0, 0.01), 0.01,
                      rng.normal(0.0, 0.02), 0.01,
                      inst.sky_width * (1.0 + rng.normal(0.0, 0.003)), 0.01)
    inst.geometry = geo
    return inst


def _eval_trace(coef: np.ndarray, y: np.ndarray) -> np.ndarray:
    return Polynomial(coef)(y)


def _eval_wave(wlc: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """lambda(x, y) = sum wlc[X, Y] x^X y^Y (ESO's convention, absolute pixel coordinates)."""
    out = np.zeros(np.broadcast(x, y).shape)
    ypow = [np.ones_like(y, dtype=float)]
    for _ in range(wlc.shape[1] - 1):
        ypow.append(ypow[-1] * y)
    xpow = np.ones_like(x, dtype=float)
    for X in range(wlc.shape[0]):
        inner = sum(wlc[X, Y] * ypow[Y] for Y in range(wlc.shape[1]) if wlc[X, Y] != 0.0)
        out = out + xpow * inner
        xpow = xpow * x
    return out


@dataclass
class PixelMaps:
    """Per-pixel model of one IFU's trimmed CCD (float64, 0 outside slices)."""

    cover: np.ndarray  # illuminated fraction of the pixel
    lam: np.ndarray  # wavelength [A]
    xpos: np.ndarray  # field position [pix]
    ypos: np.ndarray
    slice_index: np.ndarray  # 0-based CCD slice, -1 in gaps
    eso_mask: np.ndarray  # pixels that ESO's pixel table takes (ceil(xl)..floor(xr))


def pixel_maps(inst: Instrument, ifu: int) -> PixelMaps:
    """Slice coverage, wavelength and field position of every pixel of one IFU (vectorised)."""
    lay = inst.layout
    ny, nx = lay.height, lay.width
    shape = (ny, nx)
    cover = np.zeros(shape, dtype=np.float32)
    lam = np.zeros(shape, dtype=np.float32)
    xpos = np.zeros(shape, dtype=np.float32)
    ypos = np.zeros(shape, dtype=np.float32)
    sidx = np.full(shape, -1, dtype=np.int16)
    emask = np.zeros(shape, dtype=bool)
    y = np.arange(1, ny + 1, dtype=float)
    geo = inst.geometry[inst.geometry["SubField"] == ifu]
    geo = geo[np.argsort(geo["SliceCCD"])]
    for s in range(NSLICES):
        xl = _eval_trace(inst.trace[ifu][s, 1], y)
        xr = _eval_trace(inst.trace[ifu][s, 2], y)
        i0 = max(int(np.floor(xl.min())) - 1, 1)
        i1 = min(int(np.ceil(xr.max())) + 1, nx)
        cols = np.arange(i0, i1 + 1, dtype=float)
        X = cols[None, :]
        frac = np.clip(np.minimum(X + 0.5, xr[:, None]) - np.maximum(X - 0.5, xl[:, None]), 0.0, 1.0)
        inside = frac > 0
        xc, w = (xl + xr) / 2.0, xr - xl
        dx = (xc[:, None] - X) / w[:, None] * geo["width"][s]
        ang = np.deg2rad(geo["angle"][s])
        sel = (slice(None), slice(i0 - 1, i1))
        cover[sel][inside] = frac[inside]
        lam[sel][inside] = _eval_wave(inst.wave[ifu][s], X, y[:, None])[inside]
        xpos[sel][inside] = (dx * np.cos(ang) + geo["x"][s])[inside]
        ypos[sel][inside] = (dx * np.sin(ang) + geo["y"][s])[inside]
        sidx[sel][inside] = s
        emask[sel] |= (X >= np.ceil(xl)[:, None]) & (X <= np.floor(xr)[:, None])
    return PixelMaps(cover, lam, xpos, ypos, sidx, emask)


# --------------------------------------------------------------------------------------------
# sky and illumination model


def twilight_spectrum(lam):
    """Blue-ish smooth twilight continuum (photons per pixel per second, arbitrary scale).

    Computed in the dtype of ``lam`` (float32 maps stay float32)."""
    lam = np.asarray(lam)
    t = lam / 6000.0
    return (1.0 + 0.04 * np.sin((2 * np.pi / 2200.0) * (lam - 4600.0))) / (t * t)


def lamp_spectrum(lam):
    """Red-ish smooth halogen-lamp spectrum used for the ILLUM exposure."""
    t = np.asarray(lam) / 6000.0
    return t * np.sqrt(t)


def notch_transmission(lam, mode: str):
    """Transmission of the AO NaD notch filter (2 % inside its range, soft 3 A edges); 1 in NOAO."""
    lam = np.asarray(lam)
    if mode not in NAD_RANGES:
        return np.ones(lam.shape, dtype=lam.dtype)
    lo, hi = NAD_RANGES[mode]
    def edge(d):  # logistic step of 3 A scale, no overflow
        return 0.5 * (1.0 + np.tanh(d / 6.0))

    inside = edge(lam - lo) * edge(hi - lam)
    return (1.0 - 0.98 * inside).astype(lam.dtype)


@dataclass
class FieldModel:
    """Smooth field illumination and vignetting in geometry-table pixel units.

    WFM vignetting (--vignetting) sits in the lamp flats (MASTER_FLAT, ILLUM), as ESO
    assumes (its fit keeps values >= 1 after flat-fielding); NFM vignetting (always on)
    darkens the sky at the top of the field (values <= 1).
    """

    coeffs: dict[str, float]
    xscale: float
    yscale: float
    vign: dict | None = None  # {"kind": "corner", ...} (WFM lamp) or {"kind": "top", ...} (NFM sky)

    def illumination(self, x, y):
        """Smooth twilight illumination relative to the lamp flat (1 at the field centre)."""
        u, v = np.asarray(x) / self.xscale, np.asarray(y) / self.yscale
        c = self.coeffs
        return (1.0 + c["a10"] * u + c["a01"] * v + c["a20"] * u * u + c["a11"] * u * v
                + c["a02"] * v * v)

    def vignetting(self, x, y):
        """Throughput factor (<= 1) of the vignetted part of the field, 1 elsewhere."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if not self.vign:
            return np.ones(np.broadcast(x, y).shape)
        g = self.vign
        if g["kind"] == "corner":
            r = np.clip(np.hypot(x - g["x0"], y - g["y0"]) / g["radius"], 0.0, 1.0)
            return 1.0 - g["depth"] * 0.5 * (1.0 + np.cos(np.pi * r))
        t = np.clip((y - g["ystart"]) / (g["ytop"] - g["ystart"]), 0.0, 1.0)
        return 1.0 - g["depth"] * t * t

    def sky(self, x, y, lam=None, ifu=None, stack=None):
        """Factor on the twilight sky exposures (``lam``, ``ifu``, ``stack``: only truth families use them)."""
        top = self.vign is not None and self.vign["kind"] == "top"
        return self.illumination(x, y) * (self.vignetting(x, y) if top else 1.0)

    def lamp(self, x, y):
        """Factor on the lamp exposures (MASTER_FLAT, ILLUM)."""
        corner = self.vign is not None and self.vign["kind"] == "corner"
        return self.vignetting(x, y) if corner else np.ones(np.broadcast(x, y).shape)


# --------------------------------------------------------------------------------------------
# truth families (``family=``): richer sky-versus-lamp fields for the illumination benchmark

#: Components a ``family`` string combines with ``+`` (e.g. ``"ifu+stack"``).
FAMILY_COMPONENTS = ("smooth", "ifu", "stack", "corner", "edge")
CORNER_SHAPES = ("cosine", "linear", "gaussian", "elliptic", "straight")
EDGE_SHAPES = ("quadratic", "linear", "cosine", "cubic", "exponential")
POLY_TERMS = ("a10", "a01", "a20", "a11", "a02")
LAMBDA_REF, LAMBDA_HALF = 7000.0, 2000.0  # w = (lambda - 7000) / 2000 spans 5000..9000 A
FAMILY_FORMULAS = {
    "smooth": "G = 1 + sum_ij (a_ij + b_ij w + c_ij w^2) u^i v^j over ij in 10,01,20,11,02; "
              "u = x/xscale, v = y/yscale, w = (lambda - 7000)/2000; a_ij as 'coeffs' (today's field)",
    "ifu": "sky x (1 + d_n + gx_n u + gy_n eta + e_n w) in IFU n, eta = (y - yc_n)/6 "
           "(yc_n: mean geometry y of its slices)",
    "stack": "sky x (1 + s_nk + sx_nk zeta) in slice stack k (SliceSky 12k+1..12k+12) of IFU n, "
             "zeta = (x - xc_nk)/hw_nk (centre and half width of the stack)",
    "corner": "lamp flats x V, V = 1 - depth f(r), r = rho/radius clipped to 0..1, rho = distance "
              "from (x0, y0); elliptic: rho = hypot(dx, dy/axis_ratio); straight: rho = (dx + dy)/sqrt 2; "
              "f: cosine 0.5(1 + cos pi r), linear 1 - r, gaussian (exp(-r^2/2s^2) - exp(-1/2s^2))/"
              "(1 - exp(-1/2s^2)) with s = 0.4, straight and elliptic (1 - r)^power / 0.5(1 + cos pi r)",
    "edge": "sky x V, V = 1 - depth f(t), t = clip((y - ys(x))/(ytop - ys(x)), 0, 1), "
            "ys(x) = ytop - height (1 + tilt u); f: quadratic t^2, linear t, cosine 0.5(1 - cos pi t), "
            "cubic t^3, exponential (exp(3t) - 1)/(exp(3) - 1)",
}


def parse_family(family: str | None) -> tuple[str, ...]:
    """The components of a ``family`` string (``None`` or ``""``: the default field, no family)."""
    if not family:
        return ()
    parts = tuple(dict.fromkeys(p.strip() for p in str(family).split("+") if p.strip()))
    unknown = [p for p in parts if p not in FAMILY_COMPONENTS]
    if unknown or not parts:
        raise ValueError(f"family: unknown component(s) {', '.join(unknown) or repr(family)}; "
                         f"combine {', '.join(FAMILY_COMPONENTS)} with '+'")
    return parts


def stack_layout(geometry: np.ndarray) -> dict[int, dict]:
    """Per IFU of a geometry table: mean slice y, y extent and the x extent of each slice stack."""
    out = {}
    for ifu in np.unique(geometry["SubField"]):
        g = geometry[geometry["SubField"] == ifu]
        stack = (g["SliceSky"] - 1) // SLICES_PER_STACK
        stacks = []
        for k in range(4):
            s = g[stack == k]
            lo, hi = float((s["x"] - s["width"] / 2).min()), float((s["x"] + s["width"] / 2).max())
            stacks.append([lo, hi])
        out[int(ifu)] = {"yc": float(g["y"].mean()), "y": [float(g["y"].min() - 0.5), float(g["y"].max() + 0.5)],
                         "stacks": stacks}
    return out


def layout_membership(layout: dict, x, y) -> tuple[np.ndarray, np.ndarray]:
    """IFU number (0: none) and slice stack (-1: none) of positions, from :func:`stack_layout` extents."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ifu = np.zeros(np.broadcast(x, y).shape, int)
    stack = np.full(ifu.shape, -1)
    for n, entry in layout.items():
        lo, hi = entry["y"]
        inside = (y >= lo) & (y < hi)
        ifu[inside] = int(n)
        for k, (xlo, xhi) in enumerate(entry["stacks"]):
            stack[inside & (x >= xlo) & (x <= xhi)] = k
    return ifu, stack


def slice_index_map(geometry: np.ndarray, x0: float, y0: float, nx: int, ny: int, sub: int = 1) -> np.ndarray:
    """Row of ``geometry`` (-1: none) covering each point of a grid, slice by slice.

    The grid has rows at y0 + j and, in x, ``sub`` positions across each unit cell centred on
    x0 + i (shape (ny, nx, sub)).  A slice covers x - width/2 .. x + width/2, y - 0.5 .. y + 0.5
    (GEOMETRY_TABLE units): the exact footprint, where :func:`layout_membership` uses each
    stack's bounding box.
    """
    xs = (x0 + np.arange(nx)[:, None] + (np.arange(sub)[None, :] + 0.5) / sub - 0.5).ravel()
    index = np.full((ny, nx * sub), -1)
    for row, g in enumerate(geometry):  # one slice at a time, on its own rows and columns only
        j0, j1 = int(np.ceil(g["y"] - 0.5 - y0)), int(np.floor(g["y"] + 0.5 - y0))
        i0 = int(np.searchsorted(xs, g["x"] - g["width"] / 2, side="left"))
        i1 = int(np.searchsorted(xs, g["x"] + g["width"] / 2, side="right"))
        j0, j1 = max(j0, 0), min(j1, ny - 1)
        if j1 < j0 or i1 <= i0:
            continue
        index[j0:j1 + 1, i0:i1] = row
    return index.reshape(ny, nx, sub)


def slice_membership(geometry: np.ndarray, x0: float, y0: float, nx: int, ny: int,
                     sub: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """IFU number (0: none) and slice stack (-1: none) on the grid of :func:`slice_index_map`."""
    index = slice_index_map(geometry, x0, y0, nx, ny, sub)
    inside = index >= 0
    rows = geometry[np.where(inside, index, 0)]
    ifu = np.where(inside, rows["SubField"], 0).astype(int)
    stack = np.where(inside, (rows["SliceSky"].astype(int) - 1) // SLICES_PER_STACK, -1)
    return ifu, stack


def truth_geometry(truth: dict) -> np.ndarray:
    """The GEOMETRY_TABLE of a simulated set (rebuilt from its seed, scale and mode)."""
    o = truth["options"]
    return build_instrument(LAYOUTS[o["scale"]], o["mode"], int(o["seed"])).geometry


def truth_layout(truth: dict) -> dict[int, dict]:
    """The slice-stack layout of a simulated set (truth.json's family layout, else rebuilt from its seed)."""
    fam = truth.get("family")
    if fam and fam.get("layout"):
        return {int(k): v for k, v in fam["layout"].items()}
    return stack_layout(truth_geometry(truth))


@dataclass
class FamilyField(FieldModel):
    """A truth family: :class:`FieldModel` plus chromatic, per-IFU, per-stack and shaped vignetting terms.

    Formulas: :data:`FAMILY_FORMULAS`.  ``sky`` and ``illumination`` take the wavelength and,
    per element, the IFU number and slice stack (0..3) of each position (the simulator knows
    them exactly); without them they are found from ``layout`` (:meth:`membership`).
    """

    components: tuple[str, ...] = ()
    chroma: dict = field(default_factory=dict)  # b_ij, c_ij
    ifu_terms: dict = field(default_factory=dict)  # ifu -> {d, gx, gy, e}
    stack_terms: dict = field(default_factory=dict)  # ifu -> [{s, sx}] x 4
    layout: dict = field(default_factory=dict)  # ifu -> stack_layout entry

    contextual = True  # the simulator passes lam, ifu and stack to sky()

    def membership(self, x, y):
        """IFU number (0: none) and stack (-1: none) of positions, from the layout's extents."""
        return layout_membership(self.layout, x, y)

    def _tables(self):
        """Lookup tables [ifu] and [ifu, stack] of the per-IFU and per-stack parameters (0 = none)."""
        ifu = np.zeros((NIFUS + 1, 5))  # d, gx, gy, e, yc
        st = np.zeros((NIFUS + 1, 4, 4))  # s, sx, xc, hw
        st[:, :, 3] = 1.0
        for n, entry in self.layout.items():
            n = int(n)
            ifu[n, 4] = entry["yc"]
            for k, (xlo, xhi) in enumerate(entry["stacks"]):
                st[n, k, 2:] = ((xlo + xhi) / 2, (xhi - xlo) / 2)
        for n, t in self.ifu_terms.items():
            ifu[int(n), :4] = (t["d"], t["gx"], t["gy"], t["e"])
        for n, terms in self.stack_terms.items():
            for k, t in enumerate(terms):
                st[int(n), k, :2] = (t["s"], t["sx"])
        return ifu, st

    def illumination(self, x, y, lam=None, ifu=None, stack=None):
        """Sky-versus-lamp illumination (vignetting apart) at x, y [, lambda]; w = 0 without lambda."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        u, v = x / self.xscale, y / self.yscale
        w = 0.0 if lam is None else (np.asarray(lam, dtype=float) - LAMBDA_REF) / LAMBDA_HALF
        powers = {"a10": u, "a01": v, "a20": u * u, "a11": u * v, "a02": v * v}
        out = np.ones(np.broadcast(x, y, w).shape)
        for term in POLY_TERMS:
            out = out + (self.coeffs[term] + self.chroma.get("b" + term[1:], 0.0) * w
                         + self.chroma.get("c" + term[1:], 0.0) * w * w) * powers[term]
        if "ifu" not in self.components and "stack" not in self.components:
            return out
        if ifu is None or stack is None:
            ifu, stack = self.membership(x, y)
        ifu = np.broadcast_to(np.asarray(ifu, int), out.shape)
        stack = np.broadcast_to(np.asarray(stack, int), out.shape)
        itab, stab = self._tables()
        if "ifu" in self.components:
            p = itab[ifu]
            out = out * (1.0 + p[..., 0] + p[..., 1] * u + p[..., 2] * (y - p[..., 4]) / IFU_HALF_HEIGHT
                         + p[..., 3] * w)
        if "stack" in self.components:
            q = stab[ifu, np.clip(stack, 0, 3)]
            q = np.where((stack >= 0)[..., None], q, np.array([0.0, 0.0, 0.0, 1.0]))
            out = out * (1.0 + q[..., 0] + q[..., 1] * (x - q[..., 2]) / q[..., 3])
        return out

    def vignetting(self, x, y):
        g = self.vign
        if not g or "shape" not in g:
            return super().vignetting(x, y)
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if g["kind"] == "corner":
            dx, dy = x - g["x0"], y - g["y0"]
            if g["shape"] == "elliptic":
                rho = np.hypot(dx, dy / g["axis_ratio"])
            elif g["shape"] == "straight":
                rho = (dx + dy) / math.sqrt(2.0)
            else:
                rho = np.hypot(dx, dy)
            r = np.clip(rho / g["radius"], 0.0, 1.0)
            if g["shape"] == "linear":
                f = 1.0 - r
            elif g["shape"] == "gaussian":
                floor = math.exp(-0.5 / 0.16)
                f = (np.exp(-0.5 * r * r / 0.16) - floor) / (1.0 - floor)
            elif g["shape"] == "straight":
                f = (1.0 - r) ** g["power"]
            else:  # cosine, elliptic
                f = 0.5 * (1.0 + np.cos(np.pi * r))
            return 1.0 - g["depth"] * f
        ys = g["ytop"] - g["height"] * (1.0 + g["tilt"] * x / self.xscale)
        t = np.clip((y - ys) / (g["ytop"] - ys), 0.0, 1.0)
        f = {"quadratic": lambda t: t * t, "linear": lambda t: t, "cosine": lambda t: 0.5 * (1.0 - np.cos(np.pi * t)),
             "cubic": lambda t: t ** 3,
             "exponential": lambda t: (np.exp(3.0 * t) - 1.0) / (math.exp(3.0) - 1.0)}[g["shape"]](t)
        return 1.0 - g["depth"] * f

    def sky(self, x, y, lam=None, ifu=None, stack=None):
        top = self.vign is not None and self.vign["kind"] == "top"
        return self.illumination(x, y, lam, ifu, stack) * (self.vignetting(x, y) if top else 1.0)

    def lamp(self, x, y, lam=None, ifu=None, stack=None):
        return super().lamp(x, y)

    def describe(self) -> dict:
        """The family's parameters and formulas, for truth.json."""
        return {"components": list(self.components),
                "formulas": {c: FAMILY_FORMULAS[c] for c in ("smooth", *self.components)},
                "lambda_ref": LAMBDA_REF, "lambda_half_range": LAMBDA_HALF,
                "chroma": self.chroma,
                "ifu_terms": {str(k): v for k, v in self.ifu_terms.items()},
                "stack_terms": {str(k): v for k, v in self.stack_terms.items()},
                "layout": {str(k): v for k, v in self.layout.items()}}


def family_field(base: FieldModel, components: tuple[str, ...], seed: int, geometry: np.ndarray,
                 grid: dict, nfm: bool) -> FamilyField:
    """Draw a family's parameters (each component from its own random stream of ``seed``)."""

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, 7, k])

    rng = stream(0)
    chroma = {}
    for term in POLY_TERMS:
        chroma["b" + term[1:]] = float(rng.uniform(-0.03, 0.03))
        chroma["c" + term[1:]] = float(rng.uniform(-0.015, 0.015))
    layout = stack_layout(geometry)
    ifu_terms, stack_terms = {}, {}
    if "ifu" in components:
        rng = stream(1)
        for n in range(1, NIFUS + 1):
            ifu_terms[n] = {"d": float(rng.uniform(-0.01, 0.01)), "gx": float(rng.uniform(-0.004, 0.004)),
                            "gy": float(rng.uniform(-0.006, 0.006)), "e": float(rng.uniform(-0.004, 0.004))}
    if "stack" in components:
        rng = stream(2)
        for n in range(1, NIFUS + 1):
            stack_terms[n] = [{"s": float(rng.uniform(-0.004, 0.004)), "sx": float(rng.uniform(-0.003, 0.003))}
                              for _ in range(4)]
    vign = base.vign
    if "corner" in components:
        if nfm:
            raise ValueError("family component 'corner' (WFM lamp vignetting) needs a WFM mode")
        rng = stream(3)
        shape = CORNER_SHAPES[int(rng.integers(len(CORNER_SHAPES)))]
        radius = max(22.0, float(rng.uniform(0.2, 0.4)) * min(grid["nx"], grid["ny"]))
        offset = float(rng.uniform(0.0, 0.15)) * radius
        vign = {"kind": "corner", "shape": shape, "x0": grid["crval1"] - offset / math.sqrt(2.0),
                "y0": grid["crval2"] - offset / math.sqrt(2.0), "radius": radius,
                "depth": float(rng.uniform(0.08, 0.3)), "axis_ratio": float(rng.uniform(0.6, 1.6)),
                "power": float(rng.uniform(1.0, 2.0)), "in": "lamp flats (MASTER_FLAT, ILLUM)"}
    if "edge" in components:
        if not nfm:
            raise ValueError("family component 'edge' (NFM sky vignetting) needs the NFM mode")
        rng = stream(4)
        vign = {"kind": "top", "shape": EDGE_SHAPES[int(rng.integers(len(EDGE_SHAPES)))],
                "ytop": float(geometry["y"].max()), "height": float(rng.uniform(12.0, 19.0)),
                "tilt": float(rng.uniform(-0.15, 0.15)), "depth": float(rng.uniform(0.25, 0.6)),
                "in": "sky (SKYFLAT)"}
        vign["ystart"] = vign["ytop"] - vign["height"]
    return FamilyField(base.coeffs, base.xscale, base.yscale, vign, components, chroma, ifu_terms,
                       stack_terms, layout)


def field_from_truth(truth: dict) -> FieldModel:
    """The field model of a truth.json (a :class:`FamilyField` for a family set)."""
    block = truth["field_illumination"]
    vign = (truth.get("vignetting") or {}).get("model")
    base = FieldModel(dict(block["coeffs"]), float(block["xscale"]), float(block["yscale"]), vign)
    fam = truth.get("family")
    if not fam:
        return base
    return FamilyField(base.coeffs, base.xscale, base.yscale, vign, tuple(fam["components"]), dict(fam["chroma"]),
                       {int(k): v for k, v in fam["ifu_terms"].items()},
                       {int(k): v for k, v in fam["stack_terms"].items()},
                       {int(k): v for k, v in fam["layout"].items()})


# --------------------------------------------------------------------------------------------
# FITS helpers


def _primary_common(mode: str) -> fits.Header:
    h = fits.Header()
    h["TELESCOP"] = "ESO-VLT-U4"
    h["INSTRUME"] = "MUSE"
    h["ORIGIN"] = "ESO"
    h["HIERARCH ESO INS MODE"] = (mode, "Instrument mode used.")
    h["HIERARCH ESO DET BINX"] = (1, "Binning factor along X")
    h["HIERARCH ESO DET BINY"] = (1, "Binning factor along Y")
    h["HIERARCH ESO DET READ CURID"] = (1, "Used readout mode id")
    h["HIERARCH ESO DET READ CURNAME"] = ("SCI1RO", "Used readout mode name")
    return h


def _chip_cards(ifu: int) -> list[tuple]:
    return [("HIERARCH ESO DET CHIP NAME", f"SIM{ifu:02d}", "Detector chip name"),
            ("HIERARCH ESO DET CHIP ID", f"ESO-CCD-SIM-{ifu:02d}", "Detector chip identification"),
            ("HIERARCH ESO DET CHIP LIVE", True, "Detector alive")]


def _pro_header(mode: str, catg: str, filename: str, recipe: str) -> fits.Header:
    h = _primary_common(mode)
    h["PIPEFILE"] = (filename, "Filename of data product")
    h["HIERARCH ESO PRO DID"] = ("PRO-1.16", "Data dictionary for PRO")
    h["HIERARCH ESO PRO CATG"] = (catg, "Category of pipeline product frame")
    h["HIERARCH ESO PRO TYPE"] = ("REDUCED", "Product type")
    h["HIERARCH ESO PRO TECH"] = ("IFU", "Observation technique")
    h["HIERARCH ESO PRO SCIENCE"] = (False, "Scientific product if T")
    h["HIERARCH ESO PRO REC1 ID"] = (recipe, "Pipeline recipe (unique) identifier")
    h["HIERARCH ESO PRO REC1 DRS ID"] = ("cpl-7.3.2", "Data Reduction System identifier")
    h["HIERARCH ESO PRO REC1 PIPE ID"] = (PIPE_ID, "Pipeline (unique) identifier")
    return h


def _table_hdu(columns: list[tuple[str, str, np.ndarray, str | None]], name: str | None) -> fits.BinTableHDU:
    cols = [fits.Column(name=n, format=f, array=a, unit=u) for n, f, a, u in columns]
    hdu = fits.BinTableHDU.from_columns(cols)
    if name:
        hdu.header["EXTNAME"] = name
    return hdu


def _append(path: Path, hdu) -> None:
    """Append one extension to an existing FITS file (written at its end, nothing re-read)."""
    fits.append(path, hdu.data, hdu.header, verify=False)


def _write_primary(path: Path, header: fits.Header, data=None) -> None:
    fits.PrimaryHDU(data=data, header=header).writeto(path, overwrite=True)


# --------------------------------------------------------------------------------------------
# the data set


@dataclass
class _Options:
    scale: str
    seed: int
    nexp: int
    ifus: list[int]
    illum: bool
    dark: bool
    badpix: bool
    vignetting: bool
    mode: str
    saturate: bool
    archive: bool = False
    fpack: bool = False
    family: str | None = None  # truth family (FAMILY_COMPONENTS joined by '+'), None: today's field
    brightness: float = 1.0  # sky level relative to the default twilight (noise from deep to shallow)


def _cube_grid(inst: Instrument, ifus: list[int], lmin=5000.0, lmax=9000.0, maps=None) -> dict:
    """Expected output-cube grid: extents of the ESO pixel positions within lmin..lmax."""
    xmin = ymin = np.inf
    xmax = ymax = -np.inf
    for ifu in ifus:
        m = maps[ifu] if maps is not None else pixel_maps(inst, ifu)
        sel = m.eso_mask & (m.lam >= lmin) & (m.lam <= lmax)
        xmin, xmax = min(xmin, m.xpos[sel].min()), max(xmax, m.xpos[sel].max())
        ymin, ymax = min(ymin, m.ypos[sel].min()), max(ymax, m.ypos[sel].max())
    return {"crval1": float(xmin), "crval2": float(ymin), "cdelt": 1.0,
            "nx": int(round(xmax - xmin)) + 1, "ny": int(round(ymax - ymin)) + 1,
            "xmax": float(xmax), "ymax": float(ymax)}


def _cube_grid_fast(inst: Instrument, ifus: list[int]) -> dict:
    """Cube grid from slice edges only (cheap for the full scale)."""
    geo = inst.geometry[np.isin(inst.geometry["SubField"], ifus)]
    half = geo["width"] / 2.0
    xmin, xmax = (geo["x"] - half).min(), (geo["x"] + half).max()
    ymin, ymax = geo["y"].min(), geo["y"].max()
    return {"crval1": float(xmin), "crval2": float(ymin), "cdelt": 1.0,
            "nx": int(round(xmax - xmin)) + 1, "ny": int(round(ymax - ymin)) + 1,
            "xmax": float(xmax), "ymax": float(ymax)}


def simulate_dataset(out_dir, *, scale="mini", seed=0, nexp=3, ifus=None, illum=False, dark=False,
                     badpix=False, vignetting=False, mode="WFM-NOAO-N", saturate=False, archive=False,
                     fpack=False, family=None, brightness=1.0) -> SimulatedSet:
    """Write a simulated MUSE twilight set into ``out_dir`` and return where everything is.

    Deterministic in ``seed``.  ``ifus`` defaults to 1,2,3 (mini WFM), 1,23,24 (mini NFM)
    or all 24 (full); IFU 1 (ESO's flux reference) must be included.  ``archive`` names
    the raw frames as ESO's archive does (``MUSE.<DATE-OBS>.fits``) and adds the keywords
    its files carry (ARCFILE, ORIGFILE, ESO TPL START/NEXP/EXPNO, ESO DPR ...); ``fpack``
    stores them tile-compressed (``.fits.fz``, RICE), as the archive delivers them.  The
    data are the same either way.  ``family`` selects a truth family
    (:data:`FAMILY_COMPONENTS` joined by ``+``, formulas in :data:`FAMILY_FORMULAS`,
    parameters in truth.json's ``family``); ``corner`` implies ``vignetting``.
    ``brightness`` scales the sky level (noise from deep, > 1, to shallow, < 1, twilights).
    Without them the data are today's, byte for byte.

    Examples
    --------
    >>> from musetwilight.tools.simulate import simulate_dataset          # doctest: +SKIP
    >>> data = simulate_dataset("set", scale="mini", seed=3, illum=True)
    >>> data.sof.name, data.ifus
    ('twilight.sof', [1, 2, 3])
    """
    if scale not in LAYOUTS:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if nexp < 1:
        raise ValueError("nexp must be at least 1")
    ifus = sorted(set(int(i) for i in (ifus if ifus is not None
                                        else DEFAULT_IFUS[(scale, is_nfm(mode))])))
    if not ifus or min(ifus) < 1 or max(ifus) > NIFUS:
        raise ValueError(f"IFU numbers must be within 1..{NIFUS}: {ifus}")
    components = parse_family(family)
    if not brightness > 0:
        raise ValueError(f"brightness must be positive, not {brightness!r}")
    vignetting = vignetting or "corner" in components
    opts = _Options(scale, int(seed), int(nexp), ifus, illum, dark, badpix, vignetting, mode, saturate,
                    bool(archive or fpack), bool(fpack), "+".join(components) or None, float(brightness))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _Writer(out, opts).run()


class _Writer:
    """Generates and writes one set, IFU by IFU."""

    def __init__(self, out: Path, opts: _Options):
        self.out = out
        self.o = opts
        self.lay = LAYOUTS[opts.scale]
        self.inst = build_instrument(self.lay, opts.mode, opts.seed)
        self.rng = np.random.default_rng([opts.seed, 2])

    # ---- global model -------------------------------------------------------------------
    def _global_model(self):
        o, rng = self.o, self.rng
        if o.scale == "mini":  # exact, from every pixel; the maps are kept for the data
            self.maps = {ifu: pixel_maps(self.inst, ifu) for ifu in o.ifus}
            grid = _cube_grid(self.inst, o.ifus, maps=self.maps)
        else:  # from the slice edges: no CCD-sized maps of all IFUs in memory
            self.maps = {}
            grid = _cube_grid_fast(self.inst, o.ifus)
        self.grid = grid
        geo = self.inst.geometry
        xscale = float(np.abs(geo["x"]).max() + geo["width"].max() / 2)
        yscale = float(np.abs(geo["y"]).max())
        coeffs = {"a10": rng.uniform(-0.06, 0.06), "a01": rng.uniform(-0.06, 0.06),
                  "a20": rng.uniform(-0.04, 0.0), "a11": rng.uniform(-0.02, 0.02),
                  "a02": rng.uniform(-0.04, 0.0)}
        vign = None
        if self.inst.nfm:
            ytop = float(geo["y"].max())
            vign = {"kind": "top", "ystart": ytop - 20.0, "ytop": ytop, "depth": 0.5, "in": "sky (SKYFLAT)"}
        elif o.vignetting:
            # ESO's 4x4 polynomial fit of the vignetted area needs >= 25 usable spaxels after it
            # drops the first/last 3 columns and jumps > 2 %: a wide, gentle corner
            radius = max(22.0, 0.25 * min(grid["nx"], grid["ny"]))
            vign = {"kind": "corner", "x0": grid["crval1"], "y0": grid["crval2"], "radius": radius,
                    "depth": 0.2, "in": "lamp flats (MASTER_FLAT, ILLUM)"}
        self.field = FieldModel(coeffs, xscale, yscale, vign)
        if o.family:  # truth family: own random streams, so everything else stays as without
            self.field = family_field(self.field, parse_family(o.family), o.seed, geo, grid, self.inst.nfm)
        self.ifu_throughput = {i: (1.0 if i == 1 else float(rng.uniform(0.92, 1.08))) for i in range(1, 25)}
        # residual slice efficiencies after flat-fielding are small (strong jumps would be taken
        # for vignetting edges by ESO's vignmaskedges logic)
        self.slice_eff = {i: rng.uniform(0.985, 1.015, NSLICES) for i in range(1, 25)}
        self.exptime = [float(10.0 + 2.5 * k) for k in range(self.o.nexp)]
        # sky brightness falls as the twilight darkens; longer exposures compensate
        self.sky_level = [1.0 / (1.0 + 0.3 * k) for k in range(self.o.nexp)]
        # electrons per second per unit spectrum: ~28000 e- in the bluest pixels of a 10 s exposure
        self.rate = 1400.0
        if o.brightness != 1.0:
            self.rate *= o.brightness
        # rounded as written to the headers, so that data and header agree exactly
        self.gain = {i: np.round(rng.uniform(1.05, 1.15, 4), 4) for i in range(1, 25)}  # e-/adu
        self.ron = {i: np.round(rng.uniform(2.7, 3.3, 4), 4) for i in range(1, 25)}  # adu
        self.bias = {i: rng.uniform(990.0, 1010.0, 4) for i in range(1, 25)}

    # ---- per-IFU detector model ---------------------------------------------------------------
    def _ifu_model(self, ifu: int):
        lay, o = self.lay, self.o
        rng = np.random.default_rng([o.seed, 3, ifu])
        ny, nx = lay.height, lay.width
        xx = (np.arange(nx, dtype=np.float32) / nx - 0.5)[None, :]
        yy = (np.arange(ny, dtype=np.float32) / ny - 0.5)[:, None]
        response = rng.standard_normal((ny, nx), dtype=np.float32)
        response *= 0.01
        response += 1.0 + 0.02 * xx - 0.015 * yy
        structure = np.broadcast_to(0.6 * xx + 0.3 * rng.standard_normal(nx, dtype=np.float32)[None, :],
                                    (ny, nx)).astype(np.float32)
        defects: dict[str, list] = {"hot_columns": [], "trap_columns": [], "dark_pixels": []}
        nhot = 2 if o.scale == "mini" else 6
        for _ in range(nhot):
            x = int(rng.integers(1, nx + 1))
            y0 = int(rng.integers(1, ny // 2))
            defects["hot_columns"].append({"x": x, "y0": y0, "y1": ny, "level_adu": float(rng.uniform(30, 80))})
        for _ in range(nhot):
            x = int(rng.integers(1, nx + 1))
            yt = int(rng.integers(1, ny + 1))
            bottom = yt <= lay.ny  # charge moves towards the port: bottom quadrants read down
            y0, y1 = (yt, lay.ny) if bottom else (lay.ny + 1, yt)
            defects["trap_columns"].append({"x": x, "y_trap": yt, "y0": y0, "y1": y1,
                                            "depth_e": float(rng.uniform(200, 600))})
        for _ in range(nhot * 3):
            defects["dark_pixels"].append({"x": int(rng.integers(1, nx + 1)), "y": int(rng.integers(1, ny + 1)),
                                           "qe": float(rng.uniform(0.2, 0.6))})
        for d in defects["dark_pixels"]:
            response[d["y"] - 1, d["x"] - 1] *= d["qe"]
        hot = np.zeros((ny, nx), dtype=np.float32)
        for d in defects["hot_columns"]:
            hot[d["y0"] - 1:d["y1"], d["x"] - 1] = d["level_adu"]
        dark_rate = None
        if o.dark:
            dark_rate = (rng.gamma(4.0, 0.5 / 4.0, (ny, nx)) / 3600.0).astype(np.float32)  # e-/s
            for _ in range(nhot * 5):
                dark_rate[rng.integers(0, ny), rng.integers(0, nx)] += rng.uniform(0.05, 0.5)
        return response, structure, hot, dark_rate, defects

    def _expected_electrons(self, ifu: int, maps: PixelMaps, spectrum, field_factor) -> np.ndarray:
        """Noise-free flux (before pixel response) of one IFU: spectrum x slice efficiency x
        IFU throughput x field factor x slice coverage of the pixel; 0 in the gaps."""
        inside = maps.slice_index >= 0
        lam = maps.lam[inside]
        flux = spectrum(lam).astype(np.float32, copy=False)
        if self.o.mode in NAD_RANGES:
            flux *= notch_transmission(lam, self.o.mode)
        flux *= self.slice_eff[ifu][maps.slice_index[inside]].astype(np.float32)
        flux *= np.float32(self.ifu_throughput[ifu])
        if getattr(self.field, "contextual", False):  # truth families: wavelength, IFU, stack
            stack = (CCD_TO_SKY[maps.slice_index[inside]] - 1) // SLICES_PER_STACK
            flux *= field_factor(maps.xpos[inside], maps.ypos[inside], lam, ifu, stack).astype(np.float32)
        else:
            flux *= field_factor(maps.xpos[inside], maps.ypos[inside]).astype(np.float32)
        flux *= maps.cover[inside]
        out = np.zeros(maps.lam.shape, dtype=np.float32)
        out[inside] = flux
        return out

    def _overscan_drift(self, rng, nrows: int) -> np.ndarray:
        """Smooth vertical bias drift (adu) along the raw rows of a quadrant."""
        t = np.linspace(-1.0, 1.0, nrows)
        a = rng.normal(0.0, 1.0, 3)
        return a[0] * t + 0.8 * a[1] * (t * t - 1 / 3) + 0.5 * np.sin(np.pi * t * (1 + 0.3 * a[2]))

    def _raw_frame(self, ifu, electrons, structure, hot, rng, bias_only=False):
        """Assemble one raw uint16 frame from trimmed electrons (already noisy)."""
        lay = self.lay
        raw = np.empty(lay.raw_shape, dtype=np.float32)
        gains, ron, level = self.gain[ifu], self.ron[ifu], self.bias[ifu]
        for q in range(1, 5):
            qr, qc = lay.quadrant_slices(q)
            nrows = qr.stop - qr.start
            drift = self._overscan_drift(rng, nrows).astype(np.float32)
            offset = level[q - 1] + rng.normal(0.0, 0.5)
            noise = rng.standard_normal((nrows, qc.stop - qc.start), dtype=np.float32)
            noise *= ron[q - 1]
            raw[qr, qc] = noise + (offset + drift)[:, None]
            dr, dc = lay.data_slices(q)
            tr, tc = lay.trimmed_slices(q)
            data = raw[dr, dc]
            data += structure[tr, tc]
            data += hot[tr, tc]
            if not bias_only:
                data += electrons[tr, tc] * np.float32(1.0 / gains[q - 1])
        return raw

    @staticmethod
    def _to_uint16(raw: np.ndarray) -> np.ndarray:
        """Digitise (in place): round, clip to 0..65535."""
        np.rint(raw, out=raw)
        np.clip(raw, 0, 65535, out=raw)
        return raw.astype(np.uint16)

    def _raw_header(self, ifu: int) -> fits.Header:
        lay = self.lay
        h = fits.Header()
        h["EXTNAME"] = f"CHAN{ifu:02d}"
        for key, value, comment in _chip_cards(ifu):
            h[key] = (value, comment)
        ports = {1: (1, 1), 2: (PORT_X_RIGHT, 1), 3: (PORT_X_RIGHT, PORT_Y_TOP), 4: (1, PORT_Y_TOP)}
        for q in range(1, 5):
            p = f"HIERARCH ESO DET OUT{q} "
            h[p + "NAME"] = (f"{'ABCD'[q - 1]}", "Description of output")
            h[p + "ID"] = (f"{'ABCD'[q - 1]}", "Output ID as from manufacturer")
            h[p + "X"] = (ports[q][0], "X location of output")
            h[p + "Y"] = (ports[q][1], "Y location of output")
            h[p + "NX"] = (lay.nx, "valid pixels along X")
            h[p + "NY"] = (lay.ny, "valid pixels along Y")
            h[p + "PRSCX"] = (lay.prscx, "Prescan region in X")
            h[p + "PRSCY"] = (lay.prscy, "Prescan region in Y")
            h[p + "OVSCX"] = (lay.ovscx, "Overscan region in X")
            h[p + "OVSCY"] = (lay.ovscy, "Overscan region in Y")
            h[p + "GAIN"] = (float(round(self.gain[ifu][q - 1], 4)), "Conversion from electrons to ADU")
            h[p + "RON"] = (float(round(self.ron[ifu][q - 1] * self.gain[ifu][q - 1], 4)),
                            "Readout noise per output (e-)")
        return h

    def _raw_primary(self, k: int, tag: str) -> fits.Header:
        o = self.o
        h = _primary_common(o.mode)
        mjd = 61000.95 + k * 40.0 / 86400.0
        h["DATE-OBS"] = (_mjd_to_iso(mjd), "Observing date")
        h["MJD-OBS"] = (mjd, "Obs start")
        h["EXPTIME"] = (self.exptime[k] if tag == "SKYFLAT" else ILLUM_EXPTIME, "Integration time")
        h["OBJECT"] = ("FLAT,SKY" if tag == "SKYFLAT" else "FLAT,LAMP,ILLUM", "Original target.")
        h["RA"] = (0.0, "")
        h["DEC"] = (-24.6, "")
        h["HIERARCH ESO DPR CATG"] = ("CALIB", "Observation category")
        h["HIERARCH ESO DPR TYPE"] = ("FLAT,SKY" if tag == "SKYFLAT" else "FLAT,LAMP,ILLUM", "Observation type")
        h["HIERARCH ESO DPR TECH"] = ("IFU", "Observation technique")
        nfm = self.inst.nfm
        tpl = ("MUSE_nfm_cal_twiflat" if nfm else "MUSE_wfm_cal_twiflat") if tag == "SKYFLAT" else \
            ("MUSE_nfm_cal_illum" if nfm else "MUSE_wfm_cal_illum")
        h["HIERARCH ESO TPL ID"] = (tpl, "Template signature ID")
        h["HIERARCH ESO OBS NAME"] = ("Calibration", "OB name")
        h["HIERARCH ESO OBS ID"] = (200000000, "Observation block ID")
        h["HIERARCH ESO TEL AIRM START"] = (1.0, "Airmass at start")
        h["HIERARCH ESO TEL AIRM END"] = (1.0, "Airmass at end")
        h["HIERARCH ESO TEL PARANG START"] = (0.0, "Parallactic angle at start (deg)")
        h["HIERARCH ESO TEL PARANG END"] = (0.0, "Parallactic angle at end (deg)")
        h["HIERARCH ESO INS DROT MODE"] = ("SKY", "Instrument derotator mode")
        h["HIERARCH ESO INS DROT POSANG"] = (0.0, "Position angle on sky (deg)")
        return h

    def _raw_name(self, k: int, tag: str) -> str:
        """The raw file name: the archive's ``MUSE.<DATE-OBS>.fits`` or ``SKYFLAT_000k.fits``."""
        if self.o.archive:
            return f"MUSE.{self._raw_primary(k, tag)['DATE-OBS']}.fits"
        return f"SKYFLAT_{k + 1:04d}.fits" if tag == "SKYFLAT" else "ILLUM_0001.fits"

    def _archive_cards(self, k: int, tag: str) -> list[tuple[str, object, str]]:
        """What archive raw files carry beyond the simulated set's keywords: file names and the
        template's start, number of exposures and exposure number (one template per tag)."""
        h = self._raw_primary(k, tag)
        first = self._raw_primary(0 if tag == "SKYFLAT" else k, tag)["DATE-OBS"][:19]
        nexp, expno = (self.o.nexp, k + 1) if tag == "SKYFLAT" else (1, 1)
        return [("ARCFILE", f"MUSE.{h['DATE-OBS']}.fits", "Archive File Name"),
                ("ORIGFILE", f"MUSE_{tag}_{k + 1:04d}.fits", "Original File Name"),
                ("HIERARCH ESO TPL START", first, "TPL start time"),
                ("HIERARCH ESO TPL NEXP", nexp, "Number of exposures within template"),
                ("HIERARCH ESO TPL EXPNO", expno, "Exposure number within template")]

    # ---- calibrations headers -------------------------------------------------------------
    def _bias_primary(self) -> fits.Header:
        h = _pro_header(self.o.mode, "MASTER_BIAS", "MASTER_BIAS", "muse_bias")
        for n, (name, value) in enumerate(BIAS_REC_PARAMS, start=1):
            h[f"HIERARCH ESO PRO REC1 PARAM{n} NAME"] = (name, "")
            h[f"HIERARCH ESO PRO REC1 PARAM{n} VALUE"] = (value, "")
        return h

    def run(self) -> SimulatedSet:
        o, out = self.o, self.out
        self._global_model()
        tags: dict[str, list[Path]] = {"SKYFLAT": [out / self._raw_name(k, "SKYFLAT") for k in range(o.nexp)]}
        if o.illum:
            tags["ILLUM"] = [out / self._raw_name(o.nexp, "ILLUM")]
        for name in ("MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE", "WAVECAL_TABLE", "GEOMETRY_TABLE"):
            tags[name] = [out / f"{name}.fits"]
        if o.dark:
            tags["MASTER_DARK"] = [out / "MASTER_DARK.fits"]
        if o.badpix:
            tags["BADPIX_TABLE"] = [out / "BADPIX_TABLE.fits"]
        if o.vignetting:
            tags["VIGNETTING_MASK"] = [out / "VIGNETTING_MASK.fits"]
        raws = [(path, k, "SKYFLAT") for k, path in enumerate(tags["SKYFLAT"])]
        raws += [(tags["ILLUM"][0], o.nexp, "ILLUM")] if o.illum else []
        for path, k, tag in raws:
            header = self._raw_primary(k, tag)
            for key, value, comment in self._archive_cards(k, tag) if o.archive else ():
                header[key] = (value, comment)
            _write_primary(path, header)
        _write_primary(tags["MASTER_BIAS"][0], self._bias_primary())
        fh = _pro_header(o.mode, "MASTER_FLAT", "MASTER_FLAT", "muse_flat")
        _write_primary(tags["MASTER_FLAT"][0], fh)
        _write_primary(tags["TRACE_TABLE"][0], _pro_header(o.mode, "TRACE_TABLE", "TRACE_TABLE", "muse_flat"))
        _write_primary(tags["WAVECAL_TABLE"][0],
                       _pro_header(o.mode, "WAVECAL_TABLE", "WAVECAL_TABLE", "muse_wavecal"))
        if o.dark:
            dh = _pro_header(o.mode, "MASTER_DARK", "MASTER_DARK", "muse_dark")
            dh["EXPTIME"] = (3600.0, "Integration time")
            _write_primary(tags["MASTER_DARK"][0], dh)
        if o.badpix:
            _write_primary(tags["BADPIX_TABLE"][0],
                           _pro_header(o.mode, "BADPIX_TABLE", "BADPIX_TABLE", "muse_bias"))
        ifu_truth = {}
        for ifu in o.ifus:
            ifu_truth[ifu] = self._write_ifu(ifu, tags)
            log.info("simulated IFU %d (%s scale) in %s", ifu, o.scale, out)
        self._write_geometry(tags["GEOMETRY_TABLE"][0])
        if o.vignetting:
            self._write_vignetting_mask(tags["VIGNETTING_MASK"][0])
        if o.fpack:
            for tag in ("SKYFLAT", "ILLUM"):
                if tag in tags:
                    tags[tag] = [_fpack(path) for path in tags[tag]]
        sof = out / "twilight.sof"
        order = ["SKYFLAT", "ILLUM", "MASTER_BIAS", "MASTER_DARK", "MASTER_FLAT", "TRACE_TABLE",
                 "WAVECAL_TABLE", "GEOMETRY_TABLE", "BADPIX_TABLE", "VIGNETTING_MASK"]
        sof.write_text("".join(f"{p.resolve()} {tag}\n" for tag in order for p in tags.get(tag, [])))
        truth_path = out / "truth.json"
        truth_path.write_text(json.dumps(self._truth(ifu_truth), indent=1))
        return SimulatedSet(out, sof, truth_path, tags, list(o.ifus), o.scale, o.mode)

    def _write_ifu(self, ifu: int, tags) -> dict:
        o = self.o
        rng = np.random.default_rng([o.seed, 4, ifu])
        maps = self.maps.pop(ifu, None) or pixel_maps(self.inst, ifu)
        response, structure, hot, dark_rate, defects = self._ifu_model(ifu)
        rate = self._expected_electrons(ifu, maps, twilight_spectrum, self.field.sky)
        rate *= np.float32(self.rate)
        eso_sel = maps.eso_mask & (maps.lam >= 5000.0) & (maps.lam <= 9000.0)
        lamp_vign = np.ones(rate.shape, dtype=np.float32)
        if self.field.vign is not None and self.field.vign["kind"] == "corner":
            inside = maps.slice_index >= 0
            lamp_vign[inside] = self.field.lamp(maps.xpos[inside], maps.ypos[inside])
        trap = np.zeros(rate.shape, dtype=np.float32)
        for d in defects["trap_columns"]:
            trap[d["y0"] - 1:d["y1"], d["x"] - 1] = d["depth_e"]
        header = self._raw_header(ifu)
        crs, nsat, sat_scale, scales = [], [], 1.0, []
        for k, path in enumerate(tags["SKYFLAT"]):
            scale = self.exptime[k] * self.sky_level[k]
            if o.saturate and k == 0:
                sat_scale = self._saturation_scale(ifu, rate * response * scale)
                scale *= sat_scale
            scales.append(scale)
            mean_e = rate * response * scale
            if dark_rate is not None:
                mean_e = mean_e + dark_rate * self.exptime[k]
            electrons = _photon_noise(rng, mean_e)
            electrons = np.maximum(electrons - trap, 0.0)
            cr = self._cosmics(rng, electrons)
            crs.append(cr)
            raw = self._raw_frame(ifu, electrons, structure, hot, rng)
            digital = self._to_uint16(raw)
            nsat.append(int(np.count_nonzero(digital > SATURATION)))  # as ESO counts them
            _append(path, fits.ImageHDU(digital, header=header))
        illum_eff = None
        if o.illum:
            illum_eff = self.slice_eff[ifu]
            lamp = self._expected_electrons(ifu, maps, lamp_spectrum, self.field.lamp)
            lamp *= 20000.0 / max(lamp.max(), 1e-30)
            mean_e = lamp * response
            if dark_rate is not None:
                mean_e = mean_e + dark_rate * ILLUM_EXPTIME
            electrons = _photon_noise(rng, mean_e)
            raw = self._raw_frame(ifu, electrons, structure, hot, rng)
            _append(tags["ILLUM"][0], fits.ImageHDU(self._to_uint16(raw), header=header))
        self._write_bias(ifu, tags["MASTER_BIAS"][0], structure, hot, rng)
        self._write_flat(ifu, tags["MASTER_FLAT"][0], response * lamp_vign)
        if o.dark:
            self._write_dark(ifu, tags["MASTER_DARK"][0], dark_rate, rng)
        if o.badpix:
            self._write_badpix(ifu, tags["BADPIX_TABLE"][0], defects)
        self._write_trace(ifu, tags["TRACE_TABLE"][0])
        self._write_wavecal(ifu, tags["WAVECAL_TABLE"][0])
        return {"throughput": self.ifu_throughput[ifu],
                "slice_efficiency": [float(v) for v in self.slice_eff[ifu]],
                "illum_slice_factor": None if illum_eff is None else [float(v) for v in illum_eff],
                "gain": [float(round(g, 4)) for g in self.gain[ifu]],
                "ron_adu": [float(r) for r in self.ron[ifu]],
                "bias_level": [float(b) for b in self.bias[ifu]],
                "defects": defects,
                "cosmic_rays": {"count": [len(c) for c in crs], "positions": crs},
                "nsaturated": nsat,
                "saturation_scale_exp1": float(sat_scale),
                "exposure_scale": [float(v) for v in scales],
                # noise-free sum of the mean flat-fielded exposure over the pixels that ESO's
                # pixel table takes within 5000..9000 A (compare with QC TWILIGHTm INTFLUX)
                "expected_intflux": float((rate[eso_sel] / lamp_vign[eso_sel]).sum(dtype=np.float64)
                                          * np.mean(scales)),
                "rate_scale_e_per_s": float(self.rate)}

    def _saturation_scale(self, ifu: int, mean_e: np.ndarray, fraction: float = 5e-4) -> float:
        """Brightening of exposure 1 that saturates ~``fraction`` of the data pixels (--saturate).

        ESO warns above 0.1 % saturated pixels, so the default stays below that.
        """
        peak = float(np.quantile(mean_e, 1.0 - fraction))
        level = float(self.bias[ifu].mean()) + 1000.0
        return max(1.0, (1.02 * SATURATION - level) * float(self.gain[ifu].min()) / peak)

    def _cosmics(self, rng, electrons: np.ndarray) -> list[list[int]]:
        """Add short cosmic-ray tracks (in place); return their 1-based (x, y) start pixels."""
        ny, nx = electrons.shape
        n = max(3, int(round(300 * nx * ny / (4096 * 4112))))
        out = []
        for _ in range(n):
            x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
            length = int(rng.integers(1, 4))
            dx, dy = (1, 0) if rng.random() < 0.5 else (0, 1)
            amp = float(rng.uniform(3000.0, 20000.0))
            for step in range(length):
                xi, yi = x + step * dx, y + step * dy
                if xi < nx and yi < ny:
                    electrons[yi, xi] += amp / (step + 1)
            out.append([x + 1, y + 1])
        return out

    def _write_bias(self, ifu, path, structure, hot, rng):
        """MASTER_BIAS as ESO's muse_bias leaves it after vpoly: level ~0, structure kept."""
        lay, nbias = self.lay, 11
        ron = self.ron[ifu]
        data = structure + hot
        stat = np.empty_like(data)
        for q in range(1, 5):
            tr, tc = lay.trimmed_slices(q)
            noise = rng.standard_normal(data[tr, tc].shape, dtype=np.float32)
            noise *= ron[q - 1] / np.sqrt(nbias)
            data[tr, tc] += noise
            stat[tr, tc] = ron[q - 1] ** 2 / nbias
        dq = np.zeros(data.shape, dtype=np.int32)
        dq[hot > 0] |= DQ_DEAD
        h = fits.Header()
        h["EXTNAME"] = f"CHAN{ifu:02d}.DATA"
        h["BUNIT"] = ("adu", "DATA is in analog-to-digital units")
        for key, value, comment in _chip_cards(ifu):
            h[key] = (value, comment)
        for q in range(1, 5):
            h[f"HIERARCH ESO DRS MUSE OVSC{q} MEAN"] = (float(round(self.bias[ifu][q - 1], 3)),
                                              "[adu] raw overscan mean")
            h[f"HIERARCH ESO DRS MUSE OVSC{q} STDEV"] = (float(round(self.ron[ifu][q - 1], 3)),
                                               "[adu] raw overscan stdev")
        for q in range(1, 5):
            tr, tc = lay.trimmed_slices(q)
            h[f"HIERARCH ESO QC BIAS MASTER{q} MEAN"] = (round(float(data[tr, tc].mean()), 4), "[adu]")
            h[f"HIERARCH ESO QC BIAS MASTER{q} RON"] = (round(float(ron[q - 1] * self.gain[ifu][q - 1]), 4), "[count]")
        _append(path, fits.ImageHDU(data.astype(np.float32), header=h))
        _append(path, fits.ImageHDU(dq, name=f"CHAN{ifu:02d}.DQ"))
        sh = fits.Header()
        sh["EXTNAME"] = f"CHAN{ifu:02d}.STAT"
        sh["BUNIT"] = "adu**2"
        _append(path, fits.ImageHDU(stat.astype(np.float32), header=sh))

    def _write_flat(self, ifu, path, response):
        h = fits.Header()
        h["EXTNAME"] = f"CHAN{ifu:02d}.DATA"
        h["BUNIT"] = ("count", "as written by muse_flat")
        for key, value, comment in _chip_cards(ifu):
            h[key] = (value, comment)
        h["HIERARCH ESO QC FLAT MASTER INTFLUX"] = (round(1.0e9 * self.ifu_throughput[ifu], 1),
                                          "[count] integrated flux")
        _append(path, fits.ImageHDU(response.astype(np.float32), header=h))
        _append(path, fits.ImageHDU(np.zeros(response.shape, dtype=np.int32), name=f"CHAN{ifu:02d}.DQ"))
        _append(path, fits.ImageHDU(np.full(response.shape, 1e-5, dtype=np.float32), name=f"CHAN{ifu:02d}.STAT"))

    def _write_dark(self, ifu, path, dark_rate, rng):
        texp, ndark = 3600.0, 5
        counts = dark_rate * texp
        data = counts + rng.normal(0.0, 1.0, counts.shape) * np.sqrt(counts / ndark)
        h = fits.Header()
        h["EXTNAME"] = f"CHAN{ifu:02d}.DATA"
        h["BUNIT"] = ("count", "DATA is in electrons")
        for key, value, comment in _chip_cards(ifu):
            h[key] = (value, comment)
        _append(path, fits.ImageHDU(data.astype(np.float32), header=h))
        _append(path, fits.ImageHDU(np.zeros(counts.shape, dtype=np.int32), name=f"CHAN{ifu:02d}.DQ"))
        sh = fits.Header()
        sh["EXTNAME"] = f"CHAN{ifu:02d}.STAT"
        sh["BUNIT"] = "count**2"
        _append(path, fits.ImageHDU((counts / ndark + 1e-3).astype(np.float32), header=sh))

    def _write_badpix(self, ifu, path, defects):
        lay = self.lay
        xs, ys, st, val = [], [], [], []
        for d in defects["hot_columns"]:
            y = np.arange(d["y0"], d["y1"] + 1)
            xs.append(np.full(y.size, d["x"]))
            ys.append(y)
            st.append(np.full(y.size, DQ_HOT))
            val.append(np.full(y.size, d["level_adu"]))
        for d in defects["trap_columns"]:
            y = np.arange(d["y0"], d["y1"] + 1)
            xs.append(np.full(y.size, d["x"]))
            ys.append(y)
            st.append(np.full(y.size, DQ_TRAP))
            val.append(np.full(y.size, d["depth_e"]))
        for d in defects["dark_pixels"]:
            xs.append(np.array([d["x"]]))
            ys.append(np.array([d["y"]]))
            st.append(np.array([DQ_DARK]))
            val.append(np.array([d["qe"]]))
        x = lay.raw_x(np.concatenate(xs)).astype(np.int32)
        y = lay.raw_y(np.concatenate(ys)).astype(np.int32)
        hdu = _table_hdu([("xpos", "J", x, "pix"), ("ypos", "J", y, "pix"),
                          ("status", "J", np.concatenate(st).astype(np.int32), None),
                          ("value", "E", np.concatenate(val).astype(np.float32), None)], f"CHAN{ifu:02d}")
        _append(path, hdu)

    def _write_trace(self, ifu, path):
        t = self.inst.trace[ifu]
        y = np.arange(1, self.lay.height + 1, dtype=float)
        widths = np.array([np.mean(_eval_trace(t[s, 2], y) - _eval_trace(t[s, 1], y)) for s in range(NSLICES)])
        cols = [("SliceNo", "J", np.arange(1, NSLICES + 1, dtype=np.int32), None),
                ("Width", "E", widths.astype(np.float32), "pix")]
        for k in range(3):
            for n in range(t.shape[2]):
                cols.append((f"tc{k}_{n:02d}", "D", t[:, k, n], None))
            cols.append((f"MSE{k}", "D", np.full(NSLICES, 1e-4), None))
        _append(path, _table_hdu(cols, f"CHAN{ifu:02d}"))

    def _write_wavecal(self, ifu, path):
        w = self.inst.wave[ifu]
        cols = [("SliceNo", "J", np.arange(1, NSLICES + 1, dtype=np.int32), None)]
        for X in range(w.shape[1]):
            for Y in range(w.shape[2]):
                cols.append((f"wlc{X}{Y}", "D", w[:, X, Y], None))
        cols.append(("MSE", "D", np.full(NSLICES, 1e-3), None))
        _append(path, _table_hdu(cols, f"CHAN{ifu:02d}"))

    def _write_geometry(self, path):
        g = self.inst.geometry
        units = {"x": "pix", "xerr": "pix", "y": "pix", "yerr": "pix", "angle": "deg", "angleerr": "deg",
                 "width": "pix", "widtherr": "pix"}
        cols = [(n, "J" if g.dtype[n].kind == "i" else "D", g[n], units.get(n)) for n in g.dtype.names]
        hdr = _pro_header(self.o.mode, "GEOMETRY_TABLE", "GEOMETRY_TABLE", "muse_geometry")
        _write_primary(path, hdr)
        _append(path, _table_hdu(cols, None))

    def _write_vignetting_mask(self, path):
        """VIGNETTING_MASK: primary-HDU int16 image, masked corner at the bottom left.

        ESO cuts the mask quadrant with most masked pixels (nx/2 x ny/2) and pastes it into
        the same corner of an empty cube-sized mask (the copy fails if the quadrant is larger
        than the cube).  The file is therefore 2 x (cube size - 1): its bottom-left quadrant
        covers the cube up to its last row and column, so a vignetted corner wider than half
        the (mini) field survives the adaptation.
        """
        g = self.grid
        ny, nx = 2 * (g["ny"] - 1), 2 * (g["nx"] - 1)
        y, x = np.mgrid[0:ny, 0:nx]
        mask = np.zeros((ny, nx), dtype=np.int16)
        if self.field.vign is not None and self.field.vign["kind"] == "corner":
            vign = self.field.vignetting(g["crval1"] + x, g["crval2"] + y)
            mask[:] = vign < 1.0 - 0.002
        else:
            # NFM (ESO ignores the file there): a plain corner mask
            mask[:] = np.hypot(x, y) < 0.3 * min(g["nx"], g["ny"])
        mask[ny // 2:, :] = 0
        mask[:, nx // 2:] = 0
        h = fits.Header()
        h["HIERARCH ESO PRO CATG"] = "VIGNETTING_MASK"
        h["INSTRUME"] = "MUSE"
        _write_primary(path, h, mask)

    def _truth(self, ifu_truth) -> dict:
        o, g = self.o, self.grid
        lam = 5000.0 + 250.0 * np.arange(17)
        y, x = np.mgrid[0:g["ny"], 0:g["nx"]]
        xpos, ypos = g["crval1"] + x, g["crval2"] + y
        return {"conventions": {
                    "maps": "[row][column] on cube_grid: x = crval1 + column, y = crval2 + row "
                            "(geometry-table pixels); vignetting map = throughput factor <= 1",
                    "ccd_positions": "1-based (x, y) on the trimmed CCD (defects, cosmic rays); "
                                     "BADPIX_TABLE holds raw (untrimmed) positions",
                    "slice_efficiency": "per CCD slice (SliceCCD 1..48)",
                    "flux": "electrons = rate_scale_e_per_s * spectrum(lambda) * slice_efficiency * "
                            "throughput * field (sky: illumination, NFM also vignetting) * "
                            "pixel coverage * exposure_scale * pixel response; MASTER_FLAT = "
                            "pixel response (x lamp vignetting in WFM with --vignetting)"},
                "options": {"scale": o.scale, "seed": o.seed, "nexp": o.nexp, "ifus": o.ifus,
                            "illum": o.illum, "dark": o.dark, "badpix": o.badpix,
                            "vignetting": o.vignetting, "mode": o.mode, "saturate": o.saturate,
                            **({"family": o.family} if o.family else {}),
                            **({"brightness": o.brightness} if o.brightness != 1.0 else {})},
                "ccd": {"nx_quadrant": self.lay.nx, "ny_quadrant": self.lay.ny, "prscx": self.lay.prscx,
                        "prscy": self.lay.prscy, "ovscx": self.lay.ovscx, "ovscy": self.lay.ovscy,
                        "raw_shape": list(self.lay.raw_shape)},
                "exptime": self.exptime, "sky_level": self.sky_level,
                "twilight_spectrum": {"formula": "(lam/6000)**-2 * (1 + 0.04 sin(2 pi (lam-4600)/2200))",
                                      "lambda": lam.tolist(), "value": twilight_spectrum(lam).tolist()},
                "lamp_spectrum": {"formula": "(lam/6000)**1.5"},
                "notch_filter": {"range": NAD_RANGES.get(o.mode), "transmission_inside": 0.02,
                                 "applies_to": "SKYFLAT and ILLUM"},
                "field_illumination": {"formula": "1 + a10 u + a01 v + a20 u^2 + a11 u v + a02 v^2, "
                                                  "u = x/xscale, v = y/yscale",
                                       "coeffs": self.field.coeffs, "xscale": self.field.xscale,
                                       "yscale": self.field.yscale,
                                       "map": self.field.illumination(xpos, ypos).round(6).tolist()},
                "vignetting": {"model": self.field.vign,
                               "map": self.field.vignetting(xpos, ypos).round(6).tolist()},
                "cube_grid": g,
                "ifus": {str(k): v for k, v in ifu_truth.items()},
                **({"family": {**self.field.describe(), "brightness": o.brightness}} if o.family else {}),
                **({"brightness": o.brightness} if o.brightness != 1.0 and not o.family else {})}


def _fpack(path: Path) -> Path:
    """Tile-compress a raw file's image extensions (RICE, lossless for its integers) into
    ``<name>.fz``, as fpack and ESO's archive do, and remove the uncompressed file."""
    target = path.with_name(path.name + ".fz")
    with fits.open(path) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)]
        hdus += [fits.CompImageHDU(data=hdu.data, header=hdu.header, compression_type="RICE_1") for hdu in hdul[1:]]
        fits.HDUList(hdus).writeto(target, overwrite=True)
    path.unlink()
    return target


def _photon_noise(rng, mean: np.ndarray) -> np.ndarray:
    """Poisson-distributed electrons (float32): exact below 30 e-, Gaussian approximation above."""
    mean = np.asarray(mean, dtype=np.float32)
    out = rng.standard_normal(mean.shape, dtype=np.float32)
    out *= np.sqrt(mean)
    out += mean
    low = mean < 30.0
    out[low] = rng.poisson(mean[low])
    return out


def _mjd_to_iso(mjd: float) -> str:
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="utc").isot[:23]
