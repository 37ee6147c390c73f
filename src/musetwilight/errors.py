"""The errors a reduction can end with, by kind.

Data problems (a broken or inconsistent input, a fit that the data cannot support)
are :class:`MuseTwilightError` subclasses: the recipe reports them with their
message, which names the file and the problem, and an IFU whose data fail is
skipped as ESO skips it.  Anything else (an ``IndexError`` inside NumPy, say) is
a bug and propagates.
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
