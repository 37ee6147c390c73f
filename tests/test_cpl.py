"""The python-cpl compatible facade (musetwilight.cpl), also against Debian's python-cpl + ESO."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from parity import TWILIGHT_RTOL

from musetwilight import cpl
from musetwilight.tools import compare, eso

# The seed example of the user-facing issue, with file names filled in from a JSON file;
# only the first line differs between python-cpl and musetwilight.
SEED_SCRIPT = '''
import json, sys
frames = json.load(open(sys.argv[1]))
muse_twilight = cpl.Recipe("muse_twilight")
muse_twilight.param.overscan = "vpoly"
muse_twilight.param.ovscreject = "dcr"
muse_twilight.param.ovscsigma = 30.
muse_twilight.param.ovscignore = 3
muse_twilight.param.combine = "sigclip"
muse_twilight.param.nlow = 1
muse_twilight.param.nhigh = 1
muse_twilight.param.nkeep = 1
muse_twilight.param.lsigma = 3.
muse_twilight.param.hsigma = 3.
muse_twilight.param.scale = False
muse_twilight.param.resample = "drizzle"
muse_twilight.param.crtype = "median"
muse_twilight.param.crsigma = 50.
muse_twilight.param.lambdamin = 5000.
muse_twilight.param.lambdamax = 9000.
muse_twilight.param.dlambda = 250.
muse_twilight.param.xorder = 2
muse_twilight.param.yorder = 2
muse_twilight.param.vignmaskedges = 0.02
muse_twilight.param.vignsmooth = "polyfit"
muse_twilight.param.vignxpar = -1
muse_twilight.param.vignypar = -1
muse_twilight.param.vignnfmmask = 22
res = muse_twilight(frames["SKYFLAT"], calib=frames["calib"],
                    param = {"overscan":"vpoly", "ovscreject":"dcr"})
res.DATACUBE_SKYFLAT.writeto(sys.argv[2] + "/DATACUBE_SKYFLAT.fits", overwrite=True)
res.TWILIGHT_CUBE.writeto(sys.argv[2] + "/TWILIGHT_CUBE.fits", overwrite=True)
'''


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


PARITY = compare.Tolerances(rtol_median=TWILIGHT_RTOL, rtol_p99=TWILIGHT_RTOL, rtol_max=TWILIGHT_RTOL,
                            nan_mismatch_frac=0.0)


def _frames(sim):
    calib = {tag: [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
             for tag, paths in sim.files.items() if tag not in ("SKYFLAT", "ILLUM")}
    return {"SKYFLAT": [str(p) for p in sim.files["SKYFLAT"]], "calib": calib}


def test_parameters_get_set_delete_iterate():
    recipe = cpl.Recipe("muse_twilight")
    assert recipe.param.xorder.default == 2 and recipe.param.xorder.value is None
    recipe.param.xorder = "3"
    assert recipe.param.xorder.value == 3 and recipe.param["muse.muse_twilight.xorder"].value == 3
    del recipe.param.xorder
    assert recipe.param.xorder.value is None
    names = [p.name for p in recipe.param]
    assert len(names) == 24 and names[0] == "overscan" and names[-1] == "vignnfmmask"
    assert {p.fullname for p in recipe.param} == {f"muse.muse_twilight.{n}" for n in names}
    with pytest.raises(cpl.CplError, match="not one of"):
        recipe.param.resample = "bicubic"
    with pytest.raises(AttributeError, match="no parameter 'xordr'"):
        recipe.param.xordr = 1
    assert recipe.tags == ["SKYFLAT", "ILLUM"] and recipe.tag == "SKYFLAT"
    with pytest.raises(OSError, match="muse_scibasic"):
        cpl.Recipe("muse_scibasic")


def test_calibration_slots():
    recipe = cpl.Recipe("muse_twilight")
    recipe.calib.MASTER_BIAS = "bias.fits"
    recipe.calib.BADPIX_TABLE = ["a.fits", "b.fits"]
    assert recipe.calib.MASTER_BIAS == "bias.fits"
    assert {s.tag for s in recipe.calib} >= {"MASTER_BIAS", "GEOMETRY_TABLE", "VIGNETTING_MASK"}
    assert recipe.calib.as_dict({"MASTER_FLAT": "flat.fits"}) == {
        "MASTER_BIAS": "bias.fits", "BADPIX_TABLE": ["a.fits", "b.fits"], "MASTER_FLAT": "flat.fits"}
    with pytest.raises(AttributeError, match="no calibration tag 'MASTER_SKY'"):
        recipe.calib.MASTER_SKY = "x.fits"


def test_call_with_hdulists_and_output_dir(mini, tmp_path, caplog):
    recipe = cpl.Recipe("muse_twilight")
    frames = _frames(mini)
    recipe.calib = frames["calib"]
    raws = [fits.open(p) for p in frames["SKYFLAT"]]
    with caplog.at_level(logging.INFO, logger="cpl.muse_twilight"):
        res = recipe(raws, param={"xorder": 1})
    assert isinstance(res.DATACUBE_SKYFLAT, fits.HDUList) and isinstance(res.TWILIGHT_CUBE, fits.HDUList)
    assert res.TWILIGHT_CUBE[0].header["ESO PRO REC1 PARAM18 VALUE"] == "1"
    assert res.tags == {"DATACUBE_SKYFLAT", "TWILIGHT_CUBE"}
    assert "IFUs 4-24 not in this set" in res.log.info
    assert not any("IFU  4" in m for m in res.log.warning)  # absent IFUs are one info line, not 21 warnings
    assert any(r.name.startswith("cpl.muse_twilight.") for r in caplog.records)  # python-cpl: .<function>
    assert res.stat.user_time > 0
    out = tmp_path / "products"
    res2 = recipe(frames["SKYFLAT"], output_dir=str(out))
    assert res2.DATACUBE_SKYFLAT == str(out / "DATACUBE_SKYFLAT.fits") and Path(res2.TWILIGHT_CUBE).exists()
    np.testing.assert_array_equal(fits.getdata(res2.DATACUBE_SKYFLAT, "DATA"), res.DATACUBE_SKYFLAT["DATA"].data)


def test_errors_are_cpl_errors(mini):
    recipe = cpl.Recipe("muse_twilight")
    recipe.calib = _frames(mini)["calib"]
    with pytest.raises(cpl.CplError, match="needs at least 3 SKYFLAT frames, found 2"):
        recipe(_frames(mini)["SKYFLAT"][:2])
    with pytest.raises(ValueError, match="No raw frames"):
        recipe([])
    with pytest.raises(cpl.CplError, match="No raw frames"):
        recipe([])


def test_every_failing_call_raises_cpl_error(mini, tmp_path):
    """As the README says: bad values, unwritable places and broken files all end in CplError."""
    recipe = cpl.Recipe("muse_twilight")
    recipe.calib = _frames(mini)["calib"]
    raws = _frames(mini)["SKYFLAT"]
    with pytest.raises(cpl.CplValueError, match=r"lambdamax \(6000.0\) must be larger than lambdamin"):
        recipe(raws, param={"lambdamin": 7000.0, "lambdamax": 6000.0})
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(cpl.CplError, match=f"^{a_file / 'out'}: cannot create the output directory: not a directory$"):
        recipe(raws, output_dir=str(a_file / "out"))
    not_fits = tmp_path / "SKYFLAT.fits"
    not_fits.write_text("not FITS")
    with pytest.raises(cpl.CplError, match="SKYFLAT.fits"):
        recipe([not_fits, *raws[1:]])
    with pytest.raises(cpl.CplError, match="cannot be the output directory: a file of that name exists"):
        recipe(raws, output_dir=str(a_file))


@pytest.mark.eso
@pytest.mark.skipif(eso.esorex_path() is None or not Path("/usr/bin/python3").exists(),
                    reason="ESO's pipeline and Debian's python-cpl are not installed")
def test_seed_script_same_products_as_python_cpl_with_eso(mini, tmp_path):
    check = subprocess.run(["/usr/bin/python3", "-c", "import cpl"], capture_output=True)
    if check.returncode != 0:
        pytest.skip("Debian's python3-cpl is not installed")
    frames_json = tmp_path / "frames.json"
    frames_json.write_text(json.dumps(_frames(mini)))
    outputs = {}
    for name, python, header in (("eso", "/usr/bin/python3", "import cpl\n"),
                                 ("ours", sys.executable, "from musetwilight import cpl\n")):
        script = tmp_path / f"seed_{name}.py"
        script.write_text(header + textwrap.dedent(SEED_SCRIPT))
        out = tmp_path / name
        out.mkdir()
        completed = subprocess.run([python, str(script), str(frames_json), str(out)], capture_output=True,
                                   text=True, cwd=tmp_path, timeout=600)
        assert completed.returncode == 0, completed.stderr[-2000:]
        outputs[name] = out
    report = compare.compare_products(outputs["eso"], outputs["ours"], PARITY)
    assert report.ok, report.format()
    for name in ("DATA", "STAT", "white"):
        data = report.image("DATACUBE_SKYFLAT.fits", name)
        assert data.max_rel == 0 and data.nan_mismatch == 0, data


@pytest.mark.eso
@pytest.mark.skipif(eso.esorex_path() is None or not Path("/usr/bin/python3").exists(),
                    reason="ESO's pipeline or Debian's python3 (python-cpl) is not installed")
def test_python_cpl_processing_info_reads_our_products(mini, tmp_path):
    """python-cpl's cpl.dfs.ProcessingInfo rebuilds the call from our provenance keywords."""
    if subprocess.run(["/usr/bin/python3", "-c", "import cpl.dfs"], capture_output=True).returncode:
        pytest.skip("Debian's python3-cpl is not installed")
    recipe = cpl.Recipe("muse_twilight")
    recipe.calib = _frames(mini)["calib"]
    res = recipe(_frames(mini)["SKYFLAT"], param={"resample": "nearest", "xorder": 3},
                 output_dir=str(tmp_path))
    probe = ("import json, sys; from cpl.dfs import ProcessingInfo; p = ProcessingInfo(sys.argv[1]); "
             "print(json.dumps({'name': p.name, 'product': p.product, 'tag': p.tag, 'raw': p.raw, "
             "'calib': p.calib, 'param': p.param, 'pipeline': p.pipeline, 'file': p.orig_filename}))")
    completed = subprocess.run(["/usr/bin/python3", "-c", probe, res.TWILIGHT_CUBE], capture_output=True,
                               text=True)
    assert completed.returncode == 0, completed.stderr
    info = json.loads(completed.stdout)
    assert info["name"] == "muse_twilight" and info["product"] == "TWILIGHT_CUBE"
    assert info["pipeline"] == "musetwilight" and info["file"] == "TWILIGHT_CUBE.fits"
    assert info["tag"] == "SKYFLAT" and len(info["raw"]) == 3
    assert info["param"]["resample"] == "nearest" and info["param"]["xorder"] == 3
    assert info["calib"]["MASTER_BIAS"] == "MASTER_BIAS.fits"
