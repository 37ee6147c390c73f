"""Geometry of a raw MUSE CCD: the four read-out ports, data sections, pre- and overscans.

Sizes come from the ``ESO DET OUTi`` keywords (divided by the binning); the port
positions must be those ESO hard-codes (:data:`~musetwilight.instrument.PORT_X_RIGHT`,
:data:`~musetwilight.instrument.PORT_Y_TOP`), in the order Q1 bottom left, Q2 bottom
right, Q3 top right, Q4 top left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..instrument import PORT_X_RIGHT, PORT_Y_TOP


@dataclass(frozen=True)
class Layout:
    """Quadrant geometry of one raw IFU (sizes already divided by the binning)."""

    nx: int  # data-section width of one quadrant
    ny: int
    prex: int
    prey: int
    ovx: int
    ovy: int
    ports: tuple[tuple[int, int], ...]  # (OUT X, OUT Y) of quadrants 1..4

    @property
    def raw_shape(self) -> tuple[int, int]:
        return 2 * (self.prey + self.ny + self.ovy), 2 * (self.prex + self.nx + self.ovx)

    @property
    def trimmed_shape(self) -> tuple[int, int]:
        return 2 * self.ny, 2 * self.nx

    def is_right(self, q: int) -> bool:
        return self.ports[q - 1][0] != 1

    def is_top(self, q: int) -> bool:
        return self.ports[q - 1][1] != 1


def _get(header: Mapping[str, Any], key: str, source: str) -> Any:
    try:
        return header[key]
    except KeyError:
        raise InputError(f"{source}: header keyword {key} is missing") from None


def layout_from_header(header: Mapping[str, Any], source: str = "raw image") -> Layout:
    """Read and verify the quadrant layout (ESO DET OUTi ..., DET BINX/BINY)."""
    binx = int(_get(header, "HIERARCH ESO DET BINX", source))
    biny = int(_get(header, "HIERARCH ESO DET BINY", source))
    if binx <= 0 or biny <= 0:
        raise InputError(f"{source}: invalid binning {binx}x{biny}")
    values = []
    for q in range(1, 5):
        pre = f"HIERARCH ESO DET OUT{q} "
        values.append(dict(
            x=int(_get(header, pre + "X", source)), y=int(_get(header, pre + "Y", source)),
            nx=int(_get(header, pre + "NX", source)) // binx,
            ny=int(_get(header, pre + "NY", source)) // biny,
            prex=int(_get(header, pre + "PRSCX", source)) // binx,
            prey=int(_get(header, pre + "PRSCY", source)) // biny,
            ovx=int(_get(header, pre + "OVSCX", source)) // binx,
            ovy=int(_get(header, pre + "OVSCY", source)) // biny,
        ))
    expected = [(1, 1), (PORT_X_RIGHT, 1), (PORT_X_RIGHT, PORT_Y_TOP), (1, PORT_Y_TOP)]
    ports = tuple((v["x"], v["y"]) for v in values)
    if list(ports) != expected:
        raise InputError(f"{source}: unsupported read-out port layout {ports}")
    for key in ("nx", "ny", "prex", "prey", "ovx", "ovy"):
        if len({v[key] for v in values}) != 1:
            raise InputError(f"{source}: quadrant {key} sizes differ: {[v[key] for v in values]}")
    v = values[0]
    if v["nx"] <= 0 or v["ny"] <= 0 or v["ovx"] <= 0 or v["ovy"] <= 0 or v["prex"] < 0 or v["prey"] < 0:
        raise InputError(f"{source}: invalid quadrant sizes {v}")
    return Layout(v["nx"], v["ny"], v["prex"], v["prey"], v["ovx"], v["ovy"], ports)


def data_window(layout: Layout, q: int, trimmed: bool) -> tuple[slice, slice]:
    """(rows, columns) of quadrant q's data section, raw or trimmed."""
    L = layout
    if trimmed:
        x0 = L.nx if L.is_right(q) else 0
        y0 = L.ny if L.is_top(q) else 0
    else:
        x0 = L.prex + (L.nx + 2 * L.ovx if L.is_right(q) else 0)
        y0 = L.prey + (L.ny + 2 * L.ovy if L.is_top(q) else 0)
    return slice(y0, y0 + L.ny), slice(x0, x0 + L.nx)


def overscan_windows(layout: Layout, q: int, ignore: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Horizontal and vertical overscan windows (rows, columns) of quadrant q.

    The horizontal overscan spans the data columns; the vertical one spans the
    full height without the prescan and includes the corner square.  The
    ``ignore`` pixels next to the data section are left out.
    """
    L = layout
    if ignore >= L.ovx:
        raise InputError(f"ovscignore={ignore} is not smaller than the overscan width {L.ovx}")
    if L.is_right(q):
        hx = slice(L.prex + L.nx + 2 * L.ovx, L.prex + 2 * L.nx + 2 * L.ovx)
        vx = slice(L.prex + L.nx + L.ovx, L.prex + L.nx + 2 * L.ovx - ignore)
    else:
        hx = slice(L.prex, L.prex + L.nx)
        vx = slice(L.prex + L.nx + ignore, L.prex + L.nx + L.ovx)
    if L.is_top(q):
        hy = slice(L.prey + L.ny + L.ovy, L.prey + L.ny + 2 * L.ovy - ignore)
        vy = slice(L.prey + L.ny + L.ovy, L.prey + 2 * L.ny + 2 * L.ovy)
    else:
        hy = slice(L.prey + L.ny + ignore, L.prey + L.ny + L.ovy)
        vy = slice(L.prey, L.prey + L.ny + L.ovy)
    return (hy, hx), (vy, vx)


def quadrant_half(layout: Layout, q: int) -> tuple[slice, slice]:
    """The whole raw half-by-half region of quadrant q (data plus its pre/overscans)."""
    H, W = layout.raw_shape
    rows = slice(H // 2, H) if layout.is_top(q) else slice(0, H // 2)
    cols = slice(W // 2, W) if layout.is_right(q) else slice(0, W // 2)
    return rows, cols


def gains(header: Mapping[str, Any], source: str = "raw image") -> list[float]:
    """ESO DET OUTi GAIN (count/adu) of the four quadrants."""
    return [float(_get(header, f"HIERARCH ESO DET OUT{q} GAIN", source)) for q in range(1, 5)]


def trim(array: np.ndarray, layout: Layout) -> np.ndarray:
    """Cut the four data sections out of a raw-format array and join them."""
    out = np.empty(layout.trimmed_shape, dtype=array.dtype)
    for q in range(1, 5):
        out[data_window(layout, q, True)] = array[data_window(layout, q, False)]
    return out
