"""The recipe's products, declared once: tags, files, extensions, headers, writing.

Products carry the keywords that ESO's Data Flow System writes (``ESO PRO CATG``,
``ESO PRO REC1 RAWi/CALi/PARAMi ...``, ``PIPEFILE``, ``DATAMD5``) so that tools which
read ESO products (python-cpl's ``cpl.dfs.ProcessingInfo``, archive ingestion) read
ours too.  Both products of a run are written all-or-nothing: each to a temporary
file first, then all renamed; :class:`WriteOptions` carries EsoRex's product options
(checksums, DATAMD5, name prefix, read-only, products SOF).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

from .. import __version__
from ..core.fluxscale import MergedFlux
from ..core.smooth import TwilightResult
from ..headers import fits_text, hierarch, is_wcs_key, product_order, set_card, set_hdu_class
from ..params import PARAMETERS, RECIPE
from . import outdir, space
from .frames import Inputs

PIPE_ID = f"musetwilight/{__version__}"
DRS_ID = f"musetwilight-{__version__}"
PRO_DID = "PRO-1.16"
RECORD_NAME = ".musetwilight-products.json"  # the record of a complete set, written after the products


@dataclass(frozen=True)
class Product:
    """One product of the recipe: its tag (ESO PRO CATG), description and extensions in
    ESO's order (the optional ones of TWILIGHT_CUBE included)."""

    tag: str
    description: str
    extensions: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return f"{self.tag}.fits"


DATACUBE_SKYFLAT = Product("DATACUBE_SKYFLAT", "Cube of combined twilight skyflat exposures",
                           ("DATA", "STAT", "white"))
TWILIGHT_CUBE = Product("TWILIGHT_CUBE", "Smoothed cube of twilight sky",
                        ("DATA", "white_global_fit", "white_div_global", "white_div_global_DQ",
                         "white_div_global_excl_edges", "white_div_global_excl_edges_DQ",
                         "vign_fit", "vign_fit_DQ", "white_cor", "white_cor_DQ"))
PRODUCTS = (DATACUBE_SKYFLAT, TWILIGHT_CUBE)
PRODUCT_TAGS = tuple(p.tag for p in PRODUCTS)

# keywords never inherited into a product's primary header (CPL's DFS rules, the
# per-image bookkeeping of the intermediate stages, and ESO's WCS keywords)
_DROPPED = re.compile(
    r"^(ESO DPR |ESO PRO |ARCFILE$|ORIGFILE$|CHECKSUM$|DATASUM$|HDRVER$|EXTNAME$|BUNIT$|DATE$|"
    r"ESO DRS MUSE OVSC|ESO DRS MUSE PIXTABLE|ESO DRS MUSE TMP|MUSE TMP|DATAMD5$|PIPEFILE$|"
    r"BSCALE$|BZERO$|INHERIT$)"
)
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "XTENSION",
               "PCOUNT", "GCOUNT", "COMMENT", "HISTORY", ""}
QC_TWILIGHT_PREFIX = "ESO QC TWILIGHT"
ILLUM_MODEL_KEY = "MUSETWILIGHT ILLUM MODEL"  # TWILIGHT_CUBE made by a model other than ESO's (the joint one)


# --------------------------------------------------------------------------- primary headers

def format_parameter(value) -> str:
    """A parameter value as CPL writes it into PRO REC1 PARAMi VALUE (%g for doubles)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def inherited_header(source: fits.Header) -> fits.Header:
    """The keywords of ``source`` that a product's primary header inherits."""
    header = fits.Header()
    for card in source.cards:
        key = card.keyword
        if key in _STRUCTURAL or _DROPPED.match(key) or is_wcs_key(key):
            continue
        header.append((hierarch(key), card.value, card.comment))
    return header


