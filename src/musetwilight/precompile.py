"""Compiling the late stages' kernels in a second process while the first run reduces its IFUs.

A run on a machine whose Numba cache is cold compiles every kernel it needs once (seconds
each; cached afterwards).  Compilation is single-threaded and holds the interpreter, so the
run compiles one kernel after another.  :func:`start` launches ``python -m
musetwilight.precompile`` when the resampling and smoothing kernels are not cached yet: that
process resamples and smooths a small synthetic pixel table with the run's settings, which
compiles (and caches) exactly the kernels and signatures those stages use, on the other core,
while the run compiles and runs the per-IFU stage.  The run waits for it before it resamples,
then loads the kernels from the cache.  The products do not depend on it (the same code
compiled by either process); if it fails, the run compiles the kernels itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from .instrument import SPECTRAL_SAMPLING
from .params import Settings, make_settings

log = logging.getLogger("musetwilight.precompile")

DISABLE_ENV = "MUSETWILIGHT_NO_PRECOMPILE"  # set (non-empty) to compile everything in the run itself
WAIT_SECONDS = 300.0


def late_kernels() -> list:
    """The Numba dispatchers of the resampling and smoothing stages."""
    from .core import pixgrid, resample, smooth

    return [resample._weighted, resample._crreject, pixgrid._scatter_rows, smooth._median_filter]


def _is_cached(dispatcher) -> bool:
    """Whether the dispatcher is compiled in this process or has an index in Numba's cache
    (anything but a Numba dispatcher, e.g. a test's stand-in, needs no compiling)."""
    if getattr(dispatcher, "signatures", True):
        return True
    index = getattr(getattr(getattr(dispatcher, "_cache", None), "_cache_file", None), "_index_path", None)
    return index is None or os.path.exists(index)


@dataclass
class Precompilation:
    """The compiling process (None when nothing needs compiling)."""

    process: subprocess.Popen | None

    def wait(self) -> None:
        """Wait until the kernels are cached (or the process failed: then the run compiles them)."""
        if self.process is None:
            return
        try:
            code = self.process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        if code != 0:
            log.debug("the precompiling process ended with %s; compiling in the run", code)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def start(settings: Settings, mode: str, vignetting: bool) -> Precompilation:
    """Start compiling the late stages' kernels in another process, if they are not cached."""
    if os.environ.get(DISABLE_ENV) or all(_is_cached(kernel) for kernel in late_kernels()):
        return Precompilation(None)
    command = [sys.executable, "-m", "musetwilight.precompile", json.dumps(settings.texts()), mode,
               "1" if vignetting else "0"]
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    except OSError as err:
        log.debug("cannot start the precompiling process (%s); compiling in the run", err)
        return Precompilation(None)
    return Precompilation(process)


def exercise_late_stages(settings: Settings, mode: str, vignetting: bool) -> None:
    """Resample and smooth a small synthetic pixel table with ``settings`` (float32 columns,
    uint32 DQ, as the pixel tables), so that every kernel those stages call gets compiled."""
    from astropy.io import fits

    from .core.cube import grid_from_limits, white_light
    from .core.pixtable import PixTable
    from .core.resample import ResampleOptions, resample_tables
    from .core.smooth import postprocess

    rng = np.random.default_rng(1)
    nrow, half, nplanes = 60_000, 15.0, 3
    dlambda = settings.dlambda or SPECTRAL_SAMPLING
    xpos = rng.uniform(-half, half, nrow).astype(np.float32)
    ypos = rng.uniform(-half, half, nrow).astype(np.float32)
    lambda_ = rng.uniform(6000.0, 6000.0 + (nplanes - 1) * dlambda, nrow).astype(np.float32)
    data = (1000.0 + rng.normal(0.0, 10.0, nrow)).astype(np.float32)
    stat = np.full(nrow, 1000.0, np.float32)
    dq = np.zeros(nrow, np.uint32)
    table = PixTable(xpos, ypos, lambda_, data, stat, dq, None, fits.Header())
    grid = grid_from_limits(xpos.min(), xpos.max(), ypos.min(), ypos.max(), lambda_.min(), lambda_.max(), dlambda)
    cube = resample_tables([table], [1.0], grid, ResampleOptions.from_settings(settings), None)
    mask = None
    if vignetting:
        mask = np.zeros(cube.data.shape[1:], bool)
        mask[:10, :10] = True
    postprocess(cube.data, settings, mode, white=white_light(cube.data), vignetting_mask=mask)


def main(argv: list[str]) -> int:
    settings_text, mode, vignetting = argv
    exercise_late_stages(make_settings(json.loads(settings_text)), mode, vignetting == "1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
