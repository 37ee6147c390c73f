"""The muse_twilight data flow, top to bottom.

:func:`run` reads the set of frames and checks it, reduces the IFUs (in parallel:
basic processing, combination, bad-pixel interpolation, pixel table, ILLUM, NaD
notch, wavelength cut), scales them by their integrated flux and resamples them into
DATACUBE_SKYFLAT, smooths that into TWILIGHT_CUBE, assembles both products' headers
and writes them.  Each step is one function below returning a small dataclass; the
output directory is checked (writable, enough free space) and claimed by this run
before any work, the products are built in memory and written atomically at the end,
so a failure never leaves a partial product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from astropy.io import fits

from . import memory, precompile
from .core import combine, fluxscale, illum, illumination, pixtable
from .core.basicproc import Calibrations, process_exposures
from .core.cube import CubeGrid, grid_from_limits, white_light
from .core.illumination import JointFit
from .core.pixtable import PixTable
from .core.resample import ResampleOptions, resample_tables
from .core.smooth import TwilightResult, postprocess
from .errors import InputError, MergeError, MuseTwilightError, OutputError, os_error_text
from .instrument import NUM_IFUS, ifu_ranges, is_nfm
from .io import formats, outdir, products, space
from .io.frames import FrameSet, Inputs, parse_sof
from .io.preflight import preflight
from .io.spill import SpilledTable, table_limits
from .measure import StageClock
from .memory import MemoryPlan
from .params import IllumModel, Settings, make_settings
from .threads import default_workers

log = logging.getLogger("musetwilight.recipe")

SKIP_ENV = "MUSE_TWILIGHT_SKIP"
SCALES_ENV = "MUSE_TWILIGHT_SCALES"
ILLUM_MODEL_ENV = "MUSETWILIGHT_ILLUM_MODEL"  # --illum-model for callers without it (EsoRex, python-cpl)
ROWS_PER_TILE = 8_000_000  # pixel-table rows resampled at a time in low-memory mode (about 2/3 of a full IFU)
LOW_MEMORY_PIXELS = 4_000_000  # CCDs larger than this (full MUSE: 16.8 M) use low-memory mode


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out (the recipe parameters say what it computes).

    ``skip_cube`` starts from an existing DATACUBE_SKYFLAT (ESO's MUSE_TWILIGHT_SKIP),
    ``scales`` are external per-IFU flux scales (MUSE_TWILIGHT_SCALES), ``workers`` the
    IFUs reduced at once (default: OMP_NUM_THREADS, else the CPU affinity, as ESO's OpenMP),
    ``low_memory`` keeps the IFU tables on disk and resamples a tile of cube rows at a time
    (None: for full-size CCDs), ``mapper(function, ifus)`` distributes the per-IFU stage
    (default: a thread pool), ``progress`` receives stage messages, ``scratch_dir`` is where
    the IFU tables go in low-memory mode ($MUSETWILIGHT_SCRATCH_DIR, else $TMPDIR),
    ``max_memory`` caps the memory the run may use, in bytes ($MUSETWILIGHT_MAX_MEMORY;
    the cgroup, ``ulimit -v`` and a Dask worker's limit are found by themselves): the run then
    reduces fewer IFUs at once, keeps the tables on disk, resamples smaller tiles, or refuses
    at once (:mod:`musetwilight.memory`).  ``illum_model`` chooses the TWILIGHT_CUBE model
    (:class:`~musetwilight.params.IllumModel`: ESO's, the default, or the joint one;
    $MUSETWILIGHT_ILLUM_MODEL when not given): not one of ESO's 24 parameters.
    """

    skip_cube: Path | None = None
    scales: tuple[float, ...] | None = None
    workers: int = 1
    low_memory: bool | None = None
    mapper: Callable | None = None
    progress: Callable[[str], None] | None = None
    scratch_dir: Path | None = None
    max_memory: int | None = None
    illum_model: IllumModel = IllumModel.ESO

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, *, skip_cube=None, scales=None,
                workers: int | None = None, scratch_dir=None, illum_model: str | IllumModel | None = None,
                **rest) -> RunOptions:
        """Options from the caller's values, the environment filling in what is not given."""
        environ = os.environ if environ is None else environ
        skip = skip_cube or environ.get(SKIP_ENV) or None
        if scales is None:
            scales = fluxscale.parse_scales(environ.get(SCALES_ENV))
        if illum_model is None:
            model = IllumModel.parse(environ.get(ILLUM_MODEL_ENV) or None, f"${ILLUM_MODEL_ENV}")
        else:
            model = IllumModel.parse(illum_model, "illum_model")
        return cls(Path(skip) if skip else None, tuple(scales) if scales is not None else None,
                   workers or default_workers(environ), scratch_dir=space.scratch_root(scratch_dir, environ),
                   illum_model=model, **rest)

    def stage(self, message: str) -> None:
        (self.progress or log.info)(message)


