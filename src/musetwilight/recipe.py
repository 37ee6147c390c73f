"""The muse_twilight data flow, top to bottom.

1. per IFU (in parallel): basic processing of every raw exposure, combination of the
   SKYFLATs, bad-pixel interpolation, pixel table, ILLUM slice correction, NaD notch
   flag (AO modes), wavelength cut;
2. flux scaling relative to the reference IFU and merge;
3. cube resampling and white-light image -> DATACUBE_SKYFLAT;
4. smoothing and vignetting model -> TWILIGHT_CUBE.
Both products are built in memory and written atomically at the end, so a failure
never leaves a partial product.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from astropy.io import fits

from . import basicproc, checks, combine, illumination, io, merge, pixtable, products, smooth
from .cube import grid_from_limits, white_light
from .frames import FrameSet, InputError, parse_sof, validate_frameset
from .params import ParameterError, Settings, make_settings
from .resample import resample_tables, resample_tables_banded

log = logging.getLogger("musetwilight.recipe")

NUM_IFUS = 24
SKIP_ENV = "MUSE_TWILIGHT_SKIP"
SCALES_ENV = "MUSE_TWILIGHT_SCALES"
PLANES_PER_BAND = 4  # wavelength planes resampled at a time in low-memory mode
LOW_MEMORY_PIXELS = 4_000_000  # CCDs larger than this (full MUSE: 16.8 M) use low-memory mode


@dataclass
class Inputs:
    """The input files of one run, resolved by tag."""

    frames: FrameSet
    skyflats: list[Path]
    illum: Path | None
    bias: Path
    flat: Path
    dark: Path | None
    trace: Path
    wavecal: Path
    geometry: Path
    badpix: list[Path]
    vignetting: Path | None

    @classmethod
    def from_frameset(cls, frames: FrameSet) -> "Inputs":
        validate_frameset(frames)
        return cls(frames, frames.paths("SKYFLAT"), frames.single("ILLUM"), frames.single("MASTER_BIAS"),
                   frames.single("MASTER_FLAT"), frames.single("MASTER_DARK"), frames.single("TRACE_TABLE"),
                   frames.single("WAVECAL_TABLE"), frames.single("GEOMETRY_TABLE"),
                   frames.paths("BADPIX_TABLE"), frames.single("VIGNETTING_MASK"))

    def used_raw(self) -> list[tuple[Path, str]]:
        return [(p, "SKYFLAT") for p in self.skyflats] + ([(self.illum, "ILLUM")] if self.illum else [])

    def used_calib(self, with_vignetting: bool, skipped_cube: bool = False) -> list[tuple[Path, str]]:
        """Calibrations a product lists; from an existing cube only the vignetting mask is used."""
        calib = [] if skipped_cube else [(f.path, f.tag) for f in self.frames.calib if f.tag != "VIGNETTING_MASK"]
        if with_vignetting and self.vignetting:
            calib.append((self.vignetting, "VIGNETTING_MASK"))
        return calib


@dataclass
class IfuResult:
    """What one IFU contributes: its cut pixel table and its combined image's header (with QC)."""

    ifu: int
    table: pixtable.PixTable
    header: fits.Header


