"""MPDAF (the MUSE community's Python package) reads our products and pixel tables."""

import numpy as np
import pytest

from musetwilight import recipe

mpdaf_obj = pytest.importorskip("mpdaf.obj", reason="MPDAF is not installed (pip install mpdaf)")
mpdaf_drs = pytest.importorskip("mpdaf.drs", reason="MPDAF is not installed (pip install mpdaf)")


@pytest.fixture(scope="module")
def products(simulated_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpdaf")
    return recipe.run(simulated_set(seed=1).sof, None, out)


def test_mpdaf_cube_reads_datacube_skyflat(products):
    cube = mpdaf_obj.Cube(str(products.paths["DATACUBE_SKYFLAT"]))
    ours = products.datacube_skyflat
    assert cube.shape == ours["DATA"].data.shape
    assert cube.wave.get_crval() == pytest.approx(ours["DATA"].header["CRVAL3"])
    assert cube.wave.get_step() == pytest.approx(250.0)
    np.testing.assert_array_equal(cube.data.filled(np.nan), ours["DATA"].data)
    np.testing.assert_array_equal(cube.var.filled(np.nan), ours["STAT"].data)
    assert int(cube.mask.sum()) == int(np.isnan(ours["DATA"].data).sum())


def test_mpdaf_pixtable_decodes_our_origin(simulated_set, tmp_path):
    from musetwilight.core import pixtable
    from musetwilight.io import formats as io
    from musetwilight.tools import eso

    sim = simulated_set(seed=1)
    image = io.read_muse_image(sim.files["MASTER_FLAT"][0], 1)
    image.header["BUNIT"] = "count"
    table = pixtable.build_pixtable(image, io.read_ifu_table(sim.files["TRACE_TABLE"][0], 1),
                                    io.read_ifu_table(sim.files["WAVECAL_TABLE"][0], 1),
                                    io.read_geometry_table(sim.files["GEOMETRY_TABLE"][0]), 1, "WFM-NOAO-N")
    path = eso.write_pixtable(tmp_path / "PIXTABLE.fits", table)
    theirs = mpdaf_drs.PixTable(str(path))
    ifu, slice_, x, y = eso.decode_origin(table.origin, table.header)
    np.testing.assert_array_equal(theirs.origin2ifu(theirs.get_origin()), ifu)
    np.testing.assert_array_equal(theirs.origin2slice(theirs.get_origin()), slice_)
    np.testing.assert_array_equal(theirs.origin2xpix(theirs.get_origin()) + 1, x)
    np.testing.assert_array_equal(theirs.origin2ypix(theirs.get_origin()) + 1, y)
    np.testing.assert_array_equal(theirs.get_lambda(), table.lambda_)
