"""Small direct tests: metrics_log (truncate/read), analyze (plots + report), byte_tokenizer,
losses.elementwise terms against numpy."""

import json

import jax.numpy as jnp
import numpy as np

from opd_jax.analyze import moving_average, write_report
from opd_jax.losses import elementwise
from opd_jax.model.byte_tokenizer import ByteTokenizer
from opd_jax.train.metrics_log import MetricsLog, to_python


def test_metrics_log_truncate_keeps_other_stages_and_earlier_steps(tmp_path):
    log = MetricsLog(tmp_path)
    for stage in ("a", "b"):
        for step in (1, 2, 3):
            log.write({"stage": stage, "step": step, "loss": np.float32(step), "nan": float("nan")})
    log.truncate("a", 1)
    assert [(r["stage"], r["step"]) for r in log.read()] == [("a", 1), ("b", 1), ("b", 2), ("b", 3)]
    assert log.read("b")[0]["nan"] is None  # NaN is written as null (valid JSON)
    assert to_python({"x": jnp.arange(3)}) == {"x": [0, 1, 2]}


def test_analyze_writes_plots_and_report(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 4):
        log.write({"stage": "opd", "step": step, "loss": 1.0 / step, "overlap": 0.5 + 0.1 * step,
                   "curves": {"overlap": [0.5, 0.6, None]}})
    report = write_report(tmp_path)
    assert (tmp_path / "mechanism_metrics.png").stat().st_size > 1000
    assert (tmp_path / "per_position.png").exists()
    assert "mechanism_metrics.png" in report.read_text()
    assert not (tmp_path / "heldout.png").exists()   # no evaluation in this run
    # with held-out evaluations: their plot, and the before / after table opens the report
    evals = {"eval_initial": {"accuracy": 0.125, "onpolicy_reverse_kl": 2.3},
             "eval": {"accuracy": 0.25, "onpolicy_reverse_kl": 0.58, "teacher_accuracy": 0.5}}
    (tmp_path / "summary.json").write_text(json.dumps({"run_dir": str(tmp_path), "evals": evals,
                                                       "stages": {}}))
    text = write_report(tmp_path).read_text()
    assert (tmp_path / "heldout.png").stat().st_size > 1000
    lines = text.splitlines()
    assert lines[2] == "## Held-out: before and after"
    assert "| accuracy | 0.1250 | 0.2500 | 0.5000 |" in lines
    assert "| reverse KL, own samples (nats) | 2.3000 | 0.5800 | - |" in lines
    assert text.index("Held-out") < text.index("![mechanism_metrics]") < text.index("Run summary")


def test_moving_average_skips_missing_values():
    assert moving_average([1.0, float("nan"), 3.0, 5.0, 7.0], 3) == [1.0, 1.0, 2.0, 3.0, 5.0]


def test_byte_tokenizer_round_trip_and_chat_template():
    tok = ByteTokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "2+3? é"}])
    ids = tok.encode(text)
    assert ids[0] == 256 and ids.count(257) == 1  # <|im_start|> ... <|im_end|> as single ids
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert max(ids) < tok.vocab_size and tok.id_to_token(257) == "<|im_end|>"


def test_elementwise_kl_terms_match_numpy_and_handle_zero_mass():
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.25, 0.25, 0.5])
    with np.errstate(divide="ignore"):
        logp, logq = np.log(p), np.log(q)
    terms = np.asarray(elementwise.kl_terms(jnp.asarray(logp), jnp.asarray(logq)))
    ref = np.array([0.5 * np.log(2), 0.5 * np.log(2), 0.0])  # 0 log 0 = 0
    np.testing.assert_allclose(terms, ref, rtol=1e-6)