def provenance_cards(catg: str, raw: Sequence[tuple[Path, str]], calib: Sequence[tuple[Path, str]],
                     settings: Mapping[str, object]) -> list[tuple[str, object, str]]:
    """ESO PRO keywords: category, recipe and pipeline ids, inputs and parameters.

    Raw frames are listed in the order used, calibrations sorted by category and name
    (as ESO's products show).
    """
    cards: list[tuple[str, object, str]] = [
        ("ESO PRO DID", PRO_DID, "Data dictionary for PRO"),
        ("ESO PRO CATG", catg, "Category of pipeline product frame"),
        ("ESO PRO TYPE", "REDUCED", "Product type"),
        ("ESO PRO TECH", "IFU", "Observation technique"),
        ("ESO PRO SCIENCE", False, "Scientific product if T"),
        ("ESO PRO REC1 ID", RECIPE, "Pipeline recipe (unique) identifier"),
        ("ESO PRO REC1 DRS ID", DRS_ID, "Data Reduction System identifier"),
        ("ESO PRO REC1 PIPE ID", PIPE_ID, "Pipeline (unique) identifier"),
    ]
    for index, (path, tag) in enumerate(raw, start=1):
        cards.append((f"ESO PRO REC1 RAW{index} NAME", fits_text(Path(path).name), "File name of raw frame"))
        cards.append((f"ESO PRO REC1 RAW{index} CATG", tag, "Category of raw frame"))
    cards.append(("ESO PRO DATANCOM", len(raw), "Number of combined frames"))
    for index, (path, tag) in enumerate(sorted(calib, key=lambda f: (f[1], Path(f[0]).name)), start=1):
        cards.append((f"ESO PRO REC1 CAL{index} NAME", fits_text(Path(path).name), "File name of calibration frame"))
        cards.append((f"ESO PRO REC1 CAL{index} CATG", tag, "Category of calibration frame"))
        md5 = _datamd5_of(path)
        if md5:
            cards.append((f"ESO PRO REC1 CAL{index} DATAMD5", md5, "MD5 signature of calib frame"))
    for index, parameter in enumerate(PARAMETERS, start=1):
        cards.append((f"ESO PRO REC1 PARAM{index} NAME", parameter.name, parameter.help[:60]))
        cards.append((f"ESO PRO REC1 PARAM{index} VALUE", format_parameter(settings[parameter.name]),
                      f"Default: {format_parameter(parameter.default)}"))
    return cards


def _datamd5_of(path: Path | str) -> str | None:
    """DATAMD5 of a calibration's primary header (None without one)."""
    try:
        value = fits.getval(path, "DATAMD5", 0)
    except (OSError, KeyError):
        return None
    return str(value) if value else None


def product_primary_header(source: fits.Header, catg: str, raw, calib, settings,
                           extra: Iterable[tuple[str, object, str | None]] = ()) -> fits.Header:
    """Primary header of a product: inherited keywords, provenance, then ``extra`` (QC, DRS)."""
    header = fits.Header()
    header["DATE"] = (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                      "file creation date (YYYY-MM-DDThh:mm:ss UT)")
    inherited = inherited_header(source)
    core = [k for k in ("TELESCOP", "INSTRUME", "ORIGIN", "DATE-OBS", "MJD-OBS", "EXPTIME", "RA",
                        "DEC", "OBJECT") if k in inherited]
    for key in core:
        header[key] = (inherited[key], inherited.comments[key])
    header["DATAMD5"] = ("", "MD5 checksum")
    header["PIPEFILE"] = ("", "Filename of data product")
    for card in inherited.cards:
        if card.keyword not in core and not card.keyword.startswith((QC_TWILIGHT_PREFIX, "ESO DRS MUSE FLAT")):
            header.append(card)
    for key, value, comment in provenance_cards(catg, raw, calib, settings):
        header.append((hierarch(key), value, comment))
    for name, value, note in extra:
        header.append((hierarch(name), value, note))
    return product_order(header)


def wcs_cards(header: fits.Header, naxis: int) -> fits.Header:
    """The linear WCS keywords of ``header`` for the first ``naxis`` axes."""
    out = fits.Header()
    for key in ("CRPIX1", "CRVAL1", "CTYPE1", "CUNIT1", "CD1_1", "CRPIX2", "CRVAL2", "CTYPE2",
                "CUNIT2", "CD2_2", "CD1_2", "CD2_1", "CTYPE3", "CUNIT3", "CD3_3", "CRPIX3", "CRVAL3",
                "CD1_3", "CD2_3", "CD3_1", "CD3_2"):
        axes = {int(ch) for ch in key if ch.isdigit()}
        if key in header and max(axes) <= naxis:
            out[key] = header[key]
    return out


# --------------------------------------------------------------------------- extensions