@dataclass
class RunResult:
    """Products of one run (HDULists in memory, paths once written) and bookkeeping."""

    datacube_skyflat: fits.HDUList | None  # None when starting from an existing cube
    twilight_cube: fits.HDUList
    paths: dict[str, Path] = field(default_factory=dict)
    memory: MemoryPlan | None = None  # how the run fitted into its memory (None when starting from a cube)
    skipped_ifus: dict[int, IfuSkip] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage, total, peak memory
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # wall, CPU and peak memory per stage
    illumination_fit: JointFit | None = None  # what the joint model fitted (None: ESO's model)

    def ifus(self, kind: Literal["absent", "failed"]) -> list[int]:
        """The skipped IFUs of one kind, sorted."""
        return sorted(ifu for ifu, skip in self.skipped_ifus.items() if skip.kind == kind)

    def hdulists(self) -> dict[str, fits.HDUList]:
        """The products made, by tag."""
        made = ((products.DATACUBE_SKYFLAT.tag, self.datacube_skyflat),
                (products.TWILIGHT_CUBE.tag, self.twilight_cube))
        return {tag: hdul for tag, hdul in made if hdul is not None}


def run(frames: FrameSet | str | os.PathLike, settings: Settings | Mapping | None = None,
        output_dir: str | os.PathLike | None = ".", *, environ: Mapping[str, str] | None = None,
        **options) -> RunResult:
    """Reduce one twilight set; write DATACUBE_SKYFLAT.fits and TWILIGHT_CUBE.fits into ``output_dir``.

    ``frames`` is an SOF file or a FrameSet, ``settings`` the recipe parameters (a
    Settings or a mapping of names to values), ``options`` those of
    :class:`RunOptions` (``skip_cube``, ``scales``, ``workers``, ``low_memory``,
    ``mapper``, ``progress``, ``scratch_dir``, ``max_memory``, ``illum_model``).  With
    ``output_dir=None`` nothing is written.

    Examples
    --------
    >>> from musetwilight import recipe                                  # doctest: +SKIP
    >>> result = recipe.run("twilight.sof", {"resample": "nearest"}, "products")
    >>> result.paths["TWILIGHT_CUBE"]
    PosixPath('products/TWILIGHT_CUBE.fits')
    """
    settings = settings if isinstance(settings, Settings) else make_settings(settings or {})
    opts = RunOptions.resolve(environ, **options)
    clock, start = StageClock(), time.perf_counter()
    with clock.stage("inputs"):
        inputs = read_inputs(frames, settings)
        mode = instrument_mode(inputs.skyflats[0])
        present = present_ifus(inputs)
        plan = None if opts.skip_cube else memory_plan(inputs, settings, present, opts, environ)
    log.debug("parameters: %s", " ".join(f"--{k}={v}" for k, v in settings.texts().items()))
    log.debug("%d raw exposures, mode %s, IFUs %s; %d workers, scratch under %s", len(inputs.used_raw()), mode,
              ifu_ranges(present), opts.workers, opts.scratch_dir)
    with contextlib.ExitStack() as stack:
        lock = None
        if output_dir is not None:  # checked and held before any work
            lock = stack.enter_context(outdir.claim(output_dir))
            space.check_free_space(lock.directory, space.product_bytes(inputs, settings, present), "the products")
        if opts.skip_cube:
            skyflat, reductions = load_skyflat(opts.skip_cube), IfuReductions()
        else:
            assert plan is not None
            compiling = precompile.start(settings, mode, bool(inputs.vignetting) and not is_nfm(mode))
            stack.callback(compiling.stop)
            with scratch_space(plan.low_memory, inputs, settings, present, opts.scratch_dir) as spill_dir:
                with clock.stage("ifus"):
                    reductions = reduce_ifus(inputs, settings, mode, opts, spill_dir, present, plan.workers)
                with clock.stage("resample"):
                    compiling.wait()
                    skyflat = build_skyflat(reductions, inputs, settings, mode, opts, plan.rows_per_tile)
        with clock.stage("smooth"):
            twilight = smooth_skyflat(skyflat, inputs, settings, mode, opts)
            result = RunResult(skyflat.hdulist, twilight_cube(skyflat, twilight, inputs, settings, mode),
                               skipped_ifus=reductions.skipped, memory=plan, illumination_fit=twilight.fit)
        if lock is not None:
            opts.stage(f"writing the products into {output_dir}")
            with clock.stage("write"):
                result.paths = products.write_products(result.hdulists(), lock.directory, lock=lock)
    result.stages = clock.as_dict()
    result.timings = {**clock.wall, "total": time.perf_counter() - start,
                      "peak_rss_mb": max(clock.peak_rss_mb.values())}
    return result


