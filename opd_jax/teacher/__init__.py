"""③ Teacher scoring: what the teacher computes for the loss, given finished sequences.

``scoring`` (:func:`score`: per-position log-probs of given tokens, top-k ids / log-probs and the
logsumexp, chunked over tokens so ``[B, T, V]`` logits never exist).
"""

from opd_jax.teacher.scoring import ScoreOutput, score

__all__ = ["ScoreOutput", "score"]
