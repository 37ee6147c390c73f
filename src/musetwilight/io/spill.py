"""Scratch storage of the IFUs' pixel tables between the per-IFU stage and the resampling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

RESAMPLING_COLUMNS = ("xpos", "ypos", "lambda_", "data", "stat", "dq")


class SpilledTable:
    """A pixel table's resampling columns kept in .npy files, read (memory-mapped) on access.

    Full-size runs keep the 24 wavelength-cut IFU tables on disk instead of in memory
    between the per-IFU stage and the resampling.
    """

    def __init__(self, table, directory: str | os.PathLike, name: str):
        self.paths = {}
        for column in RESAMPLING_COLUMNS:
            path = Path(directory) / f"{name}.{column}.npy"
            np.save(path, np.ascontiguousarray(getattr(table, column)))
            self.paths[column] = path
        self.header = table.header
        self.nrow = len(table.xpos)

    def __getattr__(self, column: str) -> np.ndarray:
        if column in RESAMPLING_COLUMNS:
            return np.load(self.paths[column], mmap_mode="r")
        raise AttributeError(column)
