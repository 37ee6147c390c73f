"""Numerical kernels that reproduce CPL's own arithmetic, shared by the stages that need it."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def cholesky_solve(matrix, rhs):
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite matrix, as CPL does.

    CPL's cpl_matrix_decomp_chol reads the upper triangle and writes the factor below
    the diagonal (``matrix`` is overwritten); the forward and back substitutions follow
    cpl_matrix_solve_chol's order, so that results agree with CPL to the last bit.
    Returns ``(rhs, ok)``; ``ok`` is False when the matrix is not positive definite.
    """
    nc = matrix.shape[0]
    for i in range(nc):
        for j in range(i, nc):
            total = matrix[i, j]
            for k in range(i - 1, -1, -1):
                total -= matrix[i, k] * matrix[j, k]
            if j > i:
                matrix[j, i] = total / matrix[i, i]
            elif total > 0.0:
                matrix[i, i] = np.sqrt(total)
            else:
                return rhs, False
    for i in range(nc):
        total = rhs[i]
        for j in range(i - 1, -1, -1):
            total -= matrix[i, j] * rhs[j]
        rhs[i] = total / matrix[i, i]
    for i in range(nc - 1, -1, -1):
        total = rhs[i]
        for j in range(i + 1, nc):
            total -= matrix[j, i] * rhs[j]
        rhs[i] = total / matrix[i, i]
    return rhs, True


@njit(cache=True, nogil=True)
def running_mean(values):
    """Mean by the running recurrence m += (v - m) / (i + 1), as CPL computes vector means."""
    mean = 0.0
    for i in range(values.size):
        mean += (values[i] - mean) / (i + 1)
    return mean