# --------------------------------------------------------------------------- inputs


def read_inputs(frames: FrameSet | str | os.PathLike, settings: Settings) -> Inputs:
    """The run's inputs by tag, validated (tag counts, files, pre-flight checks)."""
    frameset = frames if isinstance(frames, FrameSet) else parse_sof(frames)
    inputs = Inputs.from_frameset(frameset)
    preflight(inputs, settings)
    return inputs


def instrument_mode(path: Path) -> str:
    """ESO INS MODE of a raw exposure (primary header)."""
    mode = formats.read_header(path, 0).get("ESO INS MODE")
    if not mode:
        raise InputError(f"{path}: raw exposure has no ESO INS MODE keyword")
    return str(mode).strip()


def present_ifus(inputs: Inputs) -> list[int]:
    """The IFUs of the set: those with a TRACE_TABLE or a WAVECAL_TABLE (ESO's frame matching);
    the others are absent (not in the set) and are not reduced."""
    trace, wavecal = formats.scan_fits(inputs.trace), formats.scan_fits(inputs.wavecal)
    return [ifu for ifu in range(1, NUM_IFUS + 1)
            if formats.matching_hdu(trace, ifu) is not None or formats.matching_hdu(wavecal, ifu) is not None]


def uses_low_memory(low_memory: bool | None, inputs: Inputs) -> bool:
    """Low-memory mode as asked, or (None) for CCDs larger than LOW_MEMORY_PIXELS."""
    if low_memory is not None:
        return low_memory
    header = formats.read_header(inputs.skyflats[0], 1)
    return 4 * int(header.get("ESO DET OUT1 NX", 0)) * int(header.get("ESO DET OUT1 NY", 0)) > LOW_MEMORY_PIXELS


def memory_plan(inputs: Inputs, settings: Settings, ifus: list[int], options: RunOptions,
                environ: Mapping[str, str] | None = None) -> MemoryPlan:
    """How this run fits into the memory it may use (MemoryLimitError when it cannot): the
    workers asked (one for an external ``mapper``: the IFUs are reduced elsewhere), the path
    asked (None: low-memory for full-size CCDs, or when only it fits), tiles of ROWS_PER_TILE."""
    budget = memory.memory_budget(options.max_memory, os.environ if environ is None else environ)
    needs = memory.run_needs(inputs, settings, ifus, memory.process_memory().get("rss", 0))
    workers = options.workers if options.mapper is None else 1
    plan = memory.plan_memory(needs, budget, workers, uses_low_memory(options.low_memory, inputs), ROWS_PER_TILE,
                              flexible_path=options.low_memory is None)
    if options.mapper is not None:
        plan = dataclasses.replace(plan, workers=options.workers)
    reduced = plan.workers < workers or (plan.rows_per_tile or ROWS_PER_TILE) < ROWS_PER_TILE
    (log.info if reduced else log.debug)("memory: %s", plan.describe())
    return plan