_EXTNAME_COMMENTS = {"data": "This extension contains data values",
                     "stat": "This extension contains data variance",
                     "image": "reconstructed image (data values)",
                     "dq": "reconstructed image (bad pixel status values)"}


def image_hdu(data: np.ndarray | None, extname: str, obj: str | None, wcs: fits.Header | None = None,
              kind: str = "data", bunit: str | None = None, errdata: str | None = None,
              qualdata: str | None = None, scidata: str | None = None) -> fits.ImageHDU:
    """An image extension with ESO's HDUCLASS keywords.

    ``kind``: "data" (a cube or image of values), "image" (a reconstructed image),
    "stat" (variance) or "dq" (Euro3D status bits); ``errdata`` / ``qualdata`` /
    ``scidata`` name the partner extensions.
    """
    header = fits.Header()
    if obj is not None:
        header["OBJECT"] = obj[:68]
    if wcs is not None and data is not None:
        header.extend(wcs_cards(wcs, data.ndim))
    set_card(header, "EXTNAME", extname, _EXTNAME_COMMENTS[kind])
    set_hdu_class(header, "data" if kind == "image" else kind, data=scidata, stat=errdata, dq=qualdata)
    if bunit is not None:
        header["BUNIT"] = bunit
    return fits.ImageHDU(data=data, header=header)


def datacube_skyflat_hdulist(primary: fits.Header, data: np.ndarray, stat: np.ndarray,
                             white: np.ndarray, wcs: fits.Header) -> fits.HDUList:
    """DATACUBE_SKYFLAT in ESO's layout: empty primary, DATA, STAT, white."""
    obj = primary.get("OBJECT", "")
    return fits.HDUList([
        fits.PrimaryHDU(header=primary),
        image_hdu(np.asarray(data, np.float32), "DATA", f"{obj} (DATA)", wcs, "data", "count", errdata="STAT"),
        image_hdu(np.asarray(stat, np.float32), "STAT", f"{obj} (STAT)", wcs, "stat", "(count)**2",
                  scidata="DATA"),
        image_hdu(np.asarray(white, np.float32), "white", f"{obj} (white)", wcs, "image", "count"),
    ])


_EXT_OBJECT = {
    "white_div_global": ("normalized white-light divided by white global fit", "1"),
    "white_div_global_excl_edges": ("white-light divided by white global, mask excl edges", "1"),
    "vign_fit": ("vignetting fit", ""),
    "white_cor": ("white image corrected by vignetting fit", "count"),
}


def twilight_cube_hdulist(result: TwilightResult, primary_header: fits.Header,
                          cube_header: fits.Header, drop_qc: bool = True) -> fits.HDUList:
    """TWILIGHT_CUBE in ESO's layout from a primary header with its provenance.

    The DRS MUSE FLAT FLUX keywords of ``primary_header`` are kept, the QC TWILIGHT
    ones dropped unless ``drop_qc`` is False (ESO keeps them when it starts from an
    existing cube, MUSE_TWILIGHT_SKIP).  ``cube_header`` carries the cube WCS and BUNIT
    (the DATA extension header of DATACUBE_SKYFLAT).
    """
    primary = fits.Header()
    for card in primary_header.cards:
        key = card.keyword
        if key in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "EXTNAME", "BUNIT", "CHECKSUM",
                   "DATASUM") or key.startswith("NAXIS") or is_wcs_key(key):
            continue
        if drop_qc and key.startswith(QC_TWILIGHT_PREFIX) and key[len(QC_TWILIGHT_PREFIX):][:1].isdigit():
            continue
        primary.append(card)
    set_card(primary, "HIERARCH ESO PRO CATG", TWILIGHT_CUBE.tag, "Category of pipeline product frame")

    wcs = fits.Header([c for c in cube_header.cards if is_wcs_key(c.keyword)])
    bunit = cube_header.get("BUNIT")
    base = primary_header.get("OBJECT")
    hdus: list[fits.ImageHDU] = [
        image_hdu(result.cube.astype(np.float32), "DATA", f"{base} (DATA)" if base is not None else None,
                  wcs, "data", bunit),
        image_hdu(result.white_global_fit.astype(np.float32), "white_global_fit",
                  "white from global fit (white_global_fit)", wcs, "image", bunit),
    ]
    for name in ("white_div_global", "white_div_global_excl_edges", "vign_fit", "white_cor"):
        image = getattr(result, name)
        if image is None:
            continue
        dq = getattr(result, name + "_dq")
        obj, unit = _EXT_OBJECT[name]
        hdus.append(image_hdu(image.astype(np.float32) if image.size else None, name, f"{obj} ({name})",
                              kind="image", bunit=unit, qualdata=name + "_DQ" if dq is not None else None))
        if dq is None:  # failed vignetting fit: ESO writes an empty HDU without DQ
            continue
        hdus.append(image_hdu(np.asarray(dq).astype(np.int32), name + "_DQ", f"{obj} ({name}, DQ)",
                              kind="dq", scidata=name))
    return fits.HDUList([fits.PrimaryHDU(header=primary), *hdus])


