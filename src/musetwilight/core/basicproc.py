"""Basic CCD processing of one IFU of raw MUSE exposures (ESO muse_basicproc semantics).

The chain, in ESO's order: bad-pixel table -> saturation flags -> overscan
statistics (:mod:`.overscan`, with ``ovscreject``) -> vertical overscan polynomial
(``overscan=vpoly``) -> trimming -> variance from the bias-subtracted signal ->
overscan offset (``overscan=offset``) or overscan level check -> MASTER_BIAS
subtraction -> adu to count -> MASTER_DARK (scaled by exposure time) -> division by
MASTER_FLAT.  Before a calibration is applied it is checked against the raw data
(:func:`setup_mismatches`, also run by the pre-flight checks).

Arithmetic follows ESO's float32/float64 mix so that results agree bit for bit:
images stay float32; gain, variance and the overscan polynomial are applied in
double precision and rounded to float32, while factors that CPL casts to float
(dark scaling, offset shifts) are applied in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from numba import njit

from ..errors import InputError, OverscanError
from ..instrument import SATURATION_LIMIT, Euro3D
from ..params import Settings
from .detector import Layout, data_window, gains, layout_from_header, trim
from .images import MuseImage, RawImage
from .overscan import OverscanStats, overscan_stats, vpoly_correct

log = logging.getLogger(__name__)

FLT_EPSILON = float(np.finfo(np.float32).eps)
FLT_MIN = np.float32(np.finfo(np.float32).tiny)

NSAT_KEY = "HIERARCH MUSE TMP NSATURATED"
OVSC_MEAN = "HIERARCH ESO DRS MUSE OVSC{} MEAN"
OVSC_STDEV = "HIERARCH ESO DRS MUSE OVSC{} STDEV"
OVSC_PNC = "HIERARCH ESO DRS MUSE OVSC{} POLY NCOEFF"
OVSC_PY = "HIERARCH ESO DRS MUSE OVSC{} POLY Y{}"
FLAT_FLUX_LAMP = "HIERARCH ESO DRS MUSE FLAT FLUX LAMP"


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
    bad = (data > np.float32(SATURATION_LIMIT)) | (data < np.float32(FLT_EPSILON))
    dq[bad] |= Euro3D.SATURATED
    return int(np.count_nonzero(bad))


# --------------------------------------------------------------------------
# per-pixel kernels (one pass, no temporaries; float64 factors, float32 storage)


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
# raw data against calibrations


@dataclass(frozen=True)
class SetupMismatch:
    """One difference between a raw IFU and a master calibration; ``fatal`` ones stop the IFU."""

    text: str
    fatal: bool


def setup_mismatches(raw: Mapping[str, Any], raw_name: str, master: Mapping[str, Any], master_name: str,
                     master_shape: tuple[int, int] | None, catg: str, is_illum: bool = False) -> list[SetupMismatch]:
    """ESO's raw-vs-calibration checks of one IFU (``muse_basicproc_check_setup``-like).

    Binning must match (every master), the read-out mode and the chip name/id must
    match the MASTER_BIAS (other masters: warnings), the instrument mode of a SKYFLAT
    must match the MASTER_FLAT (ILLUM is exempt), and the master must have the size of
    the trimmed raw CCD.  ``raw_name`` and ``master_name`` name the data in the messages.
    """
    where = f"{raw_name} vs {catg} {master_name}".rstrip()
    def get(header, key):
        return header.get(key, header.get("HIERARCH " + key))

    found: list[SetupMismatch] = []
    for key in ("ESO DET BINX", "ESO DET BINY"):
        if get(raw, key) != get(master, key):
            found.append(SetupMismatch(f"{where}: binning does not match ({key} {get(raw, key)} / "
                                       f"{get(master, key)})", True))
    read = (get(raw, "ESO DET READ CURID"), get(master, "ESO DET READ CURID"))
    chips = [(get(h, "ESO DET CHIP NAME"), get(h, "ESO DET CHIP ID")) for h in (raw, master)]
    if read[0] != read[1]:
        found.append(SetupMismatch(f"{where}: read-out mode does not match ({read[0]} / {read[1]})",
                                   catg == "MASTER_BIAS"))
    if None not in chips[0] + chips[1] and chips[0] != chips[1]:
        found.append(SetupMismatch(f"{where}: CHIP information does not match ({chips[0]} / {chips[1]})",
                                   catg == "MASTER_BIAS"))
    if catg == "MASTER_FLAT" and not is_illum:
        modes = (get(raw, "ESO INS MODE"), get(master, "ESO INS MODE"))
        if modes[0] != modes[1]:
            found.append(SetupMismatch(f"{where}: instrument modes do not match ({modes[0]} / {modes[1]})",
                                       True))
    if master_shape is not None:
        try:
            trimmed = layout_from_header(raw, raw_name).trimmed_shape
        except InputError as err:
            found.append(SetupMismatch(str(err), True))
        else:
            if tuple(master_shape) != trimmed:
                found.append(SetupMismatch(f"{where}: {catg} size {master_shape[1]}x{master_shape[0]} differs "
                                           f"from the trimmed raw size {trimmed[1]}x{trimmed[0]}", True))
    return sorted(found, key=lambda m: not m.fatal)


def _check_setup(raw: RawImage, calib: MuseImage, catg: str, is_illum: bool = False) -> None:
    """Raise the first fatal :func:`setup_mismatches` of a calibration, log the others."""
    raw_name = f"{raw.path}[CHAN{raw.ifu:02d}]"
    master_name = str(calib.path) if calib.path is not None else ""
    for mismatch in setup_mismatches(raw.header, raw_name, calib.header, master_name, calib.data.shape, catg,
                                     is_illum):
        if mismatch.fatal:
            raise InputError(mismatch.text)
        log.warning("%s", mismatch.text)


def _bias_parameters_match(bias_header: fits.Header, settings) -> bool:
    """Compare the MASTER_BIAS's recorded overscan parameters (PRO REC1 PARAMk) with ours."""
    params = {}
    for k in range(1, 100):
        name = bias_header.get(f"HIERARCH ESO PRO REC1 PARAM{k} NAME")
        if name is None:
            break
        params[name] = bias_header.get(f"HIERARCH ESO PRO REC1 PARAM{k} VALUE")
    try:
        return (str(params["overscan"]) == str(settings.overscan)
                and str(params["ovscreject"]) == str(settings.ovscreject)
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


def _raw_stage(raw: RawImage, settings: Settings, badpix: list[Any]) -> _Exposure:
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

    apply_badpix(dq, badpix)
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

    if settings.overscan.method == "vpoly":
        try:
            coeffs = vpoly_correct(data, dq, layout, settings.overscan, settings.ovscignore, settings.ovscsigma)
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
    header_only = RawImage(np.empty((0, 0), raw.data.dtype), raw.header, raw.path, raw.ifu)  # pixels released
    return _Exposure(header_only, source, layout, gain, header, tdata, tdq, stats, settings.overscan.method)


def _bias_stage(e: _Exposure, bias: MuseImage, settings: Settings) -> None:
    """Variance from the bias-subtracted signal, overscan offset or check, bias subtraction, adu->count."""
    _check_setup(e.raw, bias, "MASTER_BIAS")
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


Calibration = MuseImage | Callable[[], MuseImage]


@dataclass
class Calibrations:
    """The master calibrations of one IFU: images, or functions returning them.

    Functions are called when a step needs the calibration and the image is dropped
    after the step, so only one calibration is in memory at a time.
    """

    bias: Calibration
    flat: Calibration | None = None
    dark: Calibration | None = None
    badpix: list[Any] = field(default_factory=list)  # BADPIX_TABLEs (xpos, ypos, status columns)


@dataclass
class ProcessedExposures:
    """Basic-processed exposures of one IFU and what the QC needs from the flat."""

    images: list[MuseImage]
    flat_zero: np.ndarray | None  # pixels the flat leaves undivided (flat == 0); None where none


def _load(calib: Calibration, catg: str) -> MuseImage:
    """The calibration image, checked to be finite where it is used."""
    image = calib() if callable(calib) else calib
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


def process_exposures(raws: Sequence[RawImage | Callable[[], RawImage]], settings: Settings,
                      calibrations: Calibrations, illum: Sequence[bool] | None = None) -> ProcessedExposures:
    """Basic-process one IFU of several raw exposures step by step, as ESO's muse_basicproc_load.

    ``raws`` are images or functions reading them; a function is called when its exposure
    is processed, so that only one untrimmed raw CCD is in memory at a time.

    ``illum[k]`` marks ILLUM exposures (exempt from the MASTER_FLAT mode check).  The
    headers get ESO's records (DRS MUSE OVSCi ..., BUNIT, FLAT FLUX LAMP) and the
    temporary ``MUSE TMP NSATURATED`` count used by the QC.  Raises InputError
    (OverscanError) where ESO stops processing the IFU.
    """
    illum = list(illum) if illum is not None else [False] * len(raws)
    work = [_raw_stage(raw() if callable(raw) else raw, settings, calibrations.badpix) for raw in raws]
    image = _load(calibrations.bias, "MASTER_BIAS")
    if not _bias_parameters_match(image.header, settings):
        log.warning("overscan parameters differ between MASTER_BIAS and recipe parameters!")
    for e in work:
        _bias_stage(e, image, settings)
    del image
    if calibrations.dark is not None:
        image = _load(calibrations.dark, "MASTER_DARK")
        for e in work:
            _dark_stage(e, image)
        del image
    flat_zero = None
    if calibrations.flat is not None:
        image = _load(calibrations.flat, "MASTER_FLAT")
        for e, is_illum in zip(work, illum):
            _flat_stage(e, image, is_illum)
        zero = image.data == 0
        flat_zero = zero if zero.any() else None
        del image
    return ProcessedExposures([MuseImage(data=e.data, dq=e.dq, stat=e.stat, header=e.header)  # type: ignore[arg-type]
                               for e in work], flat_zero)
