"""The errors a reduction can end with, by kind.

Data problems (a broken or inconsistent input, a fit that the data cannot support)
are :class:`MuseTwilightError` subclasses: the recipe reports them with their
message, which names the file and the problem, and an IFU whose data fail is
skipped as ESO skips it.  Anything else (an ``IndexError`` inside NumPy, say) is
a bug and propagates.  Problems with the output or scratch directory are
:class:`OutputError` (also an ``OSError``), with a sentence naming the directory.
"""

from __future__ import annotations


class MuseTwilightError(Exception):
    """A reduction cannot go on; the message says why, naming the file where there is one."""


class ParameterError(MuseTwilightError):
    """An invalid recipe parameter name, type or value, or parameters that contradict each other."""


class InputError(MuseTwilightError):
    """An invalid, incomplete or inconsistent input file."""


class OverscanError(InputError):
    """Raw overscan levels incompatible with the MASTER_BIAS (overscan=vpoly)."""


class FitError(MuseTwilightError):
    """A polynomial fit that CPL would refuse (too few points, singular equations)."""


class MergeError(MuseTwilightError):
    """The IFUs' pixel tables cannot be combined into a cube."""


class MemoryLimitError(MuseTwilightError, MemoryError):
    """The set cannot be reduced within the memory this process may use (found before any work)."""


class OutputError(MuseTwilightError, OSError):
    """The output or scratch directory cannot take the run's files (cannot be made, not writable)."""


class SpaceError(OutputError):
    """Not enough free space for the products or the scratch files (found before the run, or while writing)."""


class BusyError(OutputError):
    """Another run is writing into the same output directory."""


def os_error_reason(err: OSError) -> str:
    """What went wrong, without the path, as part of a sentence: "read-only file system"."""
    reason = err.strerror or str(err)
    return reason[:1].lower() + reason[1:]


def os_error_text(err: OSError | MuseTwilightError) -> str:
    """An OSError as a sentence naming its path ("DIR: read-only file system"), never "[Errno 30] ..."."""
    if isinstance(err, MuseTwilightError) or err.strerror is None:
        return str(err)
    reason = os_error_reason(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason
