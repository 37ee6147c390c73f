"""Our products against ESO's, stored in git: regression checks that run WITHOUT ESO.

``tests/reference/`` holds, per case, ESO's DATACUBE_SKYFLAT.fits and TWILIGHT_CUBE.fits (gzipped) made by
``esorex muse_twilight`` (ESO MUSE 2.8.7) from a simulated mini set with fixed options and
seed, and the digests of ESO's intermediate products (``muse_scibasic``: combined CCD image
OBJECT_RED and pixel table PIXTABLE_OBJECT).  ``tests/reference/manifest.json`` says how each
was made; ``PYTHONPATH=src python tools/make_references.py`` regenerates everything (needs
esorex).  Here, for each case, the set is simulated again (its input digest must equal the
recorded one: otherwise the simulator changed and the references must be regenerated),
reduced by musetwilight, and compared:

* DATACUBE_SKYFLAT DATA, STAT and white: bit-identical (same NaN positions);
* TWILIGHT_CUBE: every extension within float32 rounding (``TWILIGHT_RTOL``), DQ extensions
  identical.  Not exact because ESO's per-plane and vignetting polynomial fits sum their
  normal equations in another order (CPL's matrix code) than ours; the difference is a few
  float32 ulps of values near 1 (measured: at most 4.2e-7 relative over all cases);
* primary headers: QC (``ESO QC TWILIGHTm ...``), ``ESO DRS MUSE FLAT FLUX ...`` and all other
  cards equal to what ESO wrote, floats to the precision ESO wrote them (its last digit);
* intermediate products: our combined image (before the bad-pixel interpolation, which
  muse_scibasic does not do) and pixel table of each listed IFU hash as ESO's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import reference_digests as rd
from astropy.io import fits
from parity import TWILIGHT_RTOL, describe, same_card_value

REFERENCE_DIR = Path(__file__).parent / "reference"
MANIFEST = json.loads((REFERENCE_DIR / "manifest.json").read_text())
CASES = MANIFEST["cases"]
REGENERATE = MANIFEST["regenerate"]
PRODUCTS = ("DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits")
PIXTABLE_COLUMNS = ("xpos", "ypos", "lambda", "data", "dq", "stat", "origin")
# (TWILIGHT_RTOL and why TWILIGHT_CUBE is not bit-identical: tests/parity.py)
# header cards that must differ (time, checksums, our pipeline's name) or that only ESO writes
VOLATILE = {"DATE", "CHECKSUM", "DATASUM", "DATAMD5", "COMMENT", "HISTORY", "ESO PRO REC1 DRS ID",
            "ESO PRO REC1 PIPE ID"}
OURS_ONLY_PREFIX = "MUSETWILIGHT "  # our SKIPPED/ABSENT lists
# known differences of extension headers, (product, extension, keyword): none
KNOWN_EXTENSION_DIFFERENCES: set[tuple[str, str, str]] = set()


# --------------------------------------------------------------------------------------------
# The package's internals used here, all in one place.


def run_simulator(out_dir, options: dict):
    from musetwilight.tools.simulate import simulate_dataset
    return simulate_dataset(out_dir, **options)


def run_musetwilight(sof, params: dict, output_dir):
    from musetwilight import recipe
    return recipe.run(sof, params, output_dir)


def our_intermediates(sim, kind: str, ifu: int, params: dict) -> dict[str, dict[str, np.ndarray]]:
    """Our counterparts of muse_scibasic's OBJECT_RED and PIXTABLE_OBJECT for one IFU.

    ``kind`` 'sky': the SKYFLATs processed and combined with the case's parameters (before the
    bad-pixel interpolation: muse_scibasic does not interpolate) and its pixel table (NaD notch
    flagged in AO modes); 'illum': the ILLUM exposure alone, processed, and its pixel table.
    """
    from musetwilight import recipe
    from musetwilight.core import basicproc, combine, pixtable
    from musetwilight.io import formats as io
    from musetwilight.params import make_settings

    settings = make_settings(params)
    files = sim.files
    raws = files["SKYFLAT"] if kind == "sky" else files["ILLUM"]
    badpix = [t for t in (io.read_badpix_table(p, ifu) for p in files.get("BADPIX_TABLE", [])) if t is not None]
    calibrations = basicproc.Calibrations(
        io.read_muse_image(files["MASTER_BIAS"][0], ifu), io.read_muse_image(files["MASTER_FLAT"][0], ifu),
        io.read_muse_image(files["MASTER_DARK"][0], ifu) if files.get("MASTER_DARK") else None, badpix)
    images = basicproc.process_exposures([io.read_raw_ifu(p, ifu) for p in raws], settings, calibrations,
                                         illum=[kind == "illum"] * len(raws)).images
    image = combine.combine_exposures(images, settings) if kind == "sky" else images[0]
    table = pixtable.build_pixtable(image, io.read_ifu_table(files["TRACE_TABLE"][0], ifu),
                                    io.read_ifu_table(files["WAVECAL_TABLE"][0], ifu),
                                    io.read_geometry_table(files["GEOMETRY_TABLE"][0]), ifu,
                                    recipe.instrument_mode(files["SKYFLAT"][0]))
    return {"OBJECT_RED": {"DATA": image.data, "DQ": image.dq, "STAT": image.stat},
            "PIXTABLE_OBJECT": {name: table.column(name) for name in PIXTABLE_COLUMNS}}


# --------------------------------------------------------------------------------------------
# helpers


def _simulate_options(case: dict) -> dict:
    return {k: v for k, v in case["simulate"].items() if not (k == "scale" and v == "mini")}


def _header_differences(eso: fits.Header, ours: fits.Header, skip=lambda key: False) -> list[str]:
    out = []
    for card in eso.cards:
        key = card.keyword
        if key in VOLATILE or skip(key):
            continue
        if key not in ours:
            out.append(f"{key}: ESO {card.value!r}, ours missing")
        elif not same_card_value(card, ours[key]):
            out.append(f"{key}: ESO wrote {card.image.split('=', 1)[1].split(' /')[0].strip()}, ours {ours[key]!r}")
    for key in ours:
        if key not in eso and key not in VOLATILE and not key.startswith(OURS_ONLY_PREFIX) and not skip(key):
            out.append(f"{key}: only in ours ({ours[key]!r})")
    return out


def _digest_summary(d: dict) -> str:
    keys = ("shape", "sum", "min", "max", "nan", "nonzero")
    return ", ".join(f"{k} {d[k]}" for k in keys if k in d)


# --------------------------------------------------------------------------------------------
# the stored references themselves


def test_stored_references_are_intact():
    """Every stored file has the SHA-256 the manifest recorded (no edit, no LFS pointer, no CRLF)."""
    assert MANIFEST["eso"]["plugin"] == "muse-2.8.7"
    assert "version 3.13." in MANIFEST["eso"]["esorex_version"]
    bad = []
    for name, case in CASES.items():
        assert set(case["stored_files"]) == {f"{product}.gz" for product in PRODUCTS}
        for file_name, info in case["stored_files"].items():
            path = REFERENCE_DIR / name / file_name
            if not path.exists():
                bad.append(f"{path} missing")
            elif rd.file_sha256(path) != info["sha256"]:
                bad.append(f"{path}: SHA-256 differs from the manifest")
            elif hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() != info["content_sha256"]:
                bad.append(f"{path}: SHA-256 of ESO's file inside differs from the manifest")
    assert not bad, "; ".join(bad) + f" -- restore them from git or regenerate: {REGENERATE}"


def test_every_case_exercises_what_it_is_for():
    """The sigclip case rejects in both directions, and the upper bound matters (checked with ESO)."""
    checks = CASES["sigclip5"]["sigclip_checks"]
    assert CASES["sigclip5"]["params"]["lsigma"] != CASES["sigclip5"]["params"]["hsigma"]
    for variant in ("upper_bound_lsigma", "no_upper_rejection", "no_lower_rejection"):
        assert all(n > 1000 for n in checks[variant]["pixels_differing_per_ifu"].values()), variant
    assert checks["upper_bound_lsigma"]["datacube_voxels_differing"] > 1000
    kernels = {(c["params"].get("resample", "drizzle"), c["params"].get("crtype", "median")) for c in CASES.values()}
    assert len(kernels) >= 3


# --------------------------------------------------------------------------------------------
# per case: simulate, check the inputs, reduce


@pytest.fixture(scope="module")
def simulated_case(tmp_path_factory):
    """``simulated_case(name)``: the case's set, simulated here (not shared with other modules, so
    no other test can have touched it); fails every test of the case if its inputs are not ESO's."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            case = CASES[name]
            sim = run_simulator(tmp_path_factory.mktemp(f"reference_set_{name}"), _simulate_options(case))
            cache[name] = rd.input_differences(case["input_digest"], rd.input_digest(sim.sof)) or sim
        found = cache[name]
        if isinstance(found, list):
            pytest.fail(f"case {name}: the simulator's output changed ({'; '.join(found[:5])}"
                        f"{' ...' if len(found) > 5 else ''}), so ESO's stored products no longer belong "
                        f"to these inputs; regenerate them with: {REGENERATE}", pytrace=False)
        return found

    return get


