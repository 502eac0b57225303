"""Padding token lists into rectangular ``[B, T]`` batches (host-side numpy)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["pad_left"]


def pad_left(seqs: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, length]``: ``(tokens int32, valid bool)``.

    ``length`` defaults to the longest sequence; a sequence longer than ``length`` is an error.

    >>> tokens, valid = pad_left([[5, 6], [7]])
    >>> tokens.tolist(), valid.tolist()
    ([[5, 6], [0, 7]], [[True, True], [False, True]])
    """
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens but the padded length is {length}")
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, length - len(s):] = np.asarray(s, np.int32)
            valid[i, length - len(s):] = True
    return tokens, valid
