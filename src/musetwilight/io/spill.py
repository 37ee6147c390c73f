"""Scratch storage of the IFUs' pixel tables between the per-IFU stage and the resampling.

Full-size runs keep the 24 wavelength-cut IFU tables on disk instead of in memory: each
column in a ``.npy`` file, read back in one piece when the resampling's first tile of cube
rows needs the table.  What the recipe needs before that (size, column limits, the data
column's CPL mean for the flux scaling) is kept in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

RESAMPLING_COLUMNS = ("xpos", "ypos", "lambda_", "data", "stat", "dq")


class SpilledTable:
    """A pixel table's resampling columns in ``.npy`` files under ``directory``."""

    def __init__(self, table, directory: str | os.PathLike, name: str):
        self.paths = {}
        for column in RESAMPLING_COLUMNS:
            path = Path(directory) / f"{name}.{column}.npy"
            np.save(path, np.ascontiguousarray(getattr(table, column)))
            self.paths[column] = path
        self.header = table.header
        self.nrow = len(table.xpos)
        self.limits = table_limits(table)
        self.ylimits = self.limits[2:4]

    def load(self) -> SimpleNamespace:
        """All resampling columns, read into memory."""
        return SimpleNamespace(**{column: np.load(path) for column, path in self.paths.items()})

    def discard(self) -> None:
        """Remove the files (the resampling is done with the table)."""
        for path in self.paths.values():
            path.unlink(missing_ok=True)

    def __getattr__(self, column: str) -> np.ndarray:
        if column in RESAMPLING_COLUMNS:
            return np.load(self.paths[column], mmap_mode="r")
        raise AttributeError(column)


def table_limits(table) -> tuple[float, float, float, float, float, float]:
    """(xmin, xmax, ymin, ymax, lambda min, lambda max) of a table's rows."""
    stored = getattr(table, "limits", None)
    if stored is not None:
        return stored
    return (float(np.min(table.xpos)), float(np.max(table.xpos)), float(np.min(table.ypos)),
            float(np.max(table.ypos)), float(np.min(table.lambda_)), float(np.max(table.lambda_)))