@contextlib.contextmanager
def scratch_space(low_memory: bool | None, inputs: Inputs, settings: Settings, ifus: list[int],
                  root: Path | None = None) -> Iterator[str | None]:
    """A scratch directory under ``root`` (default $TMPDIR) for the IFU tables in low-memory mode
    (None otherwise), removed after.

    Its free space is checked first against the tables' estimated size (SpaceError naming
    the directory, the space needed and free); a write that runs out of space anyway is a
    SpaceError too, and the scratch files are removed either way.
    """
    if not uses_low_memory(low_memory, inputs):
        yield None
        return
    root = root or Path(tempfile.gettempdir())
    space.check_free_space(root, space.scratch_bytes(inputs, settings, ifus), "the IFU tables (scratch space)")
    try:
        directory = tempfile.mkdtemp(prefix="musetwilight-spill-", dir=root)
    except OSError as err:
        raise OutputError(f"{root}: cannot create a scratch directory there ({os_error_text(err)})") from None
    try:
        yield directory
    except OSError as err:
        if space.is_out_of_space(err) and not isinstance(err, MuseTwilightError):
            raise space.out_of_space_error(root, "the IFU tables (scratch space)", err) from err
        raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- per IFU


@dataclass(frozen=True)
class IfuSkip:
    """Why an IFU is not in the cube: ``absent`` from the set (no TRACE or WAVECAL table for
    it) or its reduction ``failed`` (a data problem, named in ``reason``)."""

    kind: Literal["absent", "failed"]
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class IfuResult:
    """What one IFU contributes: its cut pixel table and its combined image's header (with QC)."""

    ifu: int
    table: PixTable | SpilledTable | None
    header: fits.Header


@dataclass
class IfuReductions:
    """The per-IFU stage's outcome: the reduced IFUs and the skipped ones."""

    results: dict[int, IfuResult] = field(default_factory=dict)
    skipped: dict[int, IfuSkip] = field(default_factory=dict)


def reduce_ifu(ifu: int, inputs: Inputs, settings: Settings, geometry, mode: str) -> IfuResult | IfuSkip:
    """Basic processing, combination, pixel table, ILLUM and wavelength cut of one IFU.

    Data problems (:class:`~musetwilight.errors.MuseTwilightError`) skip the IFU, as ESO
    does; any other exception is a bug and propagates.
    """
    try:
        trace = formats.read_ifu_table(inputs.trace, ifu, "TRACE_TABLE")
        wavecal = formats.read_ifu_table(inputs.wavecal, ifu, "WAVECAL_TABLE")
    except InputError as err:
        return IfuSkip("failed", f"Calibrations could not be loaded for IFU {ifu:2d}: {err}")
    missing = [name for name, table in (("TRACE_TABLE", trace), ("WAVECAL_TABLE", wavecal)) if table is None]
    if missing:
        return IfuSkip("absent" if len(missing) == 2 else "failed",
                       f"Calibrations could not be loaded for IFU {ifu:2d}: {' '.join(missing)}")
    try:
        return _reduce_ifu(ifu, inputs, settings, geometry, mode, trace, wavecal)
    except MuseTwilightError as err:
        return IfuSkip("failed", f"Basic processing failed for IFU {ifu:2d}: {err}")


