"""The parity levels with ESO, in one place: what is bit-identical, what is not and why.

* bit-identical (asserted exactly, NaN positions included): DATACUBE_SKYFLAT (DATA, STAT,
  white) for every kernel and cosmic-ray statistic, the pixel-table columns, the processed and
  combined CCD images with their DQ, the TWILIGHT_CUBE DQ extensions;
* TWILIGHT_CUBE values: within ``TWILIGHT_RTOL`` relative.  ESO's per-plane and vignetting
  polynomial fits (CPL's matrix code) sum their normal equations in another float order than
  ours, which moves values near 1 by 1-4 float32 ulps; measured at most 4.2e-7 relative over
  the stored reference cases (tests/reference, nfm the worst);
* header numbers (QC, DRS MUSE FLAT FLUX, ...): written as CPL writes them, our values give
  exactly the digits ESO wrote (:func:`same_card_value`).
"""

from __future__ import annotations

import decimal
import re

import numpy as np
from astropy.io import fits

TWILIGHT_RTOL = 1e-6


def describe(ref: np.ndarray, ours: np.ndarray) -> str:
    """How two arrays differ (for assertion messages)."""
    a, b = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    if a.shape != b.shape:
        return f"shapes differ: ESO {a.shape}, ours {b.shape}"
    nan = np.isnan(a) != np.isnan(b)
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[finite] - b[finite])
    rel = diff / np.maximum(np.abs(a[finite]), 1e-30)
    return (f"{np.count_nonzero(diff)} of {a.size} values differ (max abs {diff.max(initial=0):.3g}, "
            f"max rel {rel.max(initial=0):.3g}), NaN positions differ at {np.count_nonzero(nan)}")


def assert_bit_identical(ref: np.ndarray, ours: np.ndarray, what: str = "") -> None:
    """Same shape, same values bit for bit (NaN where ESO has NaN)."""
    ref, ours = np.asarray(ref), np.asarray(ours)
    assert ref.shape == ours.shape, f"{what}: {describe(ref, ours)}"
    same = (ref == ours) | (np.isnan(ref) & np.isnan(ours)) if ref.dtype.kind == "f" else ref == ours
    assert same.all(), f"{what}: {describe(ref, ours)}"


def assert_twilight_close(ref: np.ndarray, ours: np.ndarray, what: str = "") -> float:
    """Same NaN positions, values within TWILIGHT_RTOL (see the module docstring); returns the max."""
    a, b = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: {describe(a, b)}"
    finite = np.isfinite(a)
    rel = np.abs(a[finite] - b[finite]) / np.maximum(np.abs(a[finite]), 1e-30)
    worst = float(rel.max(initial=0))
    assert worst <= TWILIGHT_RTOL, f"{what}: {describe(a, b)}"
    return worst


_VALUE = re.compile(r"^\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][-+]?\d+)?)\s*(?:/|$)")


def written_value(card: fits.Card) -> decimal.Decimal:
    """The number exactly as ESO wrote it into the card."""
    match = _VALUE.match(card.image.split("=", 1)[1])
    assert match, f"cannot read the written value of {card.image!r}"
    return decimal.Decimal(match["value"].replace("D", "E"))


def same_card_value(eso: fits.Card, ours) -> bool:
    """Whether our value, written as CPL writes numbers (%.15G for doubles, %.7G for floats), gives
    exactly the digits ESO wrote; other values must be equal and of the same type."""
    value = eso.value
    if isinstance(value, float) and not isinstance(ours, bool) and isinstance(ours, (int, float)):
        written = written_value(eso)
        return any(decimal.Decimal(f"{float(ours):.{digits}G}") == written for digits in (15, 7))
    return type(ours) is type(value) and ours == value


def assert_keywords_as_eso(eso: fits.Header, ours: fits.Header, prefixes: tuple[str, ...]) -> int:
    """Every ESO keyword starting with one of ``prefixes`` is ours with ESO's written value; and no
    such keyword is ours only.  Returns the number compared."""
    theirs = [card for card in eso.cards if card.keyword.startswith(prefixes)]
    problems = [f"{c.keyword}: ESO {c.value!r}, ours {ours.get(c.keyword)!r}" for c in theirs
                if c.keyword not in ours or not same_card_value(c, ours[c.keyword])]
    problems += [f"{k}: only in ours" for k in ours if k.startswith(prefixes) and k not in eso]
    assert not problems, "; ".join(problems[:20])
    return len(theirs)
