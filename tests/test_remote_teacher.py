"""opd_jax.train.remote_teacher.check_stages: what a served or cached teacher cannot run is
refused by name, before any work (config only: no model, no server)."""

import os

import pytest

from opd_jax.config import load_config
from opd_jax.train.remote_teacher import check_stages

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "configs/tiny_test.yaml")
TOPK = ["loss.objective=forward_kl", "loss.top_k=4", "loss.support=teacher", "loss.tail=bucket"]


@pytest.mark.parametrize("kind, stages, match", [
    ("cache", "[{kind: opd, steps: 2}]", "cache cannot hold"),
    ("service", "[{kind: opd, steps: 2, loss: {lambda_on_policy: 0.5}}]", "offpolicy_dataset"),
    ("service", "[{kind: cold_start, steps: 2}]", "on-the-fly cold start"),
    ("service", "[{kind: eval, n_prompts: 2}]", "eval stage"),
])
def test_refused_by_name(kind, stages, match):
    cfg = load_config(TINY, [f"stages={stages}", *TOPK])
    with pytest.raises(ValueError, match=match):
        check_stages(cfg, kind)


def test_what_a_service_can_run_passes():
    cfg = load_config(TINY, ["stages=[{kind: opd, steps: 2, offpolicy_dataset: d.jsonl, "
                             "loss: {lambda_on_policy: 0.5}}]", *TOPK])
    check_stages(cfg, "service")
    cfg = load_config(TINY, ["stages=[{kind: opd, steps: 2, offpolicy_dataset: d.jsonl, "
                             "loss: {lambda_on_policy: 0.5}}]", *TOPK, "loss.support=student"])
    with pytest.raises(ValueError, match="support: teacher"):
        check_stages(cfg, "service")
