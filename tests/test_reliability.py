"""Failures leave no product behind and explain themselves; runs are deterministic."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from musetwilight import recipe
from musetwilight.errors import MergeError, ParameterError
from musetwilight.params import make_settings


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


COMPLETE = [".musetwilight-products.json", "DATACUBE_SKYFLAT.fits", "TWILIGHT_CUBE.fits"]  # products and record


def _products(directory):
    """Everything in an output directory (lock and temporary files included)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_no_pixels_in_wavelength_range_is_a_clear_error(mini, tmp_path):
    with pytest.raises(MergeError, match="no pixels for cube reconstruction"):
        recipe.run(mini.sof, {"lambdamin": 9950, "lambdamax": 9990}, tmp_path / "out")
    assert _products(tmp_path / "out") == []


def test_inconsistent_parameters_rejected_before_any_work(mini, tmp_path):
    with pytest.raises(ParameterError, match="lambdamax .* must be larger than lambdamin"):
        recipe.run(mini.sof, {"lambdamin": 8000, "lambdamax": 7000}, tmp_path / "out")
    assert _products(tmp_path / "out") == []


def test_unwritable_output_directory(mini, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file_not_dir"
        target.write_text("x")
        with pytest.raises(OSError):
            recipe.run(mini.sof, None, target / "out")
        return
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    with pytest.raises(PermissionError, match="not writable"):
        recipe.run(mini.sof, None, out)
    assert _products(out) == []


def test_existing_products_replaced_whole_and_runs_are_deterministic(mini, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "DATACUBE_SKYFLAT.fits").write_text("old content")
    first = recipe.run(mini.sof, make_settings(), out, workers=1)
    assert _products(out) == COMPLETE
    again = recipe.run(mini.sof, make_settings(), None, workers=2)
    for name in ("DATACUBE_SKYFLAT", "TWILIGHT_CUBE"):
        stored = fits.open(out / f"{name}.fits", checksum=True)
        fresh = getattr(again, name.lower())
        big_endian = fresh["DATA"].data.astype(">f4").tobytes()
        assert stored["DATA"].data.astype(">f4").tobytes() == big_endian
    assert first.datacube_skyflat[0].header["DATAMD5"] == fits.getval(out / "DATACUBE_SKYFLAT.fits", "DATAMD5")


def test_sigint_and_sigterm_leave_nothing_and_next_run_succeeds(mini, tmp_path):
    out = tmp_path / "out"
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen([sys.executable, "-m", "musetwilight", "run", f"--output-dir={out}",
                                    str(mini.sof)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:  # signal as soon as the first IFU is done
            if "reduced (" in line:
                break
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:
            pytest.skip("the run finished before the signal arrived")
        assert process.returncode in (130, 128 + sig, -sig), err
        assert _products(out) == [], _products(out)
    completed = subprocess.run([sys.executable, "-m", "musetwilight", "-q", "run", f"--output-dir={out}",
                                str(mini.sof)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert _products(out) == COMPLETE


@pytest.mark.parametrize("option, message", [
    ("--resample=bicubic", "not one of nearest, linear"),
    ("--xorder=two", "is not an integer"),
    ("--lambdamax=4000", "must be larger than lambdamin"),
])
def test_cli_rejects_invalid_parameters(mini, tmp_path, option, message):
    completed = subprocess.run([sys.executable, "-m", "musetwilight", "run", option,
                                f"--output-dir={tmp_path}", str(mini.sof)], capture_output=True, text=True)
    assert completed.returncode == 1 and message in completed.stderr
    assert _products(tmp_path) == []


def test_empty_plane_takes_the_fit_of_its_neighbour(simulated_set, caplog):
    """A plane without spaxels (NaD notch, nearest) has no fit of its own; ESO truncates the cube there."""
    sim = simulated_set(seed=3, mode="NFM-AO-N", ifus=[1, 22, 23, 24])
    result = recipe.run(sim.sof, {"resample": "nearest"}, None)
    sky, twilight = result.datacube_skyflat["DATA"].data, result.twilight_cube["DATA"].data
    assert not np.isfinite(sky[4]).any() and twilight.shape == sky.shape
    np.testing.assert_array_equal(twilight[4], twilight[3])
    assert np.isfinite(twilight).all()
    assert "plane 5 (6000.0 Angstrom) cannot be smoothed" in caplog.text
    assert "using the fit of plane 4" in caplog.text


def test_low_memory_mode_gives_identical_products(mini):
    """Tables spilled to disk and banded resampling (the full-size default) change nothing."""
    normal = recipe.run(mini.sof, None, None, low_memory=False)
    spilled = recipe.run(mini.sof, None, None, low_memory=True)
    for name in ("datacube_skyflat", "twilight_cube"):
        for ours, theirs in zip(getattr(normal, name), getattr(spilled, name)):
            if ours.data is not None:
                np.testing.assert_array_equal(ours.data, theirs.data)
    assert normal.datacube_skyflat[0].header["ESO DRS MUSE FLAT FLUX SKY2"] == \
        spilled.datacube_skyflat[0].header["ESO DRS MUSE FLAT FLUX SKY2"]
