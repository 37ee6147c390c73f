"""Smooth illumination and vignetting model: DATACUBE_SKYFLAT -> TWILIGHT_CUBE.

The post-processing of ESO's muse_twilight after the cube reconstruction:

1. white-light mask: non-finite and zero spaxels of the white-light image,
   dilated by 5 x 1 in x; the outermost columns are forced bad (but, as in
   ESO, not dilated);
2. per wavelength plane: a 5 (x) x 7 (y) median filter ignoring the mask and
   non-finite/zero spaxels, normalisation by the mean of the good spaxels, a 2D
   polynomial fit (maximum power ``xorder`` in x and ``yorder`` in y, all cross
   terms) outside the vignetted area, evaluated over the whole plane and
   normalised again;
3. with a vignetting mask (WFM: VIGNETTING_MASK, NFM: the top rows): the
   normalised white-light image divided by the collapsed fit is smoothed
   inside the vignetted area (polyfit, gaussian or median) and multiplied into
   every plane, which is then renormalised to mean 1.

All masks are boolean arrays, True = bad (rejected), in NumPy [y, x] order.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..errors import FitError, InputError
from ..instrument import is_nfm
from ..params import Settings, VignSmooth
from .cplmath import median_float, polyfit_2d, running_mean
from .cube import white_light

log = logging.getLogger(__name__)

#: Half sizes of the fixed per-plane median filter (5 columns x 7 rows).
PLANE_MEDIAN_HALF = (2, 3)

#: NFM vignetted height used when ``vignnfmmask`` is out of range.
NFM_MASK_DEFAULT = 22

#: CPL_MATH_SIG_FWHM: sigma / FWHM of a Gaussian.
SIG_FWHM = 0.5 / math.sqrt(2.0 * math.log(2.0))

FLT_MAX = float(np.finfo(np.float32).max)
FLT_EPSILON = float(np.finfo(np.float32).eps)



@dataclass
class TwilightResult:
    """The smooth twilight cube and its diagnostic images (None when not made)."""

    cube: np.ndarray  # float32 (nz, ny, nx), each plane mean 1
    white_global_fit: np.ndarray
    white_div_global: np.ndarray
    white_div_global_dq: np.ndarray  # bool, True = bad
    white_div_global_excl_edges: np.ndarray | None = None
    white_div_global_excl_edges_dq: np.ndarray | None = None
    vign_fit: np.ndarray | None = None  # empty array: ESO's failed polyfit (empty HDU)
    vign_fit_dq: np.ndarray | None = None
    white_cor: np.ndarray | None = None
    white_cor_dq: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def extensions(self) -> list[str]:
        """Names of the image extensions after DATA, in ESO's order."""
        names = ["white_global_fit", "white_div_global", "white_div_global_DQ"]
        for name in ("white_div_global_excl_edges", "vign_fit", "white_cor"):
            if getattr(self, name) is not None:
                names.append(name)
            if getattr(self, name + "_dq") is not None:
                names.append(name + "_DQ")
        return names


# --------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True)
def _median_filter(data, bad, rx, ry):
    """CPL's masked median filter with CPL_BORDER_FILTER (window shrinks at the edges).

    Output spaxels whose window holds no good input are 0 and flagged.  The
    median of an even count is lower + (upper - lower) / 2 in float32.
    """
    ny, nx = data.shape
    out = np.zeros((ny, nx), np.float32)
    outbad = np.zeros((ny, nx), np.bool_)
    window = np.empty((2 * rx + 1) * (2 * ry + 1), np.float64)
    work = np.empty(window.size + 100, np.float64)
    for y in range(ny):
        y1 = max(0, y - ry)
        y2 = min(ny - 1, y + ry)
        for x in range(nx):
            x1 = max(0, x - rx)
            x2 = min(nx - 1, x + rx)
            k = 0
            for j in range(y1, y2 + 1):
                for i in range(x1, x2 + 1):
                    if not bad[j, i]:
                        window[k] = data[j, i]
                        k += 1
            if k == 0:
                outbad[y, x] = True
            else:
                out[y, x] = median_float(window, np.int64(k), work)
    return out, outbad


