"""③ Teacher scoring: what the teacher computes for the loss, given finished sequences.

``scoring`` (:func:`score`: per-position log-probs of given tokens, top-k ids / log-probs and the
logsumexp, chunked over tokens so ``[B, T, V]`` logits never exist).
"""

from opd_jax.teacher.scores import TeacherScores, check_objective, dense_teacher_logits, query_ids
from opd_jax.teacher.scoring import ScoreOutput, score, score_completions

__all__ = ["ScoreOutput", "TeacherScores", "check_objective", "dense_teacher_logits", "query_ids",
           "score", "score_completions"]
