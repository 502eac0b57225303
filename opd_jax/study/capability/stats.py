"""Bootstrap confidence intervals over seeds and held-out prompts, and the separation rule.

A held-out metric of one arm at one evaluation point is a ratio of per-prompt sums
(``num_SxP`` / ``den_SxP``: S seeds, P prompts): accuracy has ``num`` = 1 for a correct answer and
``den`` = 1; a KL has ``num`` = the prompt's summed per-token KL and ``den`` = its token count,
so the statistic is the token mean the eval stage reports. The arm's estimate is the mean over
seeds of each seed's ratio. An interval comes from a two-level (hierarchical) percentile
bootstrap: draw S seeds with replacement, then within each drawn seed P prompts with
replacement; so it counts both the training noise (seeds) and the evaluation noise (prompts).

A change within an arm (``final / initial``) draws the *same* prompts for both points of a seed
(paired), so that the prompt-to-prompt variation common to both cancels.

Two intervals *separate* when one lies entirely above the other; a finding's comparison is
``"separate"`` (in the claimed direction), ``"overlap"``, or ``"reversed"`` (separate the other
way).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Literal, Sequence

import numpy as np

Claim = Literal["greater", "less"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """``estimate`` (mean over seeds) and the bootstrap interval ``[low, high]`` at ``level``
    from ``seeds`` seeds x ``prompts`` prompts."""

    estimate: float
    low: float
    high: float
    level: float
    seeds: int
    prompts: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text(self, digits: int = 3) -> str:
        """``0.42 [0.31, 0.53]``."""
        f = lambda x: f"{x:.{digits}g}"
        return f"{f(self.estimate)} [{f(self.low)}, {f(self.high)}]"


def as_arrays(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]] | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(num_SxP, den_SxP)`` float64 (``den`` None = ones); raises ``ValueError`` on ragged or
    empty input."""
    try:
        n = np.asarray(num, np.float64)
        d = np.ones_like(n) if den is None else np.asarray(den, np.float64)
    except ValueError:   # ragged rows
        raise ValueError("per-seed per-prompt values must be [seeds, prompts]: every seed with "
                         "the same prompts (got ragged rows)") from None
    if n.ndim != 2 or n.shape != d.shape or n.size == 0:
        raise ValueError(f"per-seed per-prompt values must be [seeds, prompts] of one shape; got "
                         f"{n.shape} and {d.shape}")
    return n, d


def estimate(num_SxP: np.ndarray, den_SxP: np.ndarray) -> float:
    """Mean over seeds of each seed's ``sum(num) / sum(den)``.

    >>> estimate(np.array([[1., 0.], [1., 1.]]), np.ones((2, 2)))
    0.75
    """
    return float(np.mean(num_SxP.sum(1) / np.maximum(den_SxP.sum(1), 1e-12)))


def rng_for(seed: int, label: str) -> np.random.Generator:
    """A generator fixed by ``(seed, label)``: an interval is the same on every rerun."""
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def resample(rng: np.random.Generator, seeds: int, prompts: int, samples: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(seed_BxS, prompt_BxSxP)`` indices of ``samples`` two-level bootstrap draws."""
    return (rng.integers(seeds, size=(samples, seeds)),
            rng.integers(prompts, size=(samples, seeds, prompts)))


def _ratios(num_SxP, den_SxP, seed_BxS, prompt_BxSxP) -> np.ndarray:
    """``[B, S]``: each drawn seed's ratio over its drawn prompts."""
    rows = seed_BxS[..., None]
    return (num_SxP[rows, prompt_BxSxP].sum(-1)
            / np.maximum(den_SxP[rows, prompt_BxSxP].sum(-1), 1e-12))


def _interval(est: float, stats_B: np.ndarray, level: float, seeds: int, prompts: int
              ) -> Interval:
    lo, hi = np.quantile(stats_B, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), level, seeds, prompts)


def interval(num, den=None, *, samples: int = 2000, level: float = 0.95, seed: int = 0,
             label: str = "") -> Interval:
    """Estimate and two-level percentile-bootstrap interval of ``sum(num) / sum(den)`` (per seed,
    averaged over seeds); ``num`` / ``den``: ``[seeds][prompts]``.

    >>> iv = interval([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], samples=500)
    >>> iv.estimate, iv.low <= 0.75 <= iv.high, iv.high <= 1.0
    (0.75, True, True)
    """
    n, d = as_arrays(num, den)
    s_idx, p_idx = resample(rng_for(seed, label), n.shape[0], n.shape[1], samples)
    return _interval(estimate(n, d), _ratios(n, d, s_idx, p_idx).mean(1), level, *n.shape)


def ratio_interval(final_num, final_den, initial_num, initial_den, *, samples: int = 2000,
                   level: float = 0.95, seed: int = 0, label: str = "") -> Interval:
    """``final / initial`` of one arm (per seed, averaged over seeds) with a paired two-level
    bootstrap: a drawn seed's prompts are the same for both points. ``initial`` has one row per
    seed, or one row shared by every seed (an initial point common to all seeds)."""
    fn, fd = as_arrays(final_num, final_den)
    i_n, i_d = as_arrays(initial_num, initial_den)
    if i_n.shape[1] != fn.shape[1] or i_n.shape[0] not in (1, fn.shape[0]):
        raise ValueError(f"initial values {i_n.shape} do not pair with final values {fn.shape}")
    if i_n.shape[0] == 1:
        i_n, i_d = np.repeat(i_n, fn.shape[0], 0), np.repeat(i_d, fn.shape[0], 0)
    per_seed = (fn.sum(1) / np.maximum(fd.sum(1), 1e-12)) / np.maximum(
        i_n.sum(1) / np.maximum(i_d.sum(1), 1e-12), 1e-12)
    s_idx, p_idx = resample(rng_for(seed, label), fn.shape[0], fn.shape[1], samples)
    stats = (_ratios(fn, fd, s_idx, p_idx)
             / np.maximum(_ratios(i_n, i_d, s_idx, p_idx), 1e-12)).mean(1)
    return _interval(float(per_seed.mean()), stats, level, *fn.shape)


def compare(a: Interval, b: Interval, claim: Claim) -> str:
    """``"separate"`` when ``a``'s interval lies entirely above (claim ``"greater"``) or below
    (``"less"``) ``b``'s, ``"reversed"`` when it lies entirely on the other side, else
    ``"overlap"``.

    >>> A, B = Interval(1, .8, 1.2, .95, 3, 64), Interval(2, 1.5, 2.5, .95, 3, 64)
    >>> compare(A, B, "less"), compare(A, B, "greater"), compare(A, A, "less")
    ('separate', 'reversed', 'overlap')
    """
    if claim not in ("greater", "less"):
        raise ValueError(f"claim must be 'greater' or 'less', got {claim!r}")
    above, below = a.low > b.high, a.high < b.low
    if (above and claim == "greater") or (below and claim == "less"):
        return "separate"
    return "reversed" if above or below else "overlap"


def constant(value: float, level: float = 0.95) -> Interval:
    """A point with no uncertainty (a reference value such as 1 for a ratio)."""
    return Interval(float(value), float(value), float(value), level, 0, 0)
