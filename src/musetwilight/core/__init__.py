"""The reduction stages: plain functions on NumPy arrays and small dataclasses, no file I/O.

images (containers), detector (raw CCD geometry), overscan, basicproc (bias, gain, dark,
flat, bad pixels), combine (exposures, QC, bad-pixel interpolation), pixtable, illum (ILLUM
correction), fluxscale (IFU flux scaling), pixgrid and resample (the cube), cube (grid,
white light), smooth (TWILIGHT_CUBE), cplmath (CPL's arithmetic).

The hot loops are Numba kernels, compiled for this machine the first time a run needs
them and cached; that first compilation is announced once (it takes some seconds).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("musetwilight")
_announced = threading.Event()


def _announce_compilation() -> None:
    """Log once, when Numba starts compiling one of our kernels (first run on a machine only)."""
    try:
        from numba.core import event
    except ImportError:  # an older Numba without the event API: nothing to announce
        return

    class _FirstCompilation(event.Listener):
        def on_start(self, ev) -> None:
            dispatcher = ev.data.get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "")
            if module.startswith("musetwilight") and not _announced.is_set():
                _announced.set()
                log.info("compiling the numerical kernels for this machine (first run only, some seconds)")

        def on_end(self, ev) -> None:
            pass

    event.register("numba:compile", _FirstCompilation())


_announce_compilation()
