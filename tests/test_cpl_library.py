"""Our CPL primitives against CPL's own library (libcplcore / libcpldrs, installed with ESO's
pipeline), called through ctypes on the same arrays: the column mean behind the IFU flux scales,
the division of a float column by a double, the bad-pixel interpolation of the combined image and
the image median of the QC, on random data larger and wider in range than the mini sets."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob

import numpy as np
import pytest

from musetwilight.core.combine import _interpolate
from musetwilight.core.cplmath import column_mean, median_of

pytestmark = pytest.mark.eso

VOID = ctypes.c_void_p
SIZE = ctypes.c_longlong


def _library(name: str):
    found = sorted(glob.glob(f"/usr/lib/*/lib{name}.so.*")) or [ctypes.util.find_library(name)]
    if not found or found[0] is None:
        pytest.fail(f"lib{name} (CPL, installed with ESO's pipeline) not found")
    return ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)


@pytest.fixture(scope="module")
def cpl():
    core, drs = _library("cplcore"), _library("cpldrs")
    core.cpl_init(0)
    core.cpl_table_new.restype = VOID
    core.cpl_table_new.argtypes = [SIZE]
    core.cpl_table_wrap_float.argtypes = [VOID, VOID, ctypes.c_char_p]
    core.cpl_table_unwrap.argtypes = [VOID, ctypes.c_char_p]
    core.cpl_table_unwrap.restype = VOID
    core.cpl_table_delete.argtypes = [VOID]
    core.cpl_table_get_column_mean.restype = ctypes.c_double
    core.cpl_table_get_column_mean.argtypes = [VOID, ctypes.c_char_p]
    core.cpl_table_divide_scalar.argtypes = [VOID, ctypes.c_char_p, ctypes.c_double]
    core.cpl_image_wrap_float.restype = VOID
    core.cpl_image_wrap_float.argtypes = [SIZE, SIZE, VOID]
    core.cpl_image_unwrap.argtypes = [VOID]
    core.cpl_image_unwrap.restype = VOID
    core.cpl_image_reject.argtypes = [VOID, SIZE, SIZE]
    core.cpl_image_get_median.restype = ctypes.c_double
    core.cpl_image_get_median.argtypes = [VOID]
    drs.cpl_detector_interpolate_rejected.argtypes = [VOID]
    return core, drs


def _with_float_column(core, values: np.ndarray, action):
    table = core.cpl_table_new(values.size)
    core.cpl_table_wrap_float(table, values.ctypes.data, b"data")
    try:
        return action(table)
    finally:
        core.cpl_table_unwrap(table, b"data")
        core.cpl_table_delete(table)


@pytest.mark.parametrize("size", [1, 1000, 3_000_001])
def test_column_mean_is_cpls(cpl, size):
    core, _ = cpl
    values = np.random.default_rng(size).lognormal(8.0, 2.0, size).astype(np.float32)
    theirs = _with_float_column(core, values, lambda t: core.cpl_table_get_column_mean(t, b"data"))
    assert column_mean(values) == theirs


def test_float_column_divided_by_a_double_is_cpls(cpl):
    core, _ = cpl
    stat = np.random.default_rng(2).lognormal(2.0, 3.0, 2_000_000).astype(np.float32)
    scale = 122003706376.35449 / 128952097226.5774
    theirs = stat.copy()
    _with_float_column(core, theirs, lambda t: core.cpl_table_divide_scalar(t, b"data", scale * scale))
    ours = (stat.astype(np.float64) / (scale * scale)).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)
    assert np.sum(stat / np.float32(scale * scale) != theirs) > 0  # single precision would not do


def test_bad_pixel_interpolation_is_cpls(cpl):
    core, drs = cpl
    rng = np.random.default_rng(3)
    image = rng.lognormal(3.0, 2.5, (300, 200)).astype(np.float32)
    bad = rng.random(image.shape) < 0.05
    bad[100:104, 50:54] = True  # a cluster: interpolated over two passes
    bad[0, :3] = bad[-1, -3:] = True  # corners and edges
    ours = image.copy()
    _interpolate(ours, bad)
    theirs = image.copy()
    wrapped = core.cpl_image_wrap_float(image.shape[1], image.shape[0], theirs.ctypes.data)
    for y, x in np.argwhere(bad):
        core.cpl_image_reject(wrapped, int(x) + 1, int(y) + 1)
    assert drs.cpl_detector_interpolate_rejected(wrapped) == 0
    core.cpl_image_unwrap(wrapped)
    assert not np.array_equal(ours, image)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape", [(301, 201), (300, 200), (8, 2), (1, 1)])
def test_image_median_is_cpls(cpl, shape):
    core, _ = cpl
    image = np.random.default_rng(shape[0]).lognormal(3.0, 2.5, shape).astype(np.float32)
    wrapped = core.cpl_image_wrap_float(shape[1], shape[0], image.ctypes.data)
    theirs = core.cpl_image_get_median(wrapped)
    core.cpl_image_unwrap(wrapped)
    assert median_of(image) == theirs
    assert median_of(image.copy(), overwrite=True) == theirs