@pytest.fixture(scope="module", params=sorted(CASES))
def reduced(request, simulated_case, tmp_path_factory):
    name = request.param
    case = CASES[name]
    sim = simulated_case(name)
    out = tmp_path_factory.mktemp(f"reference_{name}")
    run_musetwilight(sim.sof, case["params"], out)
    return name, case, sim, out


def _pair(reduced, product):
    name, _, _, out = reduced
    return fits.open(REFERENCE_DIR / name / f"{product}.gz"), fits.open(out / product)


def test_datacube_skyflat_is_bit_identical(reduced):
    eso, ours = _pair(reduced, "DATACUBE_SKYFLAT.fits")
    assert [h.name for h in ours] == [h.name for h in eso] == ["PRIMARY", "DATA", "STAT", "white"]
    for ext in ("DATA", "STAT", "white"):
        a, b = eso[ext].data, ours[ext].data
        assert b.dtype.kind == "f" and b.dtype.itemsize == 4 and a.shape == b.shape, (ext, a.shape, b.shape, b.dtype)
        assert np.array_equal(a, b, equal_nan=True), f"{reduced[0]} DATACUBE_SKYFLAT {ext}: {describe(a, b)}"


def test_twilight_cube_equals_eso_to_float_rounding(reduced):
    eso, ours = _pair(reduced, "TWILIGHT_CUBE.fits")
    assert [h.name for h in ours] == [h.name for h in eso]
    worst = {}
    for hdu in eso[1:]:
        a, b = hdu.data, ours[hdu.name].data
        assert a.shape == b.shape and a.dtype.kind == b.dtype.kind, (hdu.name, a.shape, b.shape, b.dtype)
        if a.dtype.kind in "iu":
            assert np.array_equal(a, b), f"{reduced[0]} TWILIGHT_CUBE {hdu.name}: {describe(a, b)}"
            continue
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{reduced[0]} {hdu.name}: {describe(a, b)}"
        finite = np.isfinite(a)
        a64, b64 = a[finite].astype(np.float64), b[finite].astype(np.float64)
        rel = float(np.max(np.abs(a64 - b64) / np.maximum(np.abs(a64), 1e-30), initial=0.0))
        worst[hdu.name] = (rel, float(np.max(np.abs(a64 - b64), initial=0.0)))
        assert rel <= TWILIGHT_RTOL, f"{reduced[0]} TWILIGHT_CUBE {hdu.name}: {describe(a, b)}"
    print(f"{reduced[0]}: TWILIGHT_CUBE max rel/abs diff "
          + ", ".join(f"{k} {r:.3g}/{d:.3g}" for k, (r, d) in worst.items()))