@njit(cache=True, nogil=True)
def _linear_filter(data, bad, kernel):
    """CPL's normalised linear filter with bad pixels and CPL_BORDER_FILTER.

    The weighted sum over good inputs is divided by the sum of |weights| used;
    output spaxels without any good input are 0 and flagged.
    """
    ny, nx = data.shape
    ry = (kernel.shape[0] - 1) // 2
    rx = (kernel.shape[1] - 1) // 2
    out = np.zeros((ny, nx), np.float32)
    outbad = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        y1 = max(0, y - ry)
        y2 = min(ny - 1, y + ry)
        for x in range(nx):
            x1 = max(0, x - rx)
            x2 = min(nx - 1, x + rx)
            total = 0.0
            weight = 0.0
            for j in range(y1, y2 + 1):
                for i in range(x1, x2 + 1):
                    if not bad[j, i]:
                        w = kernel[j - y + ry, i - x + rx]
                        total += w * np.float64(data[j, i])
                        weight += abs(w)
            if weight > 0.0:
                out[y, x] = np.float32(total / weight)
            else:
                outbad[y, x] = True
    return out, outbad


# --------------------------------------------------------------------------
# building blocks


def _mean_good(image: np.ndarray, bad: np.ndarray | None = None) -> float:
    """Mean of the good pixels (double accumulation), 0 when there are none (as CPL)."""
    values = image if bad is None else image[~bad]
    return float(np.mean(values, dtype=np.float64)) if values.size else 0.0


def _scale(image: np.ndarray, factor: float) -> np.ndarray:
    """float32 image times a double scalar, rounded back to float32 (CPL)."""
    return (image.astype(np.float64) * factor).astype(np.float32)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CPL image division: float32 quotient, zero divisors give 0 and are flagged."""
    zero = denominator == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.where(zero, np.float32(0), numerator / np.where(zero, 1, denominator))
    return quotient.astype(np.float32), zero


def _threshold(image: np.ndarray, is_wfm: bool) -> np.ndarray:
    """Clip to >= 1 (WFM: vignetting reduced lamp flats) or <= 1 (NFM: sky flats).

    As cpl_image_threshold: values beyond +-FLT_MAX become +-FLT_MAX, NaN stays.
    """
    out = image.copy()
    if is_wfm:
        out[out < 1] = 1
        out[out > FLT_MAX] = FLT_MAX
    else:
        out[out > 1] = 1
        out[out < -FLT_MAX] = -FLT_MAX
    return out


def collapse(cube: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """White-light image as ESO's post-processing collapses: 0 where a spaxel has no
    finite voxel, and the mask of those spaxels."""
    white = white_light(cube)
    empty = np.isnan(white)
    white[empty] = 0
    return white, empty


def white_light_mask(white: np.ndarray) -> np.ndarray:
    """Mask of empty spaxels in the white-light image, ESO style.

    Non-finite and zero spaxels are dilated by +-2 columns.  The dilation
    leaves the outer two columns on each side as they were (CPL_BORDER_NOP):
    columns 1 and nx-2 keep the undilated mask and the outermost columns are
    forced bad.
    """
    bad = ~np.isfinite(white) | (white == 0)
    ny, nx = bad.shape
    out = bad.copy()
    if nx >= 5:
        dilated = bad[:, 0:nx - 4].copy()
        for shift in range(1, 5):
            dilated |= bad[:, shift:nx - 4 + shift]
        out[:, 2:nx - 2] = dilated
    out[:, 0] = True
    out[:, -1] = True
    return out


def adapt_vignetting_mask(mask: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Fit a VIGNETTING_MASK to the cube size as ESO does.

    The quadrant with most masked pixels (1-based windows 1..n/2 and n/2..n,
    so the middle row/column belongs to both halves; first maximum among
    bottom-left, bottom-right, top-right, top-left wins) is pasted into the
    same corner of an empty ny x nx mask.
    """
    mask = np.asarray(mask, bool)
    my, mx = mask.shape
    hx, hy = mx // 2, my // 2
    # 0-based slices of the 1-based windows (x1..x2, y1..y2)
    windows = {
        "bottom left": (slice(0, hy), slice(0, hx)),
        "bottom right": (slice(0, hy), slice(hx - 1, mx)),
        "top right": (slice(hy - 1, my), slice(hx - 1, mx)),
        "top left": (slice(hy - 1, my), slice(0, hx)),
    }
    best, nbest = None, 0
    for name, (sy, sx) in windows.items():
        count = int(mask[sy, sx].sum())
        if count > nbest:
            best, nbest = name, count
    if best is None:
        raise InputError(f"VIGNETTING_MASK: no masked quadrant found, cannot adapt "
                         f"{mx}x{my} mask to {nx}x{ny} cube size")
    sy, sx = windows[best]
    part = mask[sy, sx]
    py, px = part.shape
    if py > ny or px > nx:
        raise InputError(f"VIGNETTING_MASK: could not copy {px}x{py} quadrant with masked "
                         f"region into new {nx}x{ny} mask")
    out = np.zeros((ny, nx), bool)
    y0 = 0 if best.startswith("bottom") else ny - py
    x0 = 0 if best.endswith("left") else nx - px
    out[y0:y0 + py, x0:x0 + px] = part
    log.debug("Adapting %dx%d mask in %s quadrant (%d masked pixels) to %dx%d image",
              mx, my, best, nbest, nx, ny)
    return out


