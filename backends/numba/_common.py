"""Pieces every Numba kernel shares: how work is split over threads and checkpoint blocks."""
from __future__ import annotations

import math

import numba as nb
import numpy as np

# Backward kernels sum over the value axis in their innermost loops (dq, dk, dg); a float sum
# vectorises only when LLVM may reassociate it. Only reassociation and contraction (FMA) are
# allowed: no "no NaN / no inf" assumptions, since log gates of -inf (hard resets) are valid.
REDUCTIONS = {"reassoc", "contract"}

# A value block narrower than this costs more in per-task overhead than it gains in threads.
MIN_VALUE_BLOCK = 16


def contiguous(*arrays):
    """C-contiguous, writeable versions (no copy when already so). Kernels index the last axis
    innermost, and one array type per dtype means one compilation per kernel and dtype
    (read-only or strided inputs would each compile their own specialisation)."""
    return tuple(np.require(a, requirements=("C_CONTIGUOUS", "WRITEABLE")) for a in arrays)


def decays(gk, q_shape):
    """a = exp(gk) as a new C-contiguous [B, T, H, Kg] array: Kg = K for gates per key channel,
    1 for one gate per head (gk [..., 1]), so that a scalar gate costs B T H numbers, not
    B T H K. NumPy's vectorised exp: a scalar exp per (t, i) in the kernel cost as much as the
    rest of the step."""
    return np.exp(np.broadcast_to(gk, q_shape[:3] + (gk.shape[-1],)))


def n_value_blocks(tasks: int, V: int) -> int:
    """How many blocks to split the value axis into so that tasks * blocks >= the Numba thread
    count (1 when batch x heads already fill the threads)."""
    threads = nb.get_num_threads()
    if tasks >= threads:
        return 1
    return max(1, min(math.ceil(threads / max(tasks, 1)), V // MIN_VALUE_BLOCK))


@nb.njit(inline="always")
def value_block(V, n_blocks, jb):
    """Columns [j0, j1) of value block jb of n_blocks (sizes differ by at most one)."""
    base, extra = V // n_blocks, V % n_blocks
    j0 = jb * base + min(jb, extra)
    return j0, j0 + base + (1 if jb < extra else 0)


def block_length(T: int) -> int:
    """Checkpoint spacing of a reverse walk over T steps: ~sqrt(T), so that checkpoints and one
    recomputed block take O(sqrt(T)) states together."""
    return max(1, math.isqrt(max(T - 1, 0)) + 1)
