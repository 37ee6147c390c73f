"""Session-wide test data: simulated MUSE sets and ESO reference runs, made once and shared.

``simulated_set(**options)`` returns a :class:`musetwilight.simulate.SimulatedSet`
written under a session temporary directory, cached by its options (the keyword
arguments of ``simulate_dataset``).  ``eso_twilight(options, params=None, env=None)``
reduces that set with ESO's ``esorex muse_twilight`` once per (options, params, env)
and returns the :class:`musetwilight.eso.EsoRun`; tests using it are skipped where
esorex is not installed.  ``eso_recipe(recipe, options, params, env, retag)`` does the same
for any recipe, with frame tags renamed by ``retag`` (e.g. ``{"SKYFLAT": "OBJECT"}`` to get
ESO's intermediate products from ``muse_scibasic``).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from musetwilight.tools import eso
from musetwilight.tools.simulate import simulate_dataset


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
def eso_twilight(simulated_set, simulation_root):
    """Factory: ``eso_twilight(options, params=None, env=None)`` -> EsoRun of ESO's muse_twilight."""
    if eso.esorex_path() is None:
        pytest.skip("esorex (ESO MUSE pipeline) is not installed")
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
def eso_recipe(simulated_set, simulation_root):
    """Factory: ``eso_recipe(recipe, options=None, params=None, env=None, retag=None)`` -> EsoRun.

    Runs any ESO MUSE recipe on a simulated set once per arguments; ``retag`` maps SOF tags to
    new ones (tags mapped to None are dropped), e.g. ``{"SKYFLAT": "OBJECT"}`` for muse_scibasic.
    """
    if eso.esorex_path() is None:
        pytest.skip("esorex (ESO MUSE pipeline) is not installed")
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
