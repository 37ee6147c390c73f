"""Session-wide test data: simulated MUSE sets and ESO reference runs, made once and shared.

``simulated_set(**options)`` returns a :class:`musetwilight.simulate.SimulatedSet`
written under a session temporary directory, cached by its options (the keyword
arguments of ``simulate_dataset``).  ``eso_twilight(options, params=None, env=None)``
reduces that set with ESO's ``esorex muse_twilight`` once per (options, params, env)
and returns the :class:`musetwilight.eso.EsoRun`; tests using it are skipped where
esorex is not installed.  ``eso_recipe(recipe, options, params, env, retag)`` does the same
for any recipe, with frame tags renamed by ``retag`` (e.g. ``{"SKYFLAT": "OBJECT"}`` to get
ESO's intermediate products from ``muse_scibasic``).

ESO's pipeline must be esorex 3.13.x with exactly the MUSE plugins muse-2.8.7.  Where it is
missing or another version, the tests that need it (marked ``eso``, or using the ESO fixtures)
are skipped with the reason; in CI (environment variable CI=true) they fail instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from musetwilight.tools import eso
from musetwilight.tools.simulate import simulate_dataset

ESOREX_SERIES = "3.13."
ESO_PLUGIN = "muse-2.8.7"


@functools.cache
def eso_problem() -> str | None:
    """Why ESO's pipeline cannot serve as the reference here (missing, other version), or None."""
    exe = eso.esorex_path()
    if exe is None:
        return "esorex (ESO MUSE pipeline) is not installed"
    try:
        text = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"esorex --version failed: {err}"
    found = re.search(r"version\s+(\d+\.\d+\.\d+)", text)
    if not found or not found[1].startswith(ESOREX_SERIES):
        return f"esorex reports version {found[1] if found else '(none)'}, the tests need {ESOREX_SERIES}x"
    plugins = eso.plugin_dir()
    muse = sorted(p.name for p in Path(plugins).glob("muse-*")) if plugins else []
    if muse != [ESO_PLUGIN]:
        return f"MUSE plugins {', '.join(muse) or '(none)'} in {plugins}, the tests need exactly {ESO_PLUGIN}"
    return None


def skip_or_fail_without_eso() -> None:
    """Skip the test if ESO's pipeline is unusable; in CI (CI=true) fail it instead."""
    problem = eso_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem}; CI=true requires ESO's pipeline (apt-get install esorex cpl-plugin-muse, "
                    f"see .ci/run)", pytrace=False)
    pytest.skip(problem)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked ``eso``: checked before their own skipif markers, so that CI fails rather than skips."""
    if item.get_closest_marker("eso") is not None:
        skip_or_fail_without_eso()


@pytest.fixture(scope="session")
def eso_installation():
    """Session-level check of ESO's pipeline (esorex 3.13.x, plugins muse-2.8.7)."""
    skip_or_fail_without_eso()
    return eso.esorex_path()


def _key(mapping) -> str:
    return json.dumps(mapping or {}, sort_keys=True, default=str)


def _name(prefix: str, *keys: str) -> str:
    return f"{prefix}_{hashlib.sha1('|'.join(keys).encode()).hexdigest()[:12]}"


@pytest.fixture(scope="session")
def simulation_root(tmp_path_factory):
    """Session directory holding every simulated set and ESO run."""
    return tmp_path_factory.mktemp("musetwilight_sim")


@pytest.fixture(scope="session")
def simulated_set(simulation_root):
    """Factory: ``simulated_set(**options)`` -> SimulatedSet, generated once per options."""
    cache = {}

    def factory(**options):
        key = _key(options)
        if key not in cache:
            cache[key] = simulate_dataset(simulation_root / _name("set", key), **options)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def eso_twilight(simulated_set, simulation_root, eso_installation):
    """Factory: ``eso_twilight(options, params=None, env=None)`` -> EsoRun of ESO's muse_twilight."""
    cache = {}

    def run(options: dict | None = None, params: dict | None = None, env: dict | None = None):
        key = (_key(options), _key(params), _key(env))
        if key not in cache:
            sim = simulated_set(**(options or {}))
            cache[key] = eso.run_esorex("muse_twilight", sim.sof, simulation_root / _name("eso", *key),
                                        params, env=env)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def eso_recipe(simulated_set, simulation_root, eso_installation):
    """Factory: ``eso_recipe(recipe, options=None, params=None, env=None, retag=None)`` -> EsoRun.

    Runs any ESO MUSE recipe on a simulated set once per arguments; ``retag`` maps SOF tags to
    new ones (tags mapped to None are dropped), e.g. ``{"SKYFLAT": "OBJECT"}`` for muse_scibasic.
    """
    cache = {}

    def run(recipe: str, options: dict | None = None, params: dict | None = None, env: dict | None = None,
            retag: dict | None = None):
        key = (recipe, _key(options), _key(params), _key(env), _key(retag))
        if key not in cache:
            sim = simulated_set(**(options or {}))
            out = simulation_root / _name("eso", *key)
            out.mkdir(parents=True, exist_ok=True)
            sof = sim.sof
            if retag:
                lines = []
                for line in sim.sof.read_text().splitlines():
                    path, tag = line.rsplit(" ", 1)
                    tag = retag.get(tag, tag)
                    if tag:
                        lines.append(f"{path} {tag}\n")
                sof = out / "input.sof"
                sof.write_text("".join(lines))
            cache[key] = eso.run_esorex(recipe, sof, out, params, env=env)
        return cache[key]

    return run


class SmallFilesystems:
    """Fresh tmpfs mounts under a test's directory: ``mount(size)`` ("5M", "300k") returns the
    mount point, ``read_only(point)`` remounts it read-only, ``unmount_all()`` cleans up."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.mounts: list[Path] = []

    def __call__(self, size: str) -> Path:
        point = self.directory / f"tmpfs{len(self.mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
        self.mounts.append(point)
        return point

    def read_only(self, point: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)

    def unmount_all(self) -> None:
        for point in reversed(self.mounts):
            subprocess.run(["umount", str(point)], check=False, capture_output=True)
        self.mounts.clear()


@pytest.fixture
def small_filesystem(tmp_path):
    """A :class:`SmallFilesystems` for the test; every mount is removed afterwards."""
    filesystems = SmallFilesystems(tmp_path)
    yield filesystems
    filesystems.unmount_all()
