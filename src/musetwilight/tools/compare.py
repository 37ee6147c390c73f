"""Compare two sets of products (ours against ESO's) pixel by pixel and keyword by keyword.

For every FITS file present under the same name in both sets (DATACUBE_SKYFLAT.fits,
TWILIGHT_CUBE.fits, ...) the comparison checks

* the list of extensions (names, in order) and the shape of every image;
* the WCS keywords (CTYPE/CUNIT/CRVAL/CRPIX/CDi_j) of every HDU;
* per image extension, over the pixels finite in both: the median, 99th percentile and
  maximum of the relative difference ``|test - ref| / |ref|`` (0 where both are 0,
  infinite where only ref is 0), the largest absolute difference and the number of
  differing pixels; and the NaN pattern (pixels finite in one set only);
* the ``ESO QC ...`` and ``ESO DRS MUSE ...`` keywords of every HDU: missing on one
  side, different strings, or numbers differing by more than a relative tolerance;
* the set of keywords of every HDU: names in one file only and value types that differ
  (commentary cards aside; our own ``MUSETWILIGHT ...`` keywords are listed, not failed),
  and whether the keywords both have come in the same order (reported, not failed).

The default tolerances are those of the resampling issue: median 1e-4, 99th percentile
1e-3, NaN patterns agreeing on at least 99.9 % of the pixels, QC values 1e-5.
Command line: ``musetwilight compare REF TEST`` (exit status 0 within tolerances).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import InputError
from ..headers import WCS_KEYS
from ..io.formats import image_values, iter_hdus, open_fits
from ..io.products import PRODUCTS

PRODUCT_NAMES = tuple(p.file_name for p in PRODUCTS)
COMPARED_KEY_PREFIXES = ("ESO QC ", "ESO DRS MUSE ")
COMMENTARY_KEYS = ("COMMENT", "HISTORY", "")
OWN_KEY_PREFIXES = ("MUSETWILIGHT ",)  # musetwilight's additions (skipped and absent IFUs), not ESO's


@dataclass(frozen=True)
class Tolerances:
    """Limits within which two product sets count as equal (None: reported only)."""

    rtol_median: float = 1e-4
    rtol_p99: float = 1e-3
    rtol_max: float | None = None
    nan_mismatch_frac: float = 1e-3
    qc_rtol: float = 1e-5
    wcs_rtol: float = 1e-6
    wcs_atol: float = 1e-9


@dataclass
class ImageDiff:
    """Pixel statistics of one image extension (or table column)."""

    extension: str
    shape: tuple[int, ...]
    npix: int
    nfinite_both: int
    ndifferent: int
    median_rel: float
    p99_rel: float
    max_rel: float
    max_abs: float
    nan_mismatch: int
    nan_mismatch_frac: float
    worst_pixel: tuple[int, ...] | None = None  # 0-based NumPy index of the largest relative difference
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class KeywordDiff:
    """One keyword that differs (or is missing on one side)."""

    extension: str
    keyword: str
    ref: object
    test: object
    rel_diff: float | None
    problem: str


@dataclass
class FileComparison:
    """Everything compared for one file name."""

    name: str
    ref_path: str
    test_path: str
    ref_extensions: list[str] = field(default_factory=list)
    test_extensions: list[str] = field(default_factory=list)
    images: list[ImageDiff] = field(default_factory=list)
    keywords_compared: int = 0
    keyword_diffs: list[KeywordDiff] = field(default_factory=list)
    keyword_set_diffs: list[KeywordDiff] = field(default_factory=list)
    keyword_order: list[str] = field(default_factory=list)  # "<extension>: first keyword out of order"
    problems: list[str] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        out = list(self.problems)
        out += [f"{d.extension}: {p}" for d in self.images for p in d.problems]
        out += [f"{k.extension}: {k.keyword}: {k.problem}" for k in self.keyword_diffs + self.keyword_set_diffs
                if k.problem]
        return out

    @property
    def ok(self) -> bool:
        return not self.all_problems


@dataclass
class ComparisonReport:
    """Result of :func:`compare_products`; ``ok`` when everything is within tolerances."""

    ref: str
    test: str
    tolerances: Tolerances
    files: list[FileComparison] = field(default_factory=list)
    missing_in_test: list[str] = field(default_factory=list)
    missing_in_ref: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = [f"{name}: missing in {self.test}" for name in self.missing_in_test]
        if not self.files and not self.missing_in_test:
            out.append("no product files to compare")
        for comparison in self.files:
            out += [f"{comparison.name}: {p}" for p in comparison.all_problems]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def image(self, file_name: str, extension: str) -> ImageDiff:
        """The statistics of one extension of one file (KeyError if not compared)."""
        for comparison in self.files:
            if comparison.name == file_name:
                for diff in comparison.images:
                    if diff.extension == extension:
                        return diff
        raise KeyError(f"{file_name}[{extension}] was not compared")

    def to_dict(self) -> dict:
        data = {
            "ref": self.ref,
            "test": self.test,
            "ok": self.ok,
            "tolerances": asdict(self.tolerances),
            "missing_in_test": self.missing_in_test,
            "missing_in_ref": self.missing_in_ref,
            "problems": self.problems,
            "files": [dict(asdict(comparison), ok=comparison.ok) for comparison in self.files],
        }
        return _json_safe(data)

    def format(self) -> str:
        """A readable table of the comparison."""
        lines = [f"reference: {self.ref}", f"test:      {self.test}"]
        tol = self.tolerances
        lines.append(f"tolerances: median {tol.rtol_median:g}, p99 {tol.rtol_p99:g}, max "
                     f"{'-' if tol.rtol_max is None else format(tol.rtol_max, 'g')}, NaN mismatch "
                     f"{tol.nan_mismatch_frac:g}, QC {tol.qc_rtol:g}")
        for name in self.missing_in_test:
            lines.append(f"\n{name}: MISSING in test")
        for name in self.missing_in_ref:
            lines.append(f"\n{name}: only in test (not compared)")
        header = (f"  {'extension':<28} {'shape':>16} {'median rel':>11} {'p99 rel':>11} {'max rel':>11} "
                  f"{'max abs':>11} {'#differ':>9} {'NaN mismatch':>18}  status  worst [z,y,x]")
        for comparison in self.files:
            lines.append(f"\n{comparison.name}: {'OK' if comparison.ok else 'DIFFERENT'}")
            for problem in comparison.problems:
                lines.append(f"  ! {problem}")
            if comparison.images:
                lines.append(header)
            for d in comparison.images:
                shape = "x".join(str(n) for n in d.shape)
                nan = f"{d.nan_mismatch} ({d.nan_mismatch_frac:.2e})"
                lines.append(f"  {d.extension:<28} {shape:>16} {_g(d.median_rel):>11} {_g(d.p99_rel):>11} "
                             f"{_g(d.max_rel):>11} {_g(d.max_abs):>11} {d.ndifferent:>9} {nan:>18}  "
                             f"{'ok    ' if d.ok else 'FAIL  '}  {_index(d.worst_pixel)}")
                for problem in d.problems:
                    lines.append(f"      ! {problem}")
            lines.append(f"  keywords (ESO QC / ESO DRS MUSE / WCS) compared: {comparison.keywords_compared}, "
                         f"different: {len(comparison.keyword_diffs)}")
            for k in comparison.keyword_diffs:
                rel = "" if k.rel_diff is None else f" rel {_g(k.rel_diff)}"
                lines.append(f"    {k.extension}: {k.keyword}: ref {k.ref!r} test {k.test!r}{rel}"
                             f"{'  FAIL: ' + k.problem if k.problem else ''}")
            lines.append(f"  keyword sets: {len(comparison.keyword_set_diffs)} difference(s)"
                         + (f", order differs ({'; '.join(comparison.keyword_order)})" if comparison.keyword_order
                            else ", same order"))
            for k in comparison.keyword_set_diffs:
                lines.append(f"    {k.extension}: {k.keyword}: ref {k.ref} test {k.test}"
                             f"{'  FAIL: ' + k.problem if k.problem else '  (musetwilight only)'}")
        problems = self.problems
        lines.append("")
        lines.append("RESULT: " + ("within tolerances" if not problems else f"{len(problems)} problem(s)"))
        return "\n".join(lines)


def _index(index: tuple[int, ...] | None) -> str:
    return "-" if index is None else "[" + ",".join(str(i) for i in index) + "]"


def _g(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3e}"


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- statistics

def relative_difference(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``|test - ref| / |ref|`` in float64; 0 where both are equal, inf where ref is 0 only."""
    ref64 = np.asarray(ref, dtype=np.float64)
    test64 = np.asarray(test, dtype=np.float64)
    diff = np.abs(test64 - ref64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = diff / np.abs(ref64)
    rel[diff == 0] = 0.0
    return rel


def compare_arrays(name: str, ref: np.ndarray, test: np.ndarray, tolerances: Tolerances) -> ImageDiff:
    """Pixel statistics of two arrays of the same shape (see the module docstring)."""
    finite_ref = np.isfinite(ref)
    finite_test = np.isfinite(test)
    both = finite_ref & finite_test
    mismatch = int(np.count_nonzero(finite_ref != finite_test))
    npix = int(ref.size)
    r, t = ref[both], test[both]
    nboth = int(r.size)
    if nboth:
        rel = relative_difference(r, t)
        with np.errstate(invalid="ignore"):
            quantiles = np.quantile(rel, [0.5, 0.99])
        if np.isinf(rel).any():  # linear interpolation between infinities gives NaN
            quantiles = np.where(np.isnan(quantiles), np.inf, quantiles)
        median_rel, p99_rel = (float(q) for q in quantiles)
        worst = int(np.argmax(rel))
        max_rel = float(rel[worst])
        worst_pixel = tuple(int(i[worst]) for i in np.nonzero(both)) if max_rel > 0 else None
        max_abs = float(np.max(np.abs(np.asarray(t, np.float64) - np.asarray(r, np.float64))))
        ndifferent = int(np.count_nonzero(rel))
    else:
        median_rel = p99_rel = max_rel = max_abs = float("nan")
        ndifferent = 0
        worst_pixel = None
    diff = ImageDiff(name, tuple(int(n) for n in ref.shape), npix, nboth, ndifferent, median_rel, p99_rel,
                     max_rel, max_abs, mismatch, mismatch / npix if npix else 0.0, worst_pixel)
    checks = (("median", median_rel, tolerances.rtol_median), ("99th percentile", p99_rel, tolerances.rtol_p99),
              ("maximum", max_rel, tolerances.rtol_max))
    for label, value, limit in checks:
        if limit is not None and nboth and not value <= limit:
            diff.problems.append(f"{label} relative difference {value:.3e} > {limit:g}")
    if diff.nan_mismatch_frac > tolerances.nan_mismatch_frac:
        diff.problems.append(f"NaN pattern differs in {mismatch} of {npix} pixels "
                             f"({diff.nan_mismatch_frac:.3e} > {tolerances.nan_mismatch_frac:g})")
    return diff


def _numeric_rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if a == 0:
        return math.inf
    return abs(b - a) / abs(a)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_keywords(ext: str, ref: fits.Header, test: fits.Header,
                     tolerances: Tolerances) -> tuple[int, list[KeywordDiff]]:
    """QC / DRS / WCS keywords of one HDU: (number compared, differences)."""
    def selected(header: fits.Header) -> dict:
        out: dict[str, object] = {}
        for card in header.cards:
            key = card.keyword
            if key.startswith(COMPARED_KEY_PREFIXES) or WCS_KEYS.match(key):
                out.setdefault(key, card.value)
        return out

    ref_keys, test_keys = selected(ref), selected(test)
    diffs = []
    names = list(ref_keys) + [k for k in test_keys if k not in ref_keys]
    for key in names:
        if key not in test_keys:
            diffs.append(KeywordDiff(ext, key, ref_keys[key], None, None, "missing in test"))
            continue
        if key not in ref_keys:
            diffs.append(KeywordDiff(ext, key, None, test_keys[key], None, "missing in reference"))
            continue
        a, b = ref_keys[key], test_keys[key]
        is_wcs = bool(WCS_KEYS.match(key))
        if _is_number(a) and _is_number(b):
            rel = _numeric_rel(float(a), float(b))
            if is_wcs:
                bad = abs(float(b) - float(a)) > tolerances.wcs_atol + tolerances.wcs_rtol * abs(float(a))
                limit = tolerances.wcs_rtol
            else:
                bad = not rel <= tolerances.qc_rtol
                limit = tolerances.qc_rtol
            if rel > 0:
                problem = f"relative difference {rel:.3e} > {limit:g}" if bad else ""
                diffs.append(KeywordDiff(ext, key, a, b, rel, problem))
        elif isinstance(a, str) and isinstance(b, str):
            if a.rstrip() != b.rstrip():
                diffs.append(KeywordDiff(ext, key, a, b, None, "different value"))
        elif a != b or type(a) is not type(b):
            diffs.append(KeywordDiff(ext, key, a, b, None, f"different value or type ({type(a).__name__} vs "
                                                           f"{type(b).__name__})"))
    return len(names), diffs


def _value_type(value) -> str:
    """The FITS type of a keyword value: logical, integer, real, string or undefined."""
    if isinstance(value, (bool, np.bool_)):
        return "logical"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "real"
    if isinstance(value, str):
        return "string"
    return "undefined"


def compare_keyword_sets(ext: str, ref: fits.Header, test: fits.Header) -> tuple[list[KeywordDiff], str | None]:
    """Keyword names in one header only (those :func:`compare_keywords` reports aside) and
    value types that differ, and the first keyword (of those in both) that comes out of
    order (None when the order is the same)."""
    def types(header: fits.Header) -> dict[str, str]:
        out: dict[str, str] = {}
        for card in header.cards:
            if card.keyword not in COMMENTARY_KEYS:
                out.setdefault(card.keyword, _value_type(card.value))
        return out

    ref_types, test_types = types(ref), types(test)
    diffs = []
    for key in list(ref_types) + [k for k in test_types if k not in ref_types]:
        own = key.startswith(OWN_KEY_PREFIXES)
        covered = key.startswith(COMPARED_KEY_PREFIXES) or WCS_KEYS.match(key)  # by compare_keywords
        if covered and (key not in test_types or key not in ref_types):
            continue
        if key not in test_types:
            diffs.append(KeywordDiff(ext, key, ref_types[key], "-", None, "" if own else "only in reference"))
        elif key not in ref_types:
            diffs.append(KeywordDiff(ext, key, "-", test_types[key], None, "" if own else "only in test"))
        elif ref_types[key] != test_types[key]:
            diffs.append(KeywordDiff(ext, key, ref_types[key], test_types[key], None,
                                     f"type {ref_types[key]} in reference, {test_types[key]} in test"))
    ref_order = [k for k in ref_types if k in test_types]
    test_order = [k for k in test_types if k in ref_types]
    first = next((a for a, b in zip(ref_order, test_order) if a != b), None)
    return diffs, first


# --------------------------------------------------------------------------- files

def _extension_name(hdu, index: int) -> str:
    name = hdu.header.get("EXTNAME")
    return str(name).strip() if name else ("PRIMARY" if index == 0 else f"HDU{index}")


def _hdus(hdul: fits.HDUList, path) -> list:
    return [hdu for _, hdu in iter_hdus(hdul, path)]


def compare_files(ref_path: str | os.PathLike, test_path: str | os.PathLike,
                  tolerances: Tolerances = Tolerances(), name: str | None = None) -> FileComparison:
    """Compare two FITS files HDU by HDU (matched by EXTNAME)."""
    ref_path, test_path = Path(ref_path), Path(test_path)
    result = FileComparison(name or ref_path.name, str(ref_path), str(test_path))
    with open_fits(ref_path) as ref_hdul, open_fits(test_path) as test_hdul:
        ref_hdus, test_hdus = _hdus(ref_hdul, ref_path), _hdus(test_hdul, test_path)
        result.ref_extensions = [_extension_name(h, i) for i, h in enumerate(ref_hdus)]
        result.test_extensions = [_extension_name(h, i) for i, h in enumerate(test_hdus)]
        # the primary HDU is matched as such (its EXTNAME may differ), extensions by name
        test_by_name = {name: hdu for name, hdu in zip(result.test_extensions[1:], test_hdus[1:])}
        pairs = [("PRIMARY", ref_hdus[0], test_hdus[0])]
        for ext_name, hdu in zip(result.ref_extensions[1:], ref_hdus[1:]):
            if ext_name in test_by_name:
                pairs.append((ext_name, hdu, test_by_name[ext_name]))
            else:
                result.problems.append(f"extension {ext_name} missing in test")
        for ext_name in result.test_extensions[1:]:
            if ext_name not in result.ref_extensions[1:]:
                result.problems.append(f"extension {ext_name} only in test")
        if not result.problems and result.ref_extensions[1:] != result.test_extensions[1:]:
            result.problems.append(f"extension order differs: {result.ref_extensions[1:]} vs "
                                   f"{result.test_extensions[1:]}")
        for ext_name, ref_hdu, test_hdu in pairs:
            count, diffs = compare_keywords(ext_name, ref_hdu.header, test_hdu.header, tolerances)
            result.keywords_compared += count
            result.keyword_diffs += diffs
            set_diffs, out_of_order = compare_keyword_sets(ext_name, ref_hdu.header, test_hdu.header)
            result.keyword_set_diffs += set_diffs
            if out_of_order:
                result.keyword_order.append(f"{ext_name}: {out_of_order}")
            _compare_data(result, ext_name, ref_hdu, test_hdu, ref_path, test_path, tolerances)
    return result


def _compare_data(result: FileComparison, ext_name: str, ref_hdu, test_hdu, ref_path, test_path,
                  tolerances: Tolerances) -> None:
    ref_is_table = isinstance(ref_hdu, (fits.BinTableHDU, fits.TableHDU))
    test_is_table = isinstance(test_hdu, (fits.BinTableHDU, fits.TableHDU))
    if ref_is_table != test_is_table:
        result.problems.append(f"{ext_name}: table in one file, image in the other")
        return
    if ref_is_table:
        ref_data, test_data = ref_hdu.data, test_hdu.data
        ref_cols = [] if ref_data is None else list(ref_data.columns.names)
        test_cols = [] if test_data is None else list(test_data.columns.names)
        if ref_cols != test_cols:
            result.problems.append(f"{ext_name}: columns differ: {ref_cols} vs {test_cols}")
        for col in ref_cols:
            if col not in test_cols:
                continue
            a, b = np.asarray(ref_data[col]), np.asarray(test_data[col])
            if a.dtype.kind not in "iufb" or b.dtype.kind not in "iufb":
                if not np.array_equal(a, b):
                    result.problems.append(f"{ext_name}.{col}: values differ")
                continue
            if a.shape != b.shape:
                result.problems.append(f"{ext_name}.{col}: shape {a.shape} vs {b.shape}")
                continue
            result.images.append(compare_arrays(f"{ext_name}.{col}", a, b, tolerances))
        return
    ref_naxis, test_naxis = ref_hdu.header.get("NAXIS", 0), test_hdu.header.get("NAXIS", 0)
    if ref_naxis == 0 and test_naxis == 0:
        return
    if ref_naxis == 0 or test_naxis == 0:
        result.problems.append(f"{ext_name}: data in one file only")
        return
    ref_shape = tuple(ref_hdu.header.get(f"NAXIS{i}", 0) for i in range(ref_naxis, 0, -1))
    test_shape = tuple(test_hdu.header.get(f"NAXIS{i}", 0) for i in range(test_naxis, 0, -1))
    if ref_shape != test_shape:
        result.problems.append(f"{ext_name}: shape {'x'.join(map(str, ref_shape))} vs "
                               f"{'x'.join(map(str, test_shape))}")
        return
    a = image_values(ref_hdu, ref_path)
    b = image_values(test_hdu, test_path)
    result.images.append(compare_arrays(ext_name, a, b, tolerances))


def _fits_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix.lower() in (".fits", ".fit")}


