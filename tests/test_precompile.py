"""The first run's second compiling process (musetwilight.precompile): it must compile exactly
the kernels and signatures the run's resampling and smoothing then load, and never change a
product or outlive the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from musetwilight import precompile, recipe
from musetwilight.instrument import is_nfm
from musetwilight.params import make_settings

# a run on a set, in a fresh process, printing the kernels it had to compile itself
RUN_AND_LIST_COMPILED = textwrap.dedent("""
    import json, sys
    from numba.core import event
    compiled = []
    class Listener(event.Listener):
        def on_start(self, ev):
            function = ev.data["dispatcher"].py_func
            compiled.append(function.__module__ + "." + function.__qualname__)
        def on_end(self, ev):
            pass
    event.register("numba:compile", Listener())
    from musetwilight import recipe
    recipe.run(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
    print(json.dumps(sorted(set(compiled))))
""")

LATE_MODULES = ("musetwilight.core.resample.", "musetwilight.core.pixgrid.", "musetwilight.core.smooth.")


@pytest.mark.slow
@pytest.mark.parametrize("params", [{}, {"resample": "nearest", "crtype": "mean"}])
def test_precompiled_kernels_are_the_ones_the_run_loads(simulated_set, tmp_path, params):
    sim = simulated_set(scale="mini", seed=3)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), precompile.DISABLE_ENV: "1"}
    settings = make_settings(params)
    inputs = recipe.read_inputs(sim.sof, settings)
    mode = recipe.instrument_mode(inputs.skyflats[0])
    vignetting = "1" if inputs.vignetting and not is_nfm(mode) else "0"
    subprocess.run([sys.executable, "-m", "musetwilight.precompile", json.dumps(settings.texts()), mode, vignetting],
                   env=env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST_COMPILED, str(sim.sof), json.dumps(params),
                           str(tmp_path / "out")], env=env, check=True, capture_output=True, text=True)
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(name.startswith("musetwilight.core.combine.") for name in compiled)  # the run compiles its own
    assert [name for name in compiled if name.startswith(LATE_MODULES)] == []


def test_nothing_starts_when_the_kernels_are_cached_or_it_is_switched_off(monkeypatch):
    settings = make_settings({})
    precompile.exercise_late_stages(settings, "WFM-NOAO-N", False)  # compiled (or loaded) in this process
    assert precompile.start(settings, "WFM-NOAO-N", True).process is None
    monkeypatch.setenv(precompile.DISABLE_ENV, "1")
    monkeypatch.setattr(precompile, "_is_cached", lambda dispatcher: False)
    assert precompile.start(settings, "WFM-NOAO-N", True).process is None


def test_a_cold_run_starts_it_waits_for_it_and_gives_the_same_products(simulated_set, tmp_path, monkeypatch):
    sim = simulated_set(scale="mini", seed=3)
    reference = recipe.run(sim.sof, None, None)
    started = []
    real_start = precompile.start

    def cold_start(settings, mode, vignetting):
        monkeypatch.setattr(precompile, "_is_cached", lambda dispatcher: False)
        handle = real_start(settings, mode, vignetting)
        started.append(handle.process)
        return handle

    monkeypatch.setattr(precompile, "start", cold_start)
    result = recipe.run(sim.sof, None, None)
    assert started and started[0] is not None
    assert started[0].returncode == 0  # waited for before the resampling, and it succeeded
    for tag, hdul in reference.hdulists().items():
        for ours, theirs in zip(result.hdulists()[tag], hdul):
            if ours.data is not None:
                np.testing.assert_array_equal(ours.data, theirs.data)


def test_a_failing_or_hanging_compiler_is_stopped_and_the_run_goes_on(monkeypatch):
    hanging = precompile.Precompilation(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    monkeypatch.setattr(precompile, "WAIT_SECONDS", 0.5)
    hanging.wait()
    assert hanging.process is None
    failing = precompile.Precompilation(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    failing.wait()
    assert failing.process is None
    stopped = precompile.Precompilation(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    process = stopped.process
    stopped.stop()
    assert process.poll() is not None
