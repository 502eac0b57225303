"""``opd-jax study`` with ``study.kind: capability``: the OPD paper's second condition (arXiv
2604.13016), in miniature. OPD helps when the teacher offers a capability the student has not
seen, and most on prompts from the teacher's own post-training distribution.

1. **The teacher gets a new capability** (:mod:`.teacher`): the embedded teacher is fine-tuned
   (a run of this library whose student is the teacher) on worked solutions of a task family it
   is weak at (``data``: e.g. reasoning-gym ``chain_sum``), each verified by the task's grader
   (:mod:`.solutions`); its held-out accuracy before / after is measured per prompt. Its
   training prompts are "the teacher's post-training data"; its checkpoint is kept and exported.
2. **Arms** (:data:`ARM_SPECS`; student = the derived student of the *untrained* base):
   ``compatible`` / ``incompatible`` / ``cold_start`` (the mechanism study's arms, from the
   untouched teacher on the aligned prompts; ``compatible`` is also "the untouched teacher on
   the same aligned prompts"), ``post_aligned`` (the post-trained teacher on its post-training
   prompts) and ``post_control`` (the post-trained teacher on a control pool de-duplicated from
   them by exact match and embedding similarity, :mod:`opd_jax.align_prompts`).
3. **Statistics** (:mod:`.stats`, :mod:`.findings`): every arm runs at each of ``seeds``; held-out
   accuracy on the teacher's task family and both KLs get two-level bootstrap intervals (seeds,
   then prompts, :mod:`.heldout` keeps per-prompt values); a finding is reproduced only when its
   intervals separate in the claimed direction.
4. **One OPD stage per run** (:mod:`.arms`): evaluation points are checkpoints of that stage,
   evaluated afterwards, so the optimizer state persists across them.

Modules: :mod:`.config` (the ``study:`` section, ``--small``), :mod:`.solutions`,
:mod:`.teacher`, :mod:`.heldout`, :mod:`.arms`, :mod:`.stats`, :mod:`.findings`,
:mod:`.report`, :mod:`.run`.
"""

from opd_jax.study.capability.arms import run_stages, seed_config
from opd_jax.study.capability.config import (
    ARM_SPECS,
    CAPABILITY_ARMS,
    SMALL,
    BootstrapSpec,
    CapabilityConfig,
    ControlSpec,
    TeacherTrainingSpec,
    is_capability,
    load_capability_config,
)
from opd_jax.study.capability.findings import arm_intervals, judge_capability
from opd_jax.study.capability.heldout import Evaluator, token_means
from opd_jax.study.capability.run import control_pool, run_capability_study
from opd_jax.study.capability.solutions import chain_solution, verified_solutions
from opd_jax.study.capability.stats import Interval, compare, interval, ratio_interval

__all__ = ["ARM_SPECS", "CAPABILITY_ARMS", "SMALL", "BootstrapSpec", "CapabilityConfig",
           "ControlSpec", "TeacherTrainingSpec", "is_capability", "load_capability_config",
           "run_stages", "seed_config", "arm_intervals", "judge_capability", "Evaluator",
           "token_means", "control_pool", "run_capability_study", "chain_solution",
           "verified_solutions", "Interval", "compare", "interval", "ratio_interval"]
