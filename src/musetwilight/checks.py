"""Pre-flight validation of a run's inputs: fail fast, naming the file and the problem.

Called by the recipe before any IFU is processed, so that a broken input stops the
run before any work is done (and long before any product could be written).
"""

from __future__ import annotations

from .frames import InputError
from .params import Settings


def preflight(inputs, settings: Settings) -> None:
    """Check that every input file is a readable FITS file of the kind its tag needs."""
    from . import io

    for frame in inputs.frames:
        try:
            io.read_header(frame.path, 0)
        except InputError:
            raise
        except (OSError, ValueError) as err:
            raise InputError(f"{frame.path}: {frame.tag} is not a readable FITS file ({err})") from None