def _reduce_ifu(ifu: int, inputs: Inputs, settings: Settings, geometry, mode: str, trace, wavecal) -> IfuResult:
    if not all(formats.has_ifu_extension(path, ifu) for path, _ in inputs.used_raw()):
        raise InputError(f"no CHAN{ifu:02d} extension in the raw exposures")
    badpix = [t for t in (formats.read_badpix_table(p, ifu) for p in inputs.badpix) if t is not None]
    raw = inputs.used_raw()
    calibrations = Calibrations(bias=partial(formats.read_muse_image, inputs.bias, ifu),
                                flat=partial(formats.read_muse_image, inputs.flat, ifu),
                                dark=partial(formats.read_muse_image, inputs.dark, ifu) if inputs.dark else None,
                                badpix=badpix)
    processed = process_exposures([partial(formats.read_raw_ifu, path, ifu) for path, _ in raw], settings, calibrations,
                                  illum=[tag == "ILLUM" for _, tag in raw])
    exposures = processed.images[:len(inputs.skyflats)]
    illum_image = processed.images[len(inputs.skyflats)] if inputs.illum else None
    master = combine.combine_exposures(exposures, settings)
    qc = combine.exposure_qc(exposures, ifu, processed.flat_zero)
    qc.update(combine.master_qc(master, ifu))
    combine.add_qc(master.header, qc)
    del exposures, processed
    master = combine.interpolate_bad_pixels(master, in_place=True)
    # the table is built cut to lambdamin..lambdamax at once (ESO cuts after the ILLUM correction,
    # a per-row factor: the same rows and values)
    table = pixtable.build_pixtable(master, trace, wavecal, geometry, ifu, mode,
                                    lambda_range=(settings.lambdamin, settings.lambdamax),
                                    with_origin=illum_image is not None)
    if illum_image is not None:
        illum_table = pixtable.build_pixtable(illum_image, trace, wavecal, geometry, ifu, mode, flag_notch=False,
                                              lambda_range=illum.ILLUM_LAMBDA_RANGE)
        table = illum.apply_illum(table, illum.illum_correction(illum_table), ifu)
        table.origin = None  # not needed after the ILLUM correction: 4 bytes a row less to hold
    return IfuResult(ifu, table, master.header)


def _reduce_or_skip(ifu: int, inputs: Inputs, settings: Settings, geometry, mode: str):
    """:func:`reduce_ifu` as a picklable one-argument task: ``(ifu, result or skip)``."""
    return ifu, reduce_ifu(ifu, inputs, settings, geometry, mode)


def reduce_ifus(inputs: Inputs, settings: Settings, mode: str, options: RunOptions,
                spill_dir: str | None = None, ifus: list[int] | None = None,
                workers: int | None = None) -> IfuReductions:
    """Run :func:`reduce_ifu` for the IFUs of the set (``ifus``, default all present:
    :func:`present_ifus`) with ``options.mapper`` or a thread pool of ``options.workers``;
    the other IFUs are absent, reported in one line.  With ``spill_dir`` each table goes
    to disk as it arrives."""
    ifus = present_ifus(inputs) if ifus is None else ifus
    reductions = IfuReductions()
    absent = [ifu for ifu in range(1, NUM_IFUS + 1) if ifu not in ifus]
    for ifu in absent:
        reductions.skipped[ifu] = IfuSkip("absent", f"IFU {ifu:2d} is not in this set (no TRACE_TABLE or "
                                                    "WAVECAL_TABLE for it)")
    if absent:
        log.info("IFU%s %s not in this set", "s" if len(absent) > 1 else "", ifu_ranges(absent))
    options.stage(f"reducing {len(ifus)} IFU{'s' if len(ifus) != 1 else ''} (basic processing, combination, "
                  "pixel tables)")
    geometry = formats.read_geometry_table(inputs.geometry)
    task = partial(_reduce_or_skip, inputs=inputs, settings=settings, geometry=geometry, mode=mode)
    with contextlib.ExitStack() as stack:
        mapper = options.mapper
        if mapper is None:
            mapper = stack.enter_context(ThreadPoolExecutor(max_workers=max(1, workers or options.workers))).map
        for done, (ifu, outcome) in enumerate(mapper(task, ifus), start=1):
            if isinstance(outcome, IfuSkip):
                reductions.skipped[ifu] = outcome
                log.warning("%s", outcome.reason)
                options.stage(f"IFU {ifu:2d} failed ({done}/{len(ifus)})")
                continue
            log.debug("IFU %d: pixel table of %d rows", ifu, len(outcome.table.xpos))
            if spill_dir is not None:
                outcome.table = SpilledTable(outcome.table, spill_dir, f"ifu{ifu:02d}")
            reductions.results[ifu] = outcome
            options.stage(f"IFU {ifu:2d} reduced ({done}/{len(ifus)})")
    if not reductions.results:
        failed = [skip.reason for ifu, skip in sorted(reductions.skipped.items()) if skip.kind == "failed"]
        not_in_set = f" (IFUs {ifu_ranges(absent)} are not in this set)" if absent else ""
        raise MergeError(f"no IFU could be reduced: {'; '.join(failed)[:2000]}{not_in_set}")
    return reductions