def test_qc_keywords_equal_what_eso_wrote(reduced):
    """QC TWILIGHTm ... and DRS MUSE FLAT FLUX ... (both products) to ESO's written precision."""
    problems = []
    for product in PRODUCTS:
        eso, ours = _pair(reduced, product)
        eso_keys = [k for k in eso[0].header if k.startswith(("ESO QC ", "ESO DRS MUSE FLAT FLUX "))]
        if product == "DATACUBE_SKYFLAT.fits":
            assert len(eso_keys) > 40 and any(k.endswith("INTFLUX") for k in eso_keys)
        else:
            assert eso_keys and all(k.startswith("ESO DRS MUSE FLAT FLUX") for k in eso_keys)
        problems += [f"{product}: {p}" for p in _header_differences(
            eso[0].header, ours[0].header,
            skip=lambda key: not key.startswith(("ESO QC ", "ESO DRS MUSE FLAT FLUX ")))]
    assert not problems, f"{reduced[0]}: " + "; ".join(problems[:20])


def test_other_header_cards_equal_eso(reduced):
    """The rest of the primary headers (provenance, parameters, detector) and the extension headers."""
    problems = []
    for product in PRODUCTS:
        eso, ours = _pair(reduced, product)
        problems += [f"{product}[0] {p}" for p in _header_differences(
            eso[0].header, ours[0].header, skip=lambda key: key.startswith(("ESO QC ", "ESO DRS MUSE FLAT FLUX ")))]
        for hdu in eso[1:]:
            known = {k for p, e, k in KNOWN_EXTENSION_DIFFERENCES if p == product and e == hdu.name}
            problems += [f"{product}[{hdu.name}] {p}" for p in _header_differences(
                hdu.header, ours[hdu.name].header, skip=lambda key, known=known: key in known)]
    assert not problems, f"{reduced[0]}: " + "; ".join(problems[:20])


INTERMEDIATE_RUNS = [(name, index) for name in sorted(CASES) for index in range(len(CASES[name]["intermediate"]))]


@pytest.mark.parametrize("name, index", INTERMEDIATE_RUNS, ids=[
    f"{n}-{CASES[n]['intermediate'][i]['kind']}-IFU{CASES[n]['intermediate'][i]['ifu']}" for n, i in INTERMEDIATE_RUNS])
def test_intermediate_products_hash_as_esos(name, index, simulated_case):
    """Combined CCD image and pixel table of one IFU: SHA-256 equal to ESO's muse_scibasic's."""
    case = CASES[name]
    run = case["intermediate"][index]
    sim = simulated_case(name)
    ours = our_intermediates(sim, run["kind"], run["ifu"], case["params"])
    problems = []
    for product, arrays in ours.items():
        for column, array in arrays.items():
            expected = run[product][column]
            got = rd.array_digest(array)
            if got["sha256"] != expected["sha256"] or got["shape"] != expected["shape"]:
                problems.append(f"{product} {column}: ESO [{_digest_summary(expected)}], "
                                f"ours [{_digest_summary(got)}]")
    assert not problems, f"{name} {run['kind']} IFU {run['ifu']}: " + "; ".join(problems)
