"""``opd-jax study``: the OPD paper's (arXiv 2604.13016) comparisons, in miniature, on one teacher.

Arms (each a run directory under ``study.out_dir``, run by ``opd_jax.train.run.run``):

1. ``compatible``: OPD from the run config's ``student`` (demo: SmolLM2 minus layers 10, 15, 20);
2. ``incompatible``: OPD from ``study.incompatible_student`` (demo: every 3rd layer);
3. ``cold_start``: the incompatible student after an off-policy cold start (SFT on filtered teacher
   rollouts, ``study.cold_start_*``), then the same OPD;
4. ``aligned`` / ``random``: OPD of the ``aligned_student`` on ``aligned_prompts`` prompts chosen by
   :mod:`opd_jax.select_prompts` (the ``select:`` section) vs as many random prompts of the same
   de-duplicated pool.

Every arm's OPD is split into stages of ``eval_every`` steps with a held-out eval stage before,
between and after them (no trainer change; each OPD stage starts a fresh optimizer state, so AdamW
moments restart every ``eval_every`` steps), giving per-step curves of both KLs the design asks
for together: on-policy reverse KL and forward KL on teacher samples. ``report.md`` holds the
tables, plots and a findings table whose verdicts follow the stated rules (``study.rules``) from
the numbers. Seeds are fixed: a rerun (``--fresh``) gives the same numbers on the same machine; a
rerun without it resumes (finished arms are read back from ``<arm>/arm.json``).

Config: a run config (teacher, student, data, sampler, loss, optim, checkpoint; ``stages`` unused)
plus ``study:`` (:class:`StudyConfig`) and ``select:`` (:class:`opd_jax.select_prompts.SelectConfig`)
sections. ``small=True`` (``--small``) swaps in tiny random models and a few steps (seconds).

A config whose ``study:`` says ``kind: capability`` (``configs/study_capability.yaml``) runs the
capability study instead (:mod:`opd_jax.study.capability`): the teacher is first post-trained on
a task family it is weak at, then OPD from it (on its post-training prompts and on a
de-duplicated control pool) is compared with OPD from the untouched teacher, over several seeds,
with bootstrap intervals deciding each verdict; its OPD runs keep one optimizer state across
their evaluation points.

Modules: :mod:`.config` (the ``study:`` section), :mod:`.arms` (one arm's stages, run and
series), :mod:`.run` (the whole study), :mod:`.findings` (the verdicts), :mod:`.report` (plots and
markdown); the persistent compilation cache is :func:`opd_jax.compile_options.compilation_cache`.
"""

from opd_jax.compile_options import compilation_cache
from opd_jax.study.arms import HELDOUT, TRAIN, arm_config, arm_series, arm_stages, run_arm, with_student
from opd_jax.study.config import ARMS, SMALL, FindingRules, StudyConfig, load_study_config
from opd_jax.study.findings import judge
from opd_jax.study.report import (
                                ARM_TITLES,
                                LOG_SCALE,
                                describe_model,
                                format_study_report,
                                plot_study,
                                write_study_report,
)
from opd_jax.study.run import run_study

__all__ = ["ARMS", "SMALL", "FindingRules", "StudyConfig", "load_study_config", "HELDOUT",
           "TRAIN", "with_student", "arm_stages", "arm_config", "run_arm", "arm_series",
           "compilation_cache", "run_study", "judge", "ARM_TITLES", "LOG_SCALE",
           "describe_model", "plot_study", "format_study_report", "write_study_report"]
