"""ESO's muse_scibasic accepts our TWILIGHT_CUBE and applies it exactly as ESO's own."""

import numpy as np
import pytest
from parity import TWILIGHT_RTOL

from musetwilight import recipe
from musetwilight.io.frames import write_sof
from musetwilight.tools import eso
from musetwilight.tools.eso import read_pixtable

pytestmark = [pytest.mark.eso,
              pytest.mark.skipif(eso.esorex_path() is None, reason="ESO's esorex is not installed")]


def _scibasic(sim, twilight_cube, out):
    entries = [(sim.files["SKYFLAT"][0], "OBJECT")]
    entries += [(path, tag) for tag in ("MASTER_BIAS", "MASTER_FLAT", "TRACE_TABLE", "WAVECAL_TABLE",
                                        "GEOMETRY_TABLE") for path in sim.files[tag]]
    entries.append((twilight_cube, "TWILIGHT_CUBE"))
    out.mkdir()
    sof = write_sof(out / "scibasic.sof", entries)
    run = eso.run_esorex("muse_scibasic", sof, out, {"nifu": 1, "skylines": "", "crop": "false"})
    assert run.returncode == 0, run.errors
    return read_pixtable(run.product("PIXTABLE_OBJECT_0001-01.fits")), run


def test_scibasic_with_our_twilight_cube_equals_with_esos(simulated_set, eso_twilight, tmp_path):
    sim = simulated_set(seed=1)
    ref = eso_twilight({"seed": 1})
    ours = recipe.run(sim.sof, None, tmp_path / "ours")
    with_eso, _ = _scibasic(sim, ref.product("TWILIGHT_CUBE.fits"), tmp_path / "scibasic_eso")
    with_ours, run = _scibasic(sim, ours.paths["TWILIGHT_CUBE"], tmp_path / "scibasic_ours")
    assert not any("TWILIGHT" in w for w in run.warnings), run.warnings
    assert with_ours.nrow == with_eso.nrow
    np.testing.assert_array_equal(with_ours.dq, with_eso.dq)
    good = np.isfinite(with_eso.data) & (with_eso.data != 0)
    rel = np.abs(with_ours.data[good] / with_eso.data[good] - 1)
    # our TWILIGHT_CUBE is within TWILIGHT_RTOL of ESO's (tests/parity.py), and so is what it divides
    assert rel.max() <= 2 * TWILIGHT_RTOL, rel.max()
    # the correction was really applied: a cube of ones would leave the data unchanged
    assert "ESO DRS MUSE FLAT FLUX SKY" in with_ours.header
    assert with_ours.header["ESO DRS MUSE FLAT FLUX SKY"] == pytest.approx(
        ours.twilight_cube[0].header["ESO DRS MUSE FLAT FLUX SKY1"])
