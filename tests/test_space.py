"""Disk space (issue 17.1): scratch and product sizes estimated before any work, free space
checked in both places, and a disk that fills up anyway reported with nothing left behind.

Small file systems are tmpfs mounts (the ``small_filesystem`` fixture); the mini set's
three IFU tables take 6.7 MB of scratch space and its products 380 kB.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from musetwilight import recipe
from musetwilight.core.resample import ResampleOptions, resample_tables
from musetwilight.errors import OutputError, SpaceError
from musetwilight.io import space
from musetwilight.params import make_settings


@pytest.fixture(scope="module")
def mini(simulated_set):
    return simulated_set(seed=1)


def _listing(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("cut", [{}, {"lambdamin": 6000.0, "lambdamax": 7000.0}])
def test_scratch_estimate_matches_the_spilled_tables(mini, tmp_path, cut):
    settings = make_settings(cut)
    inputs = recipe.read_inputs(mini.sof, settings)
    estimated = space.ifu_rows(inputs, settings, mini.ifus)
    reductions = recipe.reduce_ifus(inputs, settings, "WFM-NOAO-N", recipe.RunOptions.resolve({}, workers=1),
                                    str(tmp_path), mini.ifus)
    for ifu, result in reductions.results.items():
        rows = result.table.nrow
        assert abs(estimated[ifu] - rows) <= 0.002 * rows, (ifu, estimated[ifu], rows)
        on_disk = sum(p.stat().st_size for p in tmp_path.glob(f"ifu{ifu:02d}.*.npy"))
        assert space.table_bytes(rows) == on_disk  # the spill code's files, byte for byte
    assert space.scratch_bytes(inputs, settings, mini.ifus) == sum(space.table_bytes(r) for r in estimated.values())


def test_product_estimate_bounds_the_written_products(mini, tmp_path):
    settings = make_settings()
    estimate = space.product_bytes(recipe.read_inputs(mini.sof, settings), settings, mini.ifus)
    result = recipe.run(mini.sof, settings, tmp_path / "out")
    written = sum(path.stat().st_size for path in result.paths.values())
    assert written <= estimate <= 1.5 * written, (estimate, written)


def test_scratch_directory_from_option_environment_or_tmpdir(mini, tmp_path):
    chosen, other = tmp_path / "scratch", tmp_path / "other"
    chosen.mkdir()
    other.mkdir()
    assert recipe.RunOptions.resolve({}).scratch_dir == space.Path(tempfile.gettempdir())
    assert recipe.RunOptions.resolve({space.SCRATCH_ENV: str(chosen)}).scratch_dir == chosen
    assert recipe.RunOptions.resolve({space.SCRATCH_ENV: str(other)}, scratch_dir=chosen).scratch_dir == chosen
    message = rf"^{tmp_path}/absent: the scratch directory \(from \$MUSETWILIGHT_SCRATCH_DIR\) does not exist"
    with pytest.raises(OutputError, match=message):
        recipe.RunOptions.resolve({space.SCRATCH_ENV: str(tmp_path / "absent")})
    seen = []

    def look(message):
        if message.startswith("resampling"):
            seen.extend(p.name for p in chosen.iterdir())
    recipe.run(mini.sof, None, None, low_memory=True, environ={space.SCRATCH_ENV: str(chosen)}, progress=look)
    assert len(seen) == 1 and seen[0].startswith("musetwilight-spill-")  # used while the tables are needed
    assert _listing(chosen) == []  # and removed after


def test_scratch_too_small_fails_before_any_work(mini, tmp_path, small_filesystem):
    scratch = small_filesystem("5M")
    stages = []
    with pytest.raises(SpaceError) as info:
        recipe.run(mini.sof, None, tmp_path / "out", low_memory=True, scratch_dir=scratch, progress=stages.append)
    assert str(info.value) == (f"{scratch}: not enough free space for the IFU tables (scratch space): "
                               "about 7.0 MB needed, 5.2 MB free")
    assert stages == []  # not one IFU was reduced
    assert _listing(scratch) == [] and _listing(tmp_path / "out") == []


def test_scratch_running_out_anyway_is_reported_and_cleaned_up(mini, tmp_path, small_filesystem, monkeypatch):
    """When the estimate is wrong (here: made 0) the write that fails says so and the tables go."""
    scratch = small_filesystem("5M")
    monkeypatch.setattr(space, "scratch_bytes", lambda *args: 0)
    with pytest.raises(SpaceError) as info:
        recipe.run(mini.sof, None, tmp_path / "out", low_memory=True, scratch_dir=scratch, workers=1)
    assert str(info.value).startswith(f"{scratch}: ran out of space while writing the IFU tables (scratch space) "
                                      "(no space left, ")
    assert str(info.value).endswith("; the partial files were removed")
    assert isinstance(info.value.__cause__, OSError)  # NumPy's short write or ENOSPC, kept as the cause
    assert _listing(scratch) == [] and _listing(tmp_path / "out") == []


def test_output_too_small_fails_before_any_work(mini, small_filesystem):
    out = small_filesystem("300k") / "out"
    stages = []
    with pytest.raises(SpaceError) as info:
        recipe.run(mini.sof, None, out, progress=stages.append)
    # 300k of tmpfs less the page of the lock file
    assert str(info.value) == f"{out}: not enough free space for the products: about 532 kB needed, 303 kB free"
    assert stages == [] and _listing(out) == []


def test_output_running_out_anyway_leaves_nothing(mini, tmp_path, small_filesystem, monkeypatch):
    """A 300 kB tmpfs holds DATACUBE_SKYFLAT (236 kB) but not also TWILIGHT_CUBE (144 kB)."""
    out = small_filesystem("300k") / "out"
    monkeypatch.setattr(space, "product_bytes", lambda *args: 0)
    with pytest.raises(SpaceError) as info:
        recipe.run(mini.sof, None, out)
    assert str(info.value).startswith(f"{out}: ran out of space while writing the products (no space left, ")
    assert _listing(out) == []  # no product, temporary file, lock or record
    assert sorted(recipe.run(mini.sof, None, tmp_path / "roomy").paths) == ["DATACUBE_SKYFLAT", "TWILIGHT_CUBE"]


def test_cli_scratch_dir_option(mini, tmp_path):
    done = subprocess.run([sys.executable, "-m", "musetwilight", "run", f"--scratch-dir={tmp_path / 'absent'}",
                           f"--output-dir={tmp_path / 'out'}", str(mini.sof)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert f"{tmp_path / 'absent'}: the scratch directory does not exist or is not a directory" in done.stderr
    assert "Traceback" not in done.stderr and "reduced (" not in done.stderr and not (tmp_path / "out").exists()


def test_each_spilled_table_is_removed_when_the_resampling_is_done_with_it(mini, tmp_path):
    settings = make_settings()
    inputs = recipe.read_inputs(mini.sof, settings)
    reductions = recipe.reduce_ifus(inputs, settings, "WFM-NOAO-N", recipe.RunOptions.resolve({}, workers=1),
                                    str(tmp_path), mini.ifus)
    tables = [reductions.results[ifu].table for ifu in sorted(reductions.results)]
    assert len(list(tmp_path.glob("*.npy"))) == 6 * len(tables)
    in_memory = [SimpleNamespace(**vars(table.load()), nrow=table.nrow) for table in tables]
    grid = recipe._cube_grid(tables, settings.dlambda)
    options = ResampleOptions.from_settings(settings)
    rows_per_tile = sum(t.nrow for t in tables) // 5
    tiled = resample_tables(list(tables), [1.0] * len(tables), grid, options, rows_per_tile)
    assert list(tmp_path.glob("*.npy")) == []  # each table's files went after its last tile
    whole = resample_tables(in_memory, [1.0] * len(tables), grid, options)
    for name in ("data", "stat", "dq"):
        np.testing.assert_array_equal(getattr(tiled, name), getattr(whole, name))