# --------------------------------------------------------------------------- DATACUBE_SKYFLAT


@dataclass
class Skyflat:
    """DATACUBE_SKYFLAT: the cube with its white-light image and headers (and its HDUList
    when this run made it)."""

    cube: np.ndarray
    white: np.ndarray | None
    primary: fits.Header
    data_header: fits.Header
    hdulist: fits.HDUList | None = None


def load_skyflat(path: Path) -> Skyflat:
    """An existing DATACUBE_SKYFLAT (skip mode); without a white extension the smoothing
    collapses the cube itself, as ESO does."""
    log.warning("Skipping active: loaded previously generated cube from \"%s\"", path)
    sky = formats.read_datacube_skyflat(path)
    return Skyflat(sky.cube, sky.white, sky.primary_header, sky.data_header)


def build_skyflat(reductions: IfuReductions, inputs: Inputs, settings: Settings, mode: str,
                  options: RunOptions, rows_per_tile: int | None) -> Skyflat:
    """Flux-scale the IFUs' tables and resample them into DATACUBE_SKYFLAT.

    The merged pixel table never exists in memory; ``rows_per_tile`` resamples a tile of cube rows
    at a time from the tables that reach it (identical result, a bounded working set).
    """
    resample = ResampleOptions.from_settings(settings)
    options.stage(f"resampling {len(reductions.results)} IFUs into the cube ({resample.method}, "
                  f"crtype {resample.crtype})")
    tables = {ifu: r.table for ifu, r in reductions.results.items()}
    for r in reductions.results.values():
        r.table = None
    flux = fluxscale.flux_scales(tables, nfm=is_nfm(mode), scales=options.scales,
                                 lambda_range=(settings.lambdamin, settings.lambdamax))
    order = sorted(flux.divisor)
    grid = _cube_grid([tables[ifu] for ifu in order], settings.dlambda)
    ordered = [tables.pop(ifu) for ifu in order]
    divisors = [flux.divisor[ifu] for ifu in order]
    cube = resample_tables(ordered, divisors, grid, resample, rows_per_tile,
                           threads=options.workers)
    white = white_light(cube.data)
    headers = {ifu: r.header for ifu, r in reductions.results.items()}
    failed = sorted(i for i, s in reductions.skipped.items() if s.kind == "failed")
    absent = sorted(i for i, s in reductions.skipped.items() if s.kind == "absent")
    primary = products.skyflat_primary(headers, flux, inputs, settings, failed, absent)
    data_header = cube.grid.header_wcs()
    data_header["BUNIT"] = "count"  # the DATA extension's unit, which TWILIGHT_CUBE's DATA inherits (as ESO)
    hdulist = products.datacube_skyflat_hdulist(primary, cube.data, cube.stat, white, data_header)
    return Skyflat(cube.data, white, primary, data_header, hdulist)


def _cube_grid(tables: list, dlambda: float) -> CubeGrid:
    """The cube grid spanning all tables (ESO: the limits of the merged table)."""
    limits = [table_limits(table) for table in tables]
    lo, hi = np.min(limits, axis=0), np.max(limits, axis=0)
    return grid_from_limits(lo[0], hi[1], lo[2], hi[3], lo[4], hi[5], dlambda)


# --------------------------------------------------------------------------- TWILIGHT_CUBE


