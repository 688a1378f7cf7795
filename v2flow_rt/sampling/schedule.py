"""Masked-autoregressive bookkeeping (numpy only): cosine mask schedule and seeded random orders.

Convention (MAR / V2Flow): a mask value of 1 (True) means the token is still unknown. Iteration k keeps
the first ``mask_len_k`` positions of each sample's random order masked and predicts the rest of what
was masked before, so the tail of the order is predicted first and the last iteration predicts all
that remain.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


def mask_lengths(seq_len: int, num_iter: int) -> list[int]:
    """Number of tokens still masked after each iteration; the last entry is always 0.

    Follows the official loop: ``floor(L·cos(π/2·(k+1)/num_iter))`` clamped to ``[1, remaining − 1]``,
    with the last iteration predicting every remaining token. At L=64, num_iter=4: [59, 45, 24, 0].
    """
    if seq_len < 1 or num_iter < 1:
        raise ConfigError(f"seq_len and num_iter must be >= 1, got {seq_len} and {num_iter}")
    if num_iter > seq_len:
        raise ConfigError(f"num_iter ({num_iter}) cannot exceed the number of tokens ({seq_len})")
    remaining = seq_len
    lengths = []
    for k in range(num_iter):
        if k == num_iter - 1:
            length = 0
        else:
            length = int(math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter)))
            length = max(1, min(remaining - 1, length))
        lengths.append(length)
        remaining = length
    return lengths


def tokens_per_iteration(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens each iteration predicts (sums to seq_len). L=1024, 4 iterations: 78, 222, 333, 391."""
    lengths = [seq_len] + mask_lengths(seq_len, num_iter)
    return [lengths[k] - lengths[k + 1] for k in range(num_iter)]


def random_orders(rng: np.random.Generator, batch: int, seq_len: int) -> np.ndarray:
    """One random permutation of ``range(seq_len)`` per sample: int64 [batch, seq_len]."""
    return np.stack([rng.permutation(seq_len) for _ in range(batch)]).astype(np.int64)


def mask_from_order(orders: np.ndarray, num_masked: int) -> np.ndarray:
    """Boolean mask [B, L]: True at the first ``num_masked`` positions of each order."""
    mask = np.zeros(orders.shape, dtype=bool)
    np.put_along_axis(mask, orders[:, :num_masked], True, axis=1)
    return mask