# --------------------------------------------------------------------------- files

def data_md5(hdul: fits.HDUList) -> str:
    """MD5 over the data units of all HDUs as written to FITS (big-endian), ESO's DATAMD5."""
    digest = hashlib.md5()
    for hdu in hdul:
        if hdu.data is None:
            continue
        array = np.asarray(hdu.data)
        digest.update(array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes())
        pad = -array.nbytes % 2880
        digest.update(b"\0" * pad)
    return digest.hexdigest()


NOT_COMPUTED = "Not computed"  # DATAMD5 placeholder ESO's recipe writes, left when nothing is signed


@dataclass(frozen=True)
class WriteOptions:
    """How the products are written (EsoRex's product options).

    ``checksum``: CHECKSUM/DATASUM in every HDU (``--no-checksum``: none anywhere).
    ``datamd5``: DATAMD5 (MD5 of the data units) in the primary header (``--no-datamd5``
    removes it; with both off ESO leaves the recipe's placeholder 'Not computed').
    ``prefix``: None keeps the recipe's names (``DATACUBE_SKYFLAT.fits``); a prefix numbers
    them in product order, ``<prefix>_0000.fits`` ... (``--suppress-prefix=FALSE
    --output-prefix``); PIPEFILE keeps the recipe's name either way, as in ESO.
    ``readonly``: mode 0444 once written (``--output-readonly``; a later run still replaces
    them).  ``products_sof``: a file listing the products once all are written, EsoRex's
    ``--products-sof`` (JSON when it ends with ``.json``), each under ``listed_dir/name``
    (only the name when ``listed_dir`` is None).  ``record``: write RECORD_NAME, the record of
    a complete set that ``batch --resume`` trusts (EsoRex's products come without it).
    """

    checksum: bool = True
    datamd5: bool = True
    prefix: str | None = None
    readonly: bool = False
    products_sof: Path | None = None
    listed_dir: str | None = None
    record: bool = True


def product_file_names(tags: Iterable[str], prefix: str | None = None) -> dict[str, str]:
    """The file name of each product: ``<tag>.fits``, or EsoRex's ``<prefix>_%04d.fits``."""
    names = {}
    for index, tag in enumerate(tags):
        name = f"{tag}.fits"
        names[tag] = name if prefix is None else f"{prefix}_{index:04d}{name[name.rindex('.'):]}"
    return names


def sign_product(hdul: fits.HDUList, tag: str, options: WriteOptions = WriteOptions()) -> None:
    """Fill PIPEFILE (the recipe's file name) and DATAMD5 of a product about to be written."""
    header = hdul[0].header
    header["PIPEFILE"] = (f"{tag}.fits", "Filename of data product")
    if options.datamd5:
        header["DATAMD5"] = (data_md5(hdul), "MD5 checksum")
    elif options.checksum:
        header.remove("DATAMD5", ignore_missing=True)
    else:
        header["DATAMD5"] = (NOT_COMPUTED, "MD5 checksum")
    if not options.checksum:
        for hdu in hdul:
            for key in ("CHECKSUM", "DATASUM"):
                hdu.header.remove(key, ignore_missing=True)