@dataclass
class RunResult:
    """Products of one run (HDULists in memory, paths once written) and bookkeeping."""

    datacube_skyflat: fits.HDUList | None  # None when starting from an existing cube
    twilight_cube: fits.HDUList
    paths: dict[str, Path] = field(default_factory=dict)
    skipped_ifus: dict[int, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    illumination_fit: illumination.JointFit | None = None  # what --illum-model=joint fitted


def instrument_mode(path: Path) -> str:
    """ESO INS MODE of a raw exposure (primary header)."""
    mode = io.read_header(path, 0).get("ESO INS MODE")
    if not mode:
        raise InputError(f"{path}: raw exposure has no ESO INS MODE keyword")
    return str(mode).strip()


def _full_size_ccd(raw: Path) -> bool:
    """Whether the raw CCD (first extension's four quadrants) is large enough for low-memory mode."""
    header = io.read_header(raw, 1)
    pixels = 4 * int(header.get("ESO DET OUT1 NX", 0)) * int(header.get("ESO DET OUT1 NY", 0))
    return pixels > LOW_MEMORY_PIXELS


def _absent(reason: str) -> bool:
    """Whether a skip reason says the IFU is simply not part of the set (no calibrations)."""
    return reason.startswith("Calibrations could not be loaded") and reason.endswith("WAVECAL_TABLE")


def _ifu_calibrations(inputs: Inputs, ifu: int):
    """TRACE and WAVECAL tables of one IFU, or the names of the missing ones."""
    trace = io.read_ifu_table(inputs.trace, ifu, "TRACE_TABLE")
    wavecal = io.read_ifu_table(inputs.wavecal, ifu, "WAVECAL_TABLE")
    missing = [name for name, table in (("TRACE_TABLE", trace), ("WAVECAL_TABLE", wavecal)) if table is None]
    return trace, wavecal, missing


def _raw_has_ifu(inputs: Inputs, ifu: int) -> bool:
    return all(io.has_ifu_extension(path, ifu) for path, _ in inputs.used_raw())


def reduce_ifu(ifu: int, inputs: Inputs, settings: Settings, geometry, mode: str) -> IfuResult:
    """Basic processing, combination, pixel table, ILLUM and wavelength cut of one IFU."""
    try:
        trace, wavecal, missing = _ifu_calibrations(inputs, ifu)
    except InputError as err:
        raise SkipIfu(f"Calibrations could not be loaded for IFU {ifu:2d}: {err}") from None
    if missing:
        raise SkipIfu(f"Calibrations could not be loaded for IFU {ifu:2d}: {' '.join(missing)}")
    if not _raw_has_ifu(inputs, ifu):
        raise SkipIfu(f"Basic processing failed for IFU {ifu:2d}: no CHAN{ifu:02d} extension in the raw exposures")
    badpix = [t for t in (io.read_badpix_table(p, ifu) for p in inputs.badpix) if t is not None]
    raw_paths = [path for path, _ in inputs.used_raw()]
    images = basicproc.process_exposures(
        [io.read_raw_ifu(path, ifu) for path in raw_paths], settings,
        bias=lambda: io.read_muse_image(inputs.bias, ifu),
        flat=lambda: io.read_muse_image(inputs.flat, ifu),
        dark=(lambda: io.read_muse_image(inputs.dark, ifu)) if inputs.dark else None,
        badpix=badpix or None, illum=[tag == "ILLUM" for _, tag in inputs.used_raw()])
    exposures = images[:len(inputs.skyflats)]
    illum_image = images[len(inputs.skyflats)] if inputs.illum else None
    del images
    master = combine.combine_exposures(exposures, settings)
    qc = combine.exposure_qc(exposures, ifu, basicproc.flat_rejected(lambda: io.read_muse_image(inputs.flat, ifu)))
    qc.update(combine.master_qc(master, ifu))
    combine.add_qc(master.header, qc)
    del exposures
    master = combine.interpolate_bad_pixels(master, in_place=True)
    table = pixtable.build_pixtable(master, trace, wavecal, geometry, ifu, mode)
    if illum_image is not None:
        illum_table = pixtable.build_pixtable(illum_image, trace, wavecal, geometry, ifu, mode,
                                              flag_notch=False)
        table = merge.apply_illum(table, merge.illum_correction(illum_table), ifu)
    table = merge.restrict_wavelength(table, settings.lambdamin, settings.lambdamax)
    table.origin = None  # not needed after the ILLUM correction: 4 bytes a row less to hold
    return IfuResult(ifu, table, master.header)


class SkipIfu(RuntimeError):
    """This IFU cannot be reduced; the recipe goes on without it (as ESO does)."""


def reduce_ifu_or_skip(ifu: int, inputs: Inputs, settings: Settings, geometry, mode: str):
    """:func:`reduce_ifu` returning ``(ifu, result, None)`` or ``(ifu, None, reason)`` for a skipped IFU."""
    try:
        return ifu, reduce_ifu(ifu, inputs, settings, geometry, mode), None
    except SkipIfu as reason:
        return ifu, None, str(reason)
    except (InputError, ValueError, basicproc.OverscanError) as err:
        return ifu, None, f"Basic processing failed for IFU {ifu:2d}: {err}"


def reduce_all_ifus(inputs: Inputs, settings: Settings, mode: str, workers: int,
                    progress: Callable[[str], None] | None = None, mapper: Callable | None = None,
                    spill_dir: str | None = None) -> tuple[dict[int, IfuResult], dict[int, str]]:
    """Run :func:`reduce_ifu` for IFUs 1..24 and collect results and skip reasons.

    ``mapper(function, ifus)`` runs a picklable one-argument function over the IFU
    numbers and yields the results in order (default: a thread pool of ``workers``);
    the Dask path passes its own to spread IFUs over a cluster.  With ``spill_dir`` each
    IFU's table goes to disk as soon as it arrives (see merge.SpilledTable).
    """
    geometry = io.read_geometry_table(inputs.geometry)
    task = partial(reduce_ifu_or_skip, inputs=inputs, settings=settings, geometry=geometry, mode=mode)
    results: dict[int, IfuResult] = {}
    skipped: dict[int, str] = {}
    done = 0
    pool = None
    if mapper is None:
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        mapper = pool.map
    try:
        for ifu, result, reason in mapper(task, range(1, NUM_IFUS + 1)):
            done += 1
            if result is None:
                skipped[ifu] = reason
                log.warning("%s", reason)
            else:
                if spill_dir is not None:
                    result.table = merge.SpilledTable(result.table, spill_dir, f"ifu{ifu:02d}")
                results[ifu] = result
                if progress:
                    progress(f"IFU {ifu:2d} reduced ({done}/{NUM_IFUS})")
    finally:
        if pool is not None:
            pool.shutdown()
    return results, skipped


def reconstruct(results: dict[int, IfuResult], settings: Settings, mode: str,
                scales: list[float] | None, planes_per_band: int | None = None):
    """Flux-scale the IFUs' tables and resample them into the cube; return (cube, white, fluxes).

    The tables go into the pixel grid one IFU at a time and are released as they go,
    so the merged pixel table never exists in memory; with ``planes_per_band`` the cube
    is resampled a band of wavelength planes at a time (identical result, less memory).
    """
    tables = {ifu: r.table for ifu, r in results.items()}
    for r in results.values():
        r.table = None
    flux = merge.flux_scales(tables, nfm=mode.startswith("NFM"), scales=scales,
                             lambda_range=(settings.lambdamin, settings.lambdamax))
    order = sorted(flux.divisor)
    limits = [(t.xpos.min(), t.xpos.max(), t.ypos.min(), t.ypos.max(), t.lambda_.min(), t.lambda_.max())
              for t in (tables[ifu] for ifu in order)]
    lo, hi = np.min(limits, axis=0), np.max(limits, axis=0)
    grid = grid_from_limits(lo[0], hi[1], lo[2], hi[3], lo[4], hi[5], settings.dlambda)
    ordered = [tables.pop(ifu) for ifu in order]
    options = dict(method=settings.resample, crtype=settings.crtype, crsigma=settings.crsigma)
    divisors = [flux.divisor[ifu] for ifu in order]
    if planes_per_band:
        cube = resample_tables_banded(ordered, divisors, grid, planes_per_band, **options)
    else:
        cube = resample_tables(ordered, divisors, grid, **options)
    return cube, white_light(cube.data), flux


def primary_keywords(results: dict[int, IfuResult], flux: merge.MergedFlux) -> list[tuple[str, object, str | None]]:
    """QC TWILIGHT keywords of every IFU, INTFLUX, and the DRS MUSE FLAT FLUX values."""
    cards: list[tuple[str, object, str | None]] = []
    for ifu in sorted(results):
        header = results[ifu].header
        for card in header.cards:
            if card.keyword.startswith(f"ESO QC TWILIGHT{ifu} "):
                cards.append((card.keyword, card.value, card.comment or None))
        if ifu in flux.flux:
            cards.append((f"ESO QC TWILIGHT{ifu} INTFLUX", float(np.float32(flux.flux[ifu])),
                          "Flux integrated over all slices of this IFU"))
    reference = results[flux.reference_ifu].header
    lamp = reference.get("ESO DRS MUSE FLAT FLUX LAMP")
    if lamp is not None:
        cards.append(("ESO DRS MUSE FLAT FLUX LAMP", float(lamp), None))
    for ifu in sorted(flux.flux):
        cards.append((f"ESO DRS MUSE FLAT FLUX SKY{ifu}", float(flux.flux[ifu]), None))
    return cards


# ---- illumination model choice (--illum-model, outside ESO's 24 parameters) -----------------
ILLUM_MODEL_OPTION = "illum_model"


def illum_model_choice(settings: Settings | Mapping | None, explicit: str | None = None) -> str:
    """``--illum-model``: ``eso`` (default, ESO's TWILIGHT_CUBE) or ``joint`` (illumination.py).

    Read from ``explicit``, else from ``settings["illum_model"]`` where the mapping has it.
    """
    value = explicit
    if value is None and settings is not None:
        try:
            value = settings[ILLUM_MODEL_OPTION]
        except (KeyError, ParameterError):
            value = None
    value = "eso" if value is None else str(value).strip().lower()
    if value not in illumination.MODELS:
        raise ParameterError(f"parameter illum_model: {value!r} is not one of {', '.join(illumination.MODELS)}")
    return value


def _field_layout(inputs: Inputs, shape: tuple[int, int], data_header: fits.Header,
                  ifus: list[int] | None) -> illumination.FieldLayout | None:
    """Which IFU and slice stack covers each spaxel (GEOMETRY_TABLE), for the joint model."""
    try:
        geometry = io.read_geometry_table(inputs.geometry)
    except (InputError, OSError) as err:
        log.warning("joint illumination model without per-IFU terms: %s", err)
        return None
    ny, nx = shape
    return illumination.layout_from_geometry(
        geometry["SubField"], geometry["SliceSky"], geometry["x"], geometry["y"], geometry["width"],
        float(data_header["CRVAL1"]) + 1.0 - float(data_header.get("CRPIX1", 1.0)),
        float(data_header["CRVAL2"]) + 1.0 - float(data_header.get("CRPIX2", 1.0)), nx, ny, ifus)
# ---- end of the illumination model choice -----------------------------------------------------


def run(frames: FrameSet | str | os.PathLike, settings: Settings | Mapping | None = None,
        output_dir: str | os.PathLike | None = ".", *, skip_cube: str | os.PathLike | None = None,
        scales: list[float] | None = None, workers: int | None = None,
        environ: Mapping[str, str] | None = None,
        progress: Callable[[str], None] | None = None, mapper: Callable | None = None,
        low_memory: bool | None = None, illum_model: str | None = None) -> RunResult:
    """Reduce one twilight set; write DATACUBE_SKYFLAT.fits and TWILIGHT_CUBE.fits into ``output_dir``.

    ``skip_cube`` (or $MUSE_TWILIGHT_SKIP) starts from an existing DATACUBE_SKYFLAT;
    ``scales`` (or $MUSE_TWILIGHT_SCALES) are external per-IFU flux scales.  With
    ``output_dir=None`` nothing is written.  ``mapper`` distributes the per-IFU stage
    (see :func:`reduce_all_ifus`).  ``low_memory`` (default: for full-size CCDs) keeps the
    IFU tables on disk ($TMPDIR) and resamples in bands of wavelength planes; the
    products are the same.  ``illum_model`` (or ``settings["illum_model"]``) chooses the
    TWILIGHT_CUBE model: ``eso`` (default) or ``joint`` (:mod:`musetwilight.illumination`).
    """
    environ = os.environ if environ is None else environ

    def stage(message: str) -> None:
        (progress or log.info)(message)

    illum_model = illum_model_choice(settings, illum_model)
    if isinstance(settings, Mapping) and not isinstance(settings, Settings):
        settings = {k: v for k, v in settings.items() if k != ILLUM_MODEL_OPTION}
    settings = settings if isinstance(settings, Settings) else make_settings(settings or {})
    frameset = frames if isinstance(frames, FrameSet) else parse_sof(frames)
    inputs = Inputs.from_frameset(frameset)
    checks.preflight(inputs, settings)
    mode = instrument_mode(inputs.skyflats[0])
    skip_cube = skip_cube or environ.get(SKIP_ENV) or None
    if scales is None:
        scales = merge.external_scales(environ.get(SCALES_ENV))
    workers = workers or min(NUM_IFUS, os.cpu_count() or 1)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    skipped: dict[int, str] = {}

    if skip_cube:
        log.warning("Skipping active: loaded previously generated cube from \"%s\"", skip_cube)
        sky = smooth.read_datacube_skyflat(skip_cube)
        cube_data, white = sky.cube, sky.white if sky.white is not None else white_light(sky.cube)
        cube_primary, data_header = sky.primary_header, sky.data_header
        datacube = None
    else:
        if low_memory is None:
            low_memory = _full_size_ccd(inputs.skyflats[0])
        spill_dir = tempfile.mkdtemp(prefix="musetwilight-spill-") if low_memory else None
        try:
            stage("reducing the IFUs (basic processing, combination, pixel tables)")
            results, skipped = reduce_all_ifus(inputs, settings, mode, workers, progress, mapper, spill_dir)
            timings["ifus"] = time.perf_counter() - start
            if not results:
                real_failures_first = sorted(skipped, key=lambda i: (_absent(skipped[i]), i))
                raise merge.MergeError("no IFU could be reduced: "
                                       + "; ".join(skipped[i] for i in real_failures_first)[:2000])
            stage(f"resampling {len(results)} IFUs into the cube ({settings.resample}, crtype {settings.crtype})")
            cube, white, flux = reconstruct(results, settings, mode, scales,
                                            PLANES_PER_BAND if low_memory else None)
        finally:
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
        timings["resample"] = time.perf_counter() - start - timings["ifus"]
        reference_header = results[flux.reference_ifu].header
        primary = products.product_primary_header(reference_header, "DATACUBE_SKYFLAT", inputs.used_raw(),
                                                  inputs.used_calib(False), settings,
                                                  primary_keywords(results, flux))
        data_header = cube.grid.header_wcs()
        cube_data = cube.data
        failed = sorted(i for i in skipped if not _absent(skipped[i]))
        absent = sorted(i for i in skipped if _absent(skipped[i]))
        if failed:
            primary["HIERARCH MUSETWILIGHT SKIPPED"] = (",".join(map(str, failed)),
                                                        "IFUs whose reduction failed")
        if absent:
            primary["HIERARCH MUSETWILIGHT ABSENT"] = (",".join(map(str, absent)),
                                                       "IFUs without calibrations (not in the set)")
        datacube = products.datacube_skyflat_hdulist(primary, cube.data, cube.stat, white, data_header)
        cube_primary = primary

    vignetting = None
    if inputs.vignetting and not mode.startswith("NFM"):
        vignetting = io.read_vignetting_mask(inputs.vignetting).mask
    t0 = time.perf_counter()
    stage("smoothing the cube planes and modelling the vignetting")
    plane_header = cube_primary.copy()
    plane_header.update(products.wcs_cards(data_header, 3))
    fit = None
    if illum_model == "joint":
        present = sorted(results) if not skip_cube else sorted(
            int(k.rsplit("SKY", 1)[1]) for k in cube_primary if k.startswith("ESO DRS MUSE FLAT FLUX SKY")) or None
        layout = _field_layout(inputs, cube_data.shape[1:], data_header, present)
        result, fit = illumination.postprocess_joint(cube_data, plane_header, settings, vignetting, mode,
                                                     white=white, layout=layout)
    else:
        result = smooth.postprocess(cube_data, plane_header, settings, vignetting, mode, white=white)
    uses_vignetting = vignetting is not None  # ESO loads (and lists) the mask only in WFM
    twilight_primary = products.product_primary_header(
        cube_primary, "TWILIGHT_CUBE", inputs.used_raw(), inputs.used_calib(uses_vignetting, bool(skip_cube)), settings,
        [(c.keyword, c.value, c.comment) for c in cube_primary.cards
         if c.keyword.startswith("ESO DRS MUSE FLAT FLUX")
         or (skip_cube and c.keyword.startswith("ESO QC TWILIGHT"))])
    if fit is not None:
        twilight_primary["HIERARCH MUSETWILIGHT ILLUM MODEL"] = ("joint", "TWILIGHT_CUBE model (--illum-model)")
    twilight = smooth.twilight_cube_hdulist(result, twilight_primary, data_header,
                                            drop_qc=not skip_cube)  # ESO keeps QC in skip mode
    timings["smooth"] = time.perf_counter() - t0
    run_result = RunResult(datacube, twilight, skipped_ifus=skipped, timings=timings, illumination_fit=fit)
    if output_dir is not None:
        stage(f"writing the products into {output_dir}")
        written = {name: hdul for name, hdul in (("DATACUBE_SKYFLAT", datacube), ("TWILIGHT_CUBE", twilight))
                   if hdul is not None}
        run_result.paths = products.write_products(written, output_dir)
    timings["total"] = time.perf_counter() - start
    return run_result