def nfm_vignetting_mask(ny: int, nx: int, nrows: int) -> np.ndarray:
    """ESO's internal NFM mask: the top ``nrows`` + 1 rows (22 if out of range)."""
    height = nrows if 0 < nrows < ny else NFM_MASK_DEFAULT
    mask = np.zeros((ny, nx), bool)
    mask[max(ny - height - 1, 0):, :] = True
    return mask


def fit_polynomial_image(image: np.ndarray, bad: np.ndarray, xorder: int,
                         yorder: int) -> np.ndarray:
    """muse_utils_image_fit_polynomial: least-squares 2D polynomial, evaluated everywhere.

    Terms x**i * y**j for all i <= xorder, j <= yorder, in 1-based pixel
    coordinates.  As ESO, the last column and the last row never enter the
    fit.  As CPL, coordinates are centred on their mean and the normal
    equations are solved by Cholesky; a total degree of 0 is the plain mean.
    Raises FitError where CPL's fit fails.
    """
    ny, nx = image.shape
    use = ~bad
    use[-1, :] = False
    use[:, -1] = False
    jj, ii = np.nonzero(use.T)  # x outer, y inner, as ESO fills its vectors
    xs = jj.astype(np.float64) + 1
    ys = ii.astype(np.float64) + 1
    values = image.T[jj, ii].astype(np.float64)
    ncoeff = (xorder + 1) * (yorder + 1)
    if values.size == 0:
        raise FitError("No good pixels found in image, polynomial fit cannot be performed!")
    if values.size < ncoeff:
        raise FitError(f"Too few data points {values.size} < {ncoeff} for the "
                       f"{xorder}x{yorder} polynomial fit")
    if xorder + yorder == 0:
        return np.full((ny, nx), np.float32(running_mean(values)), np.float32)
    xmean, ymean = running_mean(xs), running_mean(ys)
    coeffs, ok = polyfit_2d(xs - xmean, ys - ymean, values, xorder, yorder)
    if not ok:
        raise FitError(f"{xorder}x{yorder} polynomial fit failed: singular matrix "
                       f"({values.size} points)")
    gx = np.arange(1, nx + 1, dtype=np.float64) - xmean
    gy = np.arange(1, ny + 1, dtype=np.float64) - ymean
    grid = (np.vander(gy, yorder + 1, increasing=True)
            @ coeffs.reshape(yorder + 1, xorder + 1)
            @ np.vander(gx, xorder + 1, increasing=True).T)
    return grid.astype(np.float32)