def products_sof_text(listed: Sequence[tuple[str, str]], json_layout: bool) -> str:
    """EsoRex's products SOF: ``path     TAG`` lines without a final newline, or its JSON
    (2-space indentation, ``/`` escaped as ``\\/``, final newline)."""
    if not json_layout:
        return "\n".join(f"{path}     {tag}" for path, tag in listed)
    entries = [f'  {{\n    "name": {json.dumps(path)},\n    "category": {json.dumps(tag)}\n  }}'
               for path, tag in listed]
    return ("[\n" + ",\n".join(entries) + "\n]\n").replace("/", "\\/")


def write_products(products: Mapping[str, fits.HDUList], output_dir: str | os.PathLike,
                   options: WriteOptions = WriteOptions(), lock: outdir.OutputLock | None = None) -> dict[str, Path]:
    """Write all products (tag -> HDUList) or none into ``output_dir``; return tag -> path.

    The directory is held by ``lock`` (taken here when not given; another run holding it
    makes this fail at once with BusyError).  Each product goes to a temporary file in
    ``output_dir`` first; then the record of the previous complete set (RECORD_NAME) is
    removed, all are renamed (over existing files) and a new record lists them
    (:func:`complete_set`); then they are made read-only and listed as ``options`` ask.
    On any failure (a full disk: SpaceError; an interruption) the temporary files are
    removed and no product of this run is left in ``output_dir``; existing files there
    stay untouched.
    """
    own_lock = lock is None
    held = outdir.claim(output_dir) if lock is None else lock
    out = held.directory
    names = product_file_names(products, options.prefix)
    pending: list[tuple[str, str, Path]] = []
    try:
        for tag, hdul in products.items():
            path = out / names[tag]
            sign_product(hdul, tag, options)
            handle, tmp_name = tempfile.mkstemp(prefix=outdir.temporary_name(path), suffix=outdir.TEMPORARY_SUFFIX,
                                                dir=out)
            os.close(handle)
            pending.append((tag, tmp_name, path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                hdul.writeto(tmp_name, overwrite=True, checksum=options.checksum, output_verify="exception")
            _sync(tmp_name)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp_name, 0o666 & ~mask)
        record = {"pipeline": PIPE_ID, "pid": os.getpid(), "written": datetime.now(UTC).isoformat(timespec="seconds"),
                  "products": {tag: {"file": path.name, "bytes": os.path.getsize(tmp_name),
                                      "datamd5": products[tag][0].header.get("DATAMD5")}
                               for tag, tmp_name, path in pending}}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / RECORD_NAME)
        for _, tmp_name, path in pending:
            os.replace(tmp_name, path)
        if options.record:
            _write_record(out, record)
        if options.readonly:
            for _, _, path in pending:
                os.chmod(path, 0o444)
        if options.products_sof is not None:
            listed = [(names[tag] if options.listed_dir is None else f"{options.listed_dir}/{names[tag]}", tag)
                      for tag, _, _ in pending]
            Path(options.products_sof).write_text(
                products_sof_text(listed, str(options.products_sof).endswith(".json")))
    except BaseException as err:
        for _, tmp_name, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        if isinstance(err, OSError) and space.is_out_of_space(err):
            raise space.out_of_space_error(out, "the products", err) from err
        raise
    finally:
        if own_lock:
            held.release()
    return {tag: path for tag, _, path in pending}


def _sync(path: str | os.PathLike) -> None:
    """Flush a file to disk (a product renamed into place must not be lost in a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_record(out: Path, record: dict) -> None:
    handle, tmp_name = tempfile.mkstemp(prefix=RECORD_NAME + ".", suffix=outdir.TEMPORARY_SUFFIX, dir=out)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, out / RECORD_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _sync(out)


def verify_product(path: str | os.PathLike) -> str | None:
    """Why a product file is not intact (None when it is): readable, CHECKSUM and DATASUM of
    every HDU right, DATAMD5 equal to its data's."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, checksum=True, memmap=False) as hdul:
                for hdu in hdul:
                    _ = hdu.data
                md5 = data_md5(hdul)
                stored = hdul[0].header.get("DATAMD5")
    except (OSError, ValueError, TypeError) as err:
        return f"{path}: not readable ({err})"
    failed = [str(w.message) for w in caught if "Checksum verification failed" in str(w.message)
              or "Datasum verification failed" in str(w.message)]
    if failed:
        return f"{path}: {failed[0]}"
    if stored != md5:
        return f"{path}: DATAMD5 {stored} differs from the data's {md5}"
    return None