def compare_products(ref: str | os.PathLike, test: str | os.PathLike, tolerances: Tolerances | None = None,
                     names: Iterable[str] | None = None) -> ComparisonReport:
    """Compare two product sets (directories: every FITS file of ``ref`` under the same name
    in ``test``, or only ``names``) or two single files."""
    tolerances = tolerances or Tolerances()
    ref_path, test_path = Path(ref), Path(test)
    report = ComparisonReport(str(ref_path), str(test_path), tolerances)
    for path in (ref_path, test_path):
        if not path.exists():
            raise InputError(f"{path}: does not exist")
    if ref_path.is_file() or test_path.is_file():
        if not (ref_path.is_file() and test_path.is_file()):
            raise InputError(f"compare a file with a file or a directory with a directory: {ref_path}, {test_path}")
        report.files.append(compare_files(ref_path, test_path, tolerances))
        return report
    ref_files, test_files = _fits_files(ref_path), _fits_files(test_path)
    wanted = list(names) if names is not None else list(ref_files)
    for name in wanted:
        if name not in ref_files:
            raise InputError(f"{ref_path}: has no {name}")
        if name not in test_files:
            report.missing_in_test.append(name)
            continue
        report.files.append(compare_files(ref_files[name], test_files[name], tolerances))
    if names is None:
        report.missing_in_ref = [name for name in test_files if name not in ref_files]
    return report