def gaussian_kernel(fwhm: float) -> np.ndarray:
    """muse_matrix_new_gaussian_2d for the vignetting smoothing (odd half width ~ FWHM)."""
    half = int(math.floor(fwhm + 0.5))
    half = half if half % 2 else half + 1
    sigma = fwhm * SIG_FWHM
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    kernel = np.exp(-r2 / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
    return kernel / kernel.sum()


def plane_median(plane: np.ndarray, bad: np.ndarray, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ESO's fixed masked median filter of a cube plane: 5 columns x 7 rows, windows shrinking at
    the edges; returns the filtered plane and its mask (spaxels whose window held no good value).
    A plane smaller than the window is left as it is (ESO: "Access beyond boundaries")."""
    ny, nx = plane.shape
    rx, ry = PLANE_MEDIAN_HALF
    if nx < 2 * rx + 1 or ny < 2 * ry + 1:
        _warn(warnings, "filtering cube plane failed: Access beyond boundaries")
        return plane.copy(), bad
    return _median_filter(np.ascontiguousarray(plane, np.float32), bad, rx, ry)


def median_smoothed(plane: np.ndarray, white_bad: np.ndarray,
                    warnings: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What ESO fits a polynomial to in each cube plane: the plane's 5x7 masked median
    (spaxels bad in the white-light image, empty or zero left out), normalised to mean 1;
    and its bad spaxels."""
    bad = white_bad | ~np.isfinite(plane) | (plane == 0)
    filtered, fbad = plane_median(plane, bad, warnings if warnings is not None else [])
    mean = _mean_good(filtered, fbad)
    return _scale(filtered, 1.0 / mean if mean else np.inf), fbad


def _normalize_and_fit(plane: np.ndarray, white_bad: np.ndarray, vign: np.ndarray | None,
                       xorder: int, yorder: int, warnings: list[str]) -> np.ndarray:
    """One cube plane: 5x7 masked median, normalise, polynomial fit, normalise."""
    filtered, fbad = median_smoothed(plane, white_bad, warnings)
    fitbad = fbad | vign if vign is not None else fbad
    fit = fit_polynomial_image(filtered, fitbad, xorder, yorder)
    mean = _mean_good(fit, fitbad)
    return _scale(fit, 1.0 / mean if mean else np.inf)


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def _edge_exclusion(image: np.ndarray, bad: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Reject the stronger side of every jump >= limit between neighbours.

    Rejected spaxels are set to 1 first; jumps are searched column-wise and
    row-wise on that image, and of each pair the value farther from 1 is
    rejected.  Returns the filled image and the extended mask.
    """
    filled = np.where(bad, np.float32(1), image).astype(np.float32)
    values = filled.astype(np.float64)
    out = bad.copy()
    for axis in (0, 1):
        v1 = values[:-1, :] if axis == 0 else values[:, :-1]
        v2 = values[1:, :] if axis == 0 else values[:, 1:]
        with np.errstate(invalid="ignore"):
            jump = ~(np.abs(v2 - v1) < limit)
            first = np.abs(v1 - 1.0) > np.abs(v2 - 1.0)
        if axis == 0:
            out[:-1, :] |= jump & first
            out[1:, :] |= jump & ~first
        else:
            out[:, :-1] |= jump & first
            out[:, 1:] |= jump & ~first
    return filled, out


def _smooth_vignetted(wdiv: np.ndarray, bad: np.ndarray, is_wfm: bool, method: VignSmooth,
                      xpar: int, ypar: int, warnings: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Smooth white_div_global over the vignetted area; returns (fit, its bad mask), (None, None)
    where the polynomial fit fails."""
    ny, nx = wdiv.shape
    if method is VignSmooth.GAUSSIAN:
        xpar = 10 if xpar < 0 else xpar
        ypar = 10 if ypar < 0 else ypar
        fwhm = (xpar + ypar) / 2.0
        log.info("Running %.1f pix FWHM Gaussian filter...", fwhm)
        kernel = gaussian_kernel(fwhm)
        if kernel.shape[0] > min(nx, ny):
            _warn(warnings, "filtering vignetted area failed: Access beyond boundaries")
            fit = wdiv.copy()
        else:
            fit, _ = _linear_filter(wdiv, bad, kernel)
        return _threshold(fit, is_wfm), bad.copy()
    if method is VignSmooth.MEDIAN:
        xpar = 5 if xpar < 0 else xpar
        ypar = 5 if ypar < 0 else ypar
        log.info("Running %dx%d median filter...", xpar, ypar)
        if xpar < 1 or ypar < 1 or xpar % 2 == 0 or ypar % 2 == 0 or xpar > nx or ypar > ny:
            # CPL refuses the filter and ESO goes on with the unfiltered image
            _warn(warnings, f"filtering vignetted ared failed: a {xpar}x{ypar} median filter "
                            f"needs odd sizes of at most {nx}x{ny}")
            fit, fitbad = wdiv.copy(), bad.copy()
        elif xpar == 1 and ypar == 1:  # CPL copies the image, bad pixels included
            fit, fitbad = wdiv.copy(), bad.copy()
        else:
            fit, fitbad = _median_filter(wdiv, bad, xpar // 2, ypar // 2)
        return _threshold(fit, is_wfm), fitbad
    xpar = 4 if xpar < 0 else xpar
    ypar = 4 if ypar < 0 else ypar
    log.info("Running polyfit (orders %dx%d) ...", xpar, ypar)
    try:
        fit = fit_polynomial_image(_threshold(wdiv, is_wfm), bad, xpar, ypar)
    except FitError as err:
        # ESO goes on without a vignetting model (empty vign_fit and white_cor)
        _warn(warnings, f"vignetting polyfit failed, no vignetting correction: {err}")
        return None, None
    return _threshold(fit, is_wfm), bad.copy()


def _trim_nfm_rows(fit: np.ndarray, fitbad: np.ndarray, vignetted: np.ndarray) -> np.ndarray:
    """NFM: drop rows from the fitted region, top down, whose mean falls below the running maximum.

    Only once that maximum is within 0.1 of 1; returns the remaining fitted area.
    """
    area = vignetted.copy()
    maxval = -np.inf
    for j in range(area.shape[0] - 1, -1, -1):
        if not area[j].any():
            continue
        avg = _mean_good(fit[j], fitbad[j])
        maxval = max(maxval, avg)
        if abs(maxval - 1.0) < 0.1 and avg < maxval:
            area[j] = False
    return area


# --------------------------------------------------------------------------
# the stage


def _fill_failed_planes(fitted: np.ndarray, failed: dict[int, str], wavelengths: np.ndarray | None,
                        warnings: list[str]) -> None:
    """Give planes that could not be fitted the fit of the nearest fitted plane (the lower one on ties).

    A plane without usable spaxels (e.g. inside the NaD notch of an AO mode with nearest
    resampling, or wiped out by iraf cosmic-ray rejection) has no fit; the illumination
    changes slowly with wavelength, so the neighbouring plane's is the sensible stand-in.
    ESO writes a TWILIGHT_CUBE truncated before such a plane, or crashes.
    """
    good = [k for k in range(fitted.shape[0]) if k not in failed]
    if not good:
        raise InputError("no plane of the DATACUBE_SKYFLAT could be smoothed: "
                         + "; ".join(f"plane {k + 1}: {failed[k]}" for k in sorted(failed)))
    for k in sorted(failed):
        source = min(good, key=lambda g: (abs(g - k), g))
        wavelength = f" ({wavelengths[k]:.1f} Angstrom)" if wavelengths is not None else ""
        _warn(warnings, f"plane {k + 1}{wavelength} cannot be smoothed ({failed[k]}); "
                        f"using the fit of plane {source + 1}")
        fitted[k] = fitted[source]


def checked_cube_and_white(cube: np.ndarray, white: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The cube as float32 (nz, ny, nx) and its white-light image (collapsed from the cube when
    None, 0 where empty, as ESO's skip mode), both checked for their shapes."""
    cube = np.asarray(cube, np.float32)
    if cube.ndim != 3:
        raise InputError(f"DATACUBE_SKYFLAT: expected a 3D cube, got shape {cube.shape}")
    if white is None:
        white, _ = collapse(cube)
    white = np.asarray(white, np.float32)
    if white.shape != cube.shape[1:]:
        raise InputError(f"white-light image {white.shape} does not match the cube planes {cube.shape[1:]}")
    return cube, white


def postprocess(cube: np.ndarray, settings: Settings, mode: str, *, white: np.ndarray | None = None,
                vignetting_mask: np.ndarray | None = None,
                wavelengths: np.ndarray | None = None) -> TwilightResult:
    """Turn a DATACUBE_SKYFLAT cube into the smooth TWILIGHT_CUBE (ESO's post-processing).

    ``cube`` is (nz, ny, nx) float32 with NaN for empty spaxels, ``mode`` the ESO INS
    MODE.  ``white`` is the white-light image as stored with DATACUBE_SKYFLAT (NaN where
    empty); if None it is collapsed from ``cube`` (0 where empty, as ESO's skip mode does
    for a cube without one).  ``vignetting_mask`` (non-zero = vignetted) is used in WFM
    only; NFM always uses the top ``vignnfmmask`` rows.  ``wavelengths`` of the planes
    only serve the messages.

    Examples
    --------
    >>> from musetwilight.params import make_settings
    >>> cube = np.ones((3, 20, 24), np.float32)
    >>> result = postprocess(cube, make_settings(), "WFM-NOAO-N")
    >>> result.cube.shape, float(result.cube[1].mean())
    ((3, 20, 24), 1.0)
    """
    cube, white = checked_cube_and_white(cube, white)
    nz, ny, nx = cube.shape
    is_wfm = not is_nfm(mode)
    warnings: list[str] = []
    white_bad = white_light_mask(white)

    if is_wfm:
        vign = (adapt_vignetting_mask(np.asarray(vignetting_mask) != 0, ny, nx)
                if vignetting_mask is not None else None)
    else:
        log.info("NFM: creating internal VIGNETTING_MASK...")
        vign = nfm_vignetting_mask(ny, nx, settings.vignnfmmask)

    xorder, yorder = settings.xorder, settings.yorder
    fitted = np.empty_like(cube)

    failed: dict[int, str] = {}

    def fit_plane(k: int) -> None:
        try:
            fitted[k] = _normalize_and_fit(cube[k], white_bad, vign, xorder, yorder, warnings)
        except FitError as err:
            failed[k] = str(err)

    # the planes are independent and the numba kernels release the GIL
    with ThreadPoolExecutor(max_workers=min(nz, os.cpu_count() or 1)) as pool:
        list(pool.map(fit_plane, range(nz)))
    _fill_failed_planes(fitted, failed, wavelengths, warnings)

    white_global_fit, _ = collapse(fitted)
    whiten = _scale(white, 1.0 / _mean_good(white, white_bad))
    wdiv, zero = _divide(whiten, white_global_fit)
    result = TwilightResult(cube=fitted, white_global_fit=white_global_fit, white_div_global=wdiv,
                            white_div_global_dq=white_bad | zero, warnings=warnings)
    if vign is None:
        return result

    smooth_bad = white_bad | ~vign  # fit only the vignetted part of the field
    edges = settings.vignmaskedges
    if is_wfm and edges > 0:
        log.info("Excluding strong edges (stronger than %.1f%%) from the vignetted area", edges * 100)
        filled, smooth_bad = _edge_exclusion(wdiv, smooth_bad, edges)
        result.white_div_global_excl_edges = filled
        result.white_div_global_excl_edges_dq = smooth_bad.copy()

    fit, fitbad = _smooth_vignetted(wdiv, smooth_bad, is_wfm, settings.vignsmooth, settings.vignxpar,
                                    settings.vignypar, warnings)
    if fit is None:
        result.vign_fit = np.empty(0, np.float32)
        result.white_cor = np.empty(0, np.float32)
        vign_fit = None
    else:
        if is_wfm:
            fitbad = white_bad | ~vign
        else:
            assert fitbad is not None
            fitbad = ~_trim_nfm_rows(fit, fitbad, vign)
        vign_fit = np.where(fitbad, np.float32(1), fit).astype(np.float32)
        white_cor, zero = _divide(wdiv, vign_fit)
        result.vign_fit, result.vign_fit_dq = vign_fit, fitbad
        result.white_cor, result.white_cor_dq = white_cor, smooth_bad | fitbad | zero

    log.info("Combining smooth field of view and vignetted region in %d planes", nz)
    for k in range(nz):
        mean1 = _mean_good(fitted[k])
        plane = fitted[k] * vign_fit if vign_fit is not None else fitted[k]
        mean2 = _mean_good(plane)
        fitted[k] = _scale(plane, 1.0 / mean2 if mean2 else np.inf)
        mean3 = _mean_good(fitted[k])
        if abs(mean3 - 1.0) > FLT_EPSILON:  # NaN passes silently, as in ESO
            _warn(warnings, f"normalization failed in plane {k + 1}: mean(plane) = "
                            f"{mean1:f} -> {mean2:f} -> {mean3:f}")
    return result
