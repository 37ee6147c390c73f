"""python-cpl compatibility beyond Recipe: cpl.esorex, Recipe.path/list/version, threaded calls, env,
CplError for every failure."""

from __future__ import annotations

import logging

import pytest

from musetwilight import cpl


@pytest.fixture
def root_logging():
    """Leave the root logger's handlers and level as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for logger in (cpl.esorex.msg, cpl.esorex.log):
        logger._close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_load_sof_and_load_rc(tmp_path):
    sof = tmp_path / "t.sof"
    sof.write_text("# comment\n/a/1.fits SKYFLAT\n/a/2.fits SKYFLAT\n\n/a/b.fits MASTER_BIAS CALIB\n")
    assert cpl.esorex.load_sof(str(sof)) == {"SKYFLAT": ["/a/1.fits", "/a/2.fits"], "MASTER_BIAS": "/a/b.fits"}
    assert cpl.esorex.load_sof("x.fits SKYFLAT\ny.fits ILLUM") == {"SKYFLAT": "x.fits", "ILLUM": "y.fits"}
    rc = tmp_path / "t.rc"
    rc.write_text("# c\nmuse.muse_twilight.lambdamin = 5500.\n\nmuse.muse_twilight.resample=nearest\nnovalue=\n")
    assert cpl.esorex.load_rc(str(rc)) == {"muse.muse_twilight.lambdamin": "5500.",
                                           "muse.muse_twilight.resample": "nearest"}
    recipe = cpl.Recipe("muse_twilight")
    recipe.param = cpl.esorex.load_rc(str(rc))
    assert recipe.param.lambdamin.value == 5500.0 and recipe.param.resample.value == "nearest"
    with pytest.raises(KeyError, match="SKYFLAT"):
        recipe.calib = cpl.esorex.load_sof(str(sof))


def test_init_from_esorex_rc_sets_path_and_logging(tmp_path, monkeypatch, root_logging):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '.*/\.esorex/esorex\.rc'"):
        cpl.esorex.init()
    (tmp_path / ".esorex").mkdir()
    (tmp_path / ".esorex" / "esorex.rc").write_text(
        "esorex.caller.recipe-dir=/opt/a:/opt/b\nesorex.caller.msg-level=warning\nesorex.caller.log-level=debug\n"
        f"esorex.caller.log-dir={tmp_path}\nesorex.caller.log-file=r.log\n")
    cpl.esorex.init()
    assert cpl.Recipe.path == ["/opt/a", "/opt/b"]
    assert cpl.esorex.msg.level == logging.WARNING and cpl.esorex.log.level == logging.DEBUG
    assert cpl.esorex.log.format == "%(asctime)s [%(levelname)7s][%(threadName)s] %(name)s: %(message)s"
    assert cpl.esorex.msg.format == "[%(levelname)7s] %(message)s"
    logging.getLogger("cpl.muse_twilight.f").debug("hello")
    cpl.esorex.log.filename = None
    assert (tmp_path / "r.log").read_text().endswith("[  DEBUG][MainThread] cpl.muse_twilight.f: hello\n")
    cpl.esorex.msg.level = "off"
    assert cpl.esorex.msg.handler is None
    monkeypatch.setattr(cpl.Recipe, "path", ["/usr/lib/x86_64-linux-gnu/cpl/plugins", "/usr/lib/cpl/plugins"])


def test_recipe_list_version_and_errors(simulated_set, tmp_path):
    assert cpl.Recipe.list() == [("muse_twilight", ["2.8.7"])]
    recipe = cpl.Recipe("muse_twilight", version="2.8.7")
    assert recipe.version == (20807, "2.8.7") and recipe.__version__ == "2.8.7"
    assert recipe.__file__.endswith("recipe.py") and cpl.Recipe.get_recipefilename("muse_bias") is None
    with pytest.raises(OSError, match="wrong version"):
        cpl.Recipe("muse_twilight", version="2.6")
    with pytest.raises(cpl.CplError, match="unknown parameter 'bogus'"):
        recipe(["a.fits"], param={"bogus": 1})
    with pytest.raises(cpl.CplError, match="lambdamax .* must be larger than lambdamin"):
        recipe(["a.fits"], param={"lambdamin": 9500.0})
    with pytest.raises(cpl.CplError, match="No raw frames"):
        recipe([])
    sim = simulated_set()
    recipe.calib = {tag: str(paths[0]) for tag, paths in sim.files.items() if tag != "SKYFLAT"}
    late = recipe([str(p) for p in sim.files["SKYFLAT"][:2]], threaded=True)
    with pytest.raises(cpl.CplError, match="needs at least 3 SKYFLAT frames"):
        late.tags
    done = recipe([str(p) for p in sim.files["SKYFLAT"]], threaded=True, output_dir=str(tmp_path),
                  env={"OMP_NUM_THREADS": "1"})
    assert done["TWILIGHT_CUBE"] == str(tmp_path / "TWILIGHT_CUBE.fits") and done.stat.return_code == 0