@dataclass
class SmoothModel:
    """The smooth illumination model of the cube: TWILIGHT_CUBE's planes and diagnostics, which
    model made them and, for the joint one, what it fitted."""

    result: TwilightResult
    model: IllumModel = IllumModel.ESO
    fit: JointFit | None = None


def smooth_skyflat(skyflat: Skyflat, inputs: Inputs, settings: Settings, mode: str,
                   options: RunOptions) -> SmoothModel:
    """The smooth illumination model of the cube (vignetting mask in WFM only, as ESO):
    ESO's (:func:`~musetwilight.core.smooth.postprocess`) or, with ``options.illum_model``
    joint, :func:`~musetwilight.core.illumination.postprocess_joint` (the IFU and slice-stack
    layout from GEOMETRY_TABLE)."""
    vignetting = None
    if inputs.vignetting and not is_nfm(mode):
        vignetting = formats.read_vignetting_mask(inputs.vignetting).mask
    header = skyflat.data_header
    wavelengths = None
    if "CRVAL3" in header and "CD3_3" in header:
        offsets = np.arange(skyflat.cube.shape[0]) + 1.0 - float(header.get("CRPIX3", 1.0))
        wavelengths = float(header["CRVAL3"]) + offsets * float(header["CD3_3"])
    if options.illum_model is IllumModel.JOINT:
        options.stage("fitting the joint illumination and vignetting model to the cube")
        crval = _field_origin(header)
        ny, nx = skyflat.cube.shape[1:]
        geometry = formats.read_geometry_table(inputs.geometry)
        layout = illumination.layout_from_geometry(
            geometry["SubField"], geometry["SliceSky"], geometry["x"], geometry["y"], geometry["width"],
            crval[0], crval[1], nx, ny, skyflat_ifus(skyflat.primary))
        result, fit = illumination.postprocess_joint(skyflat.cube, settings, mode, white=skyflat.white,
                                                     vignetting_mask=vignetting, wavelengths=wavelengths,
                                                     crval=crval, layout=layout)
        return SmoothModel(result, IllumModel.JOINT, fit)
    options.stage("smoothing the cube planes and modelling the vignetting")
    return SmoothModel(postprocess(skyflat.cube, settings, mode, white=skyflat.white, vignetting_mask=vignetting,
                                   wavelengths=wavelengths))


def _field_origin(header: fits.Header) -> tuple[float, float]:
    """Field coordinates (GEOMETRY_TABLE's x, y) of the cube's first spaxel."""
    return (float(header.get("CRVAL1", 1.0)) + 1.0 - float(header.get("CRPIX1", 1.0)),
            float(header.get("CRVAL2", 1.0)) + 1.0 - float(header.get("CRPIX2", 1.0)))


def skyflat_ifus(primary: fits.Header) -> list[int] | None:
    """The IFUs in a DATACUBE_SKYFLAT (those with an ESO DRS MUSE FLAT FLUX SKYn keyword), or
    None when it names none."""
    prefix = "ESO DRS MUSE FLAT FLUX SKY"
    ifus = sorted(int(key[len(prefix):]) for key in primary if key.startswith(prefix) and key[len(prefix):].isdigit())
    return ifus or None


def twilight_cube(skyflat: Skyflat, smoothed: SmoothModel, inputs: Inputs, settings: Settings,
                  mode: str) -> fits.HDUList:
    """TWILIGHT_CUBE's HDUList: the model, with the provenance of this run (and, made by the
    joint model, MUSETWILIGHT ILLUM MODEL = 'joint')."""
    from_existing_cube = skyflat.hdulist is None
    primary = products.twilight_primary(skyflat.primary, inputs, settings,
                                        with_vignetting=bool(inputs.vignetting) and not is_nfm(mode),
                                        from_existing_cube=from_existing_cube,
                                        illum_model=None if smoothed.model is IllumModel.ESO else smoothed.model)
    return products.twilight_cube_hdulist(smoothed.result, primary, skyflat.data_header,
                                          drop_qc=not from_existing_cube)