def complete_set(directory: str | os.PathLike, tags: Iterable[str] = PRODUCT_TAGS,
                 verify: bool = True) -> dict[str, Path] | None:
    """The products of one complete run in ``directory`` (tag -> path), or None.

    Complete: the record written after the last renaming lists every tag, each file has the
    recorded size and DATAMD5, and (``verify``) passes :func:`verify_product`.
    """
    out = Path(directory)
    try:
        listed = json.loads((out / RECORD_NAME).read_text())["products"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found = {}
    for tag in tags:
        entry = listed.get(tag) if isinstance(listed, dict) else None
        if not entry:
            return None
        path = out / entry["file"]
        try:
            if path.stat().st_size != entry["bytes"] or fits.getval(path, "DATAMD5", 0) != entry["datamd5"]:
                return None
        except (OSError, KeyError):
            return None
        if verify and verify_product(path) is not None:
            return None
        found[tag] = path
    return found


# --------------------------------------------------------------------------- the products' headers

def qc_cards(headers: Mapping[int, fits.Header], flux: MergedFlux) -> list[tuple[str, object, str | None]]:
    """QC TWILIGHT keywords of every IFU, its INTFLUX, and the DRS MUSE FLAT FLUX values."""
    cards: list[tuple[str, object, str | None]] = []
    for ifu in sorted(headers):
        for card in headers[ifu].cards:
            if card.keyword.startswith(f"ESO QC TWILIGHT{ifu} "):
                cards.append((card.keyword, card.value, card.comment or None))
        if ifu in flux.flux:
            cards.append((f"ESO QC TWILIGHT{ifu} INTFLUX", float(np.float32(flux.flux[ifu])),
                          "Flux integrated over all slices of this IFU"))
    lamp = headers[flux.reference_ifu].get("ESO DRS MUSE FLAT FLUX LAMP")
    if lamp is not None:
        cards.append(("ESO DRS MUSE FLAT FLUX LAMP", float(lamp), None))
    for ifu in sorted(flux.flux):
        cards.append((f"ESO DRS MUSE FLAT FLUX SKY{ifu}", float(flux.flux[ifu]), None))
    return cards


def skyflat_primary(headers: Mapping[int, fits.Header], flux: MergedFlux, inputs: Inputs, settings,
                    failed: Sequence[int], absent: Sequence[int]) -> fits.Header:
    """DATACUBE_SKYFLAT's primary header: the reference IFU's combined-image header, the
    provenance, the QC and flux keywords, and the IFUs that failed or are absent."""
    primary = product_primary_header(headers[flux.reference_ifu], DATACUBE_SKYFLAT.tag, inputs.used_raw(),
                                     inputs.used_calib(False), settings, qc_cards(headers, flux))
    if failed:
        primary["HIERARCH MUSETWILIGHT SKIPPED"] = (",".join(map(str, failed)), "IFUs whose reduction failed")
    if absent:
        primary["HIERARCH MUSETWILIGHT ABSENT"] = (",".join(map(str, absent)),
                                                   "IFUs without calibrations (not in the set)")
    return primary


def twilight_primary(skyflat_header: fits.Header, inputs: Inputs, settings, with_vignetting: bool,
                     from_existing_cube: bool, illum_model: str | None = None) -> fits.Header:
    """TWILIGHT_CUBE's primary header from DATACUBE_SKYFLAT's: its provenance (from an
    existing cube ESO lists only the vignetting mask, and keeps the QC keywords) and, for a
    model other than ESO's (``illum_model``), :data:`ILLUM_MODEL_KEY` naming it."""
    keep = [(c.keyword, c.value, c.comment) for c in skyflat_header.cards
            if c.keyword.startswith("ESO DRS MUSE FLAT FLUX")
            or (from_existing_cube and c.keyword.startswith(QC_TWILIGHT_PREFIX))]
    header = product_primary_header(skyflat_header, TWILIGHT_CUBE.tag, inputs.used_raw(),
                                    inputs.used_calib(with_vignetting, from_existing_cube), settings, keep)
    if illum_model is not None:
        header["HIERARCH " + ILLUM_MODEL_KEY] = (str(illum_model), "TWILIGHT_CUBE model (--illum-model)")
    return header
