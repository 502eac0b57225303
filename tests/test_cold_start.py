"""The off-policy cold start as the OPD paper builds it: `opd-jax build-cold-start` (teacher
rollouts, rejection filters, retries; thunlp/OPD scripts/infer/vllm_rollout.py) and a cold_start
stage that trains on the dataset for epochs. Tiny random models (configs/tiny_test.yaml)."""

import json
import math
import os

import numpy as np
import pytest

from opd_jax.cli import main
from opd_jax.cold_start import build_cold_start, format_summary, pick_stage
from opd_jax.config import ConfigError, load_config
from opd_jax.data.cold_start_file import (
    ColdStartExample,
    read_cold_start,
    summary_path,
    write_cold_start,
)
from opd_jax.train.models import build_models
from opd_jax.train.run import load_data, run
from opd_jax.train.sft_batches import EpochBatches, check_datasets, steps_per_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny_test.yaml")
# max_new_tokens 1 and the marker U+FFFD: a random byte model draws a byte >= 0x80 (decoded as
# U+FFFD) about half the time, so about half the draws are rejected and retried
BUILD = ['sampler.max_new_tokens=1', 'stages.0.filters.answer_marker="\\ufffd"',
         "stages.0.num_teacher_samples=2", "stages.0.steps=0", "stages.0.epochs=2",
         "stages.0.batch_prompts=4"]


def tiny(tmp, *overrides):
    return load_config(TINY, [f"out_dir={tmp}/run", *overrides])


def one_stage(tmp, dataset, *extra, pack=True):
    """tiny_test with only a dataset cold start, checkpointed at its end only."""
    stage = f"{{kind: cold_start, dataset: {dataset}, batch_prompts: 4, {', '.join(extra)}}}"
    return tiny(tmp, f"stages=[{stage}]", "checkpoint.every_n_steps=0", f"optim.pack={pack}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The dataset `opd-jax build-cold-start` writes (through the CLI) and its config."""
    tmp = tmp_path_factory.mktemp("cold")
    path = tmp / "cold.jsonl"
    args = [f"out_dir={tmp}/run", f"stages.0.dataset={path}", *BUILD]
    assert main(["build-cold-start", TINY, *args, "--no-progress"]) == 0
    return tiny(tmp, f"stages.0.dataset={path}", *BUILD), path


def test_build_keeps_filtered_rollouts_with_retries(built):
    cfg, path = built
    summary = json.loads(summary_path(path).read_text())
    records = load_data(cfg)[0]
    lines = read_cold_start(path)
    slots = 2 * len(records)
    assert summary["slots"] == slots and summary["prompts"] == len(records)
    assert summary["kept"] == len(lines) > 0
    assert summary["kept"] + summary["empty_slots"] == slots
    assert summary["draws"] == slots + summary["retries"] and summary["retries"] > 0
    assert sum(summary["rejected"].values()) == summary["draws"] - summary["kept"]
    assert summary["rejected"]["no_final_answer"] > 0
    assert sum(summary["kept_at_attempt"]) == summary["kept"]
    assert len(summary["kept_at_attempt"]) == 3 and summary["kept_at_attempt"][1] > 0
    # every kept completion passed the filter; lines sorted by (prompt, slot) (reference :502)
    assert all("\ufffd" in ex.completion for ex in lines)
    order = {r["id"]: i for i, r in enumerate(records)}
    keys = [(order[ex.id], ex.slot) for ex in lines]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(ex.attempt < 3 and ex.slot in (0, 1) for ex in lines)
    ex, rec = lines[0], records[order[lines[0].id]]
    assert ex.problem == rec["prompt"] and ex.answer == rec["answer"]
    assert ex.prompt.startswith("<|im_start|>user\n" + rec["prompt"])
    assert ex.prompt.endswith("<|im_start|>assistant\n")
    assert ex.messages[-1] == {"role": "assistant", "content": ex.completion}
    assert summary["settings"]["sampler"]["top_p"] == 0.95   # the reference's default
    assert f"kept {summary['kept']} of {slots} slots" in format_summary(summary)


@pytest.fixture(scope="module")
def models(built):
    cfg, _ = built
    return build_models(cfg.teacher, cfg.student, seed=cfg.seed)


def test_build_does_not_depend_on_batching_and_refuses_to_overwrite(built, models, tmp_path):
    cfg, path = built
    with pytest.raises(FileExistsError, match="--force"):
        build_cold_start(cfg, progress=False)
    other = tmp_path / "again.jsonl"
    build_cold_start(cfg, out=str(other), batch_rows=5, progress=False, models=models)
    assert other.read_text() == path.read_text()


@pytest.mark.parametrize("max_attempts", [3, 2])
def test_build_max_attempts_counts_every_draw(tmp_path, models, max_attempts):
    """A slot is drawn at most max_attempts times in all (vllm_rollout.py:279), then left empty."""
    path = tmp_path / "none.jsonl"
    cfg = tiny(tmp_path, f"stages.0.dataset={path}", *BUILD, "stages.0.filters.answer_marker=NEVER",
               f"stages.0.max_attempts={max_attempts}")
    s = build_cold_start(cfg, progress=False, models=models)
    n = s["slots"]
    assert (s["kept"], s["empty_slots"]) == (0, n) and n == 2 * s["prompts"]
    assert s["draws"] == n * max_attempts and s["retries"] == n * (max_attempts - 1)
    assert s["rejected"]["no_final_answer"] == s["draws"]
    with pytest.raises(ValueError, match="no examples"):
        read_cold_start(path)


def test_dataset_stage_trains_for_epochs(built, tmp_path):
    _, path = built
    n = len(read_cold_start(path))
    summary = run(one_stage(tmp_path, path, "epochs: 2"), progress=False)
    assert summary["stages"]["cold_start"]["steps"] == 2 * math.ceil(n / 4)


WORDS = ["red", "green", "blue", "cyan", "pink", "gold"]


def write_examples(path):
    """Byte-tokenizer chat prompts with a short completion each."""
    examples = [ColdStartExample(prompt=f"<|im_start|>user\nsay {w}<|im_end|>\n<|im_start|>"
                                 "assistant\n", completion=f"{w} {w}", stop="<|im_end|>", id=str(i))
                for i, w in enumerate(WORDS)]
    write_cold_start(path, examples)


def test_dataset_stage_loss_goes_down_and_resumes(tmp_path):
    path = tmp_path / "hand.jsonl"
    write_examples(path)
    cfg = one_stage(tmp_path, path, "epochs: 4", pack=False)   # one step shape: one compile
    summary = run(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
            if line]
    assert summary["stages"]["cold_start"]["steps"] == len(rows) == 4 * math.ceil(6 / 4)
    losses = np.array([r["loss"] for r in rows]).reshape(4, 2)
    assert np.all(np.diff(losses.mean(1)) < 0) and losses[-1].mean() < 0.97 * losses[0].mean()
    # the short last batch of an epoch trains on its 2 real rows only (each "w w" + the stop)
    total = sum(len(f"{w} {w}") + 1 for w in WORDS)
    assert rows[0]["gen_tokens"] + rows[1]["gen_tokens"] == total
    # a finished stage is not retrained; the iterator refuses another dataset's saved state
    assert run(cfg, progress=False)["stages"] == summary["stages"]
    it = EpochBatches([{"real": True}] * 3, 2, 0, sha256="a")
    with pytest.raises(ValueError, match="another cold-start dataset"):
        it.set_state({"step": 1, "examples": 3, "sha256": "b"})


def test_epoch_batches_visit_every_example_once_per_epoch():
    rows = [{"i": i, "real": True} for i in range(5)]
    it = EpochBatches(rows, 2, seed=3, sha256="x")
    assert it.per_epoch == steps_per_epoch(5, 2) == 3
    for epoch in range(3):
        batches = [next(it) for _ in range(3)]
        real = [r["i"] for b in batches for r in b if r["real"]]
        assert sorted(real) == list(range(5))
        assert [r["real"] for r in batches[-1]] == [True, False]
        assert batches[-1][1]["i"] == batches[-1][0]["i"]     # padding repeats a real row
    assert it.batch(0) != it.batch(3)                         # epochs are shuffled differently
    state = it.get_state()
    again = EpochBatches(rows, 2, seed=3, sha256="x")
    again.set_state(state)
    assert next(again) == next(it)
    halves = [EpochBatches(rows, 2, seed=3, sha256="x", process_index=p, process_count=2)
              for p in (0, 1)]
    assert [r for h in halves for r in next(h)] == EpochBatches(rows, 2, 3, sha256="x").batch(0)


def test_dataset_file_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="build-cold-start"):
        read_cold_start(missing)
    bad = tmp_path / "bad.jsonl"
    for text, match in [('{"prompt": "p", "completion": "c"}\nnot json\n', "bad.jsonl:2: not JSON"),
                        ('{"prompt": "p"}\n', "missing completion"),
                        ('{"prompt": "p", "completion": 3}\n', "completion must be a string"),
                        ('{"prompt": " ", "completion": "c"}\n', "empty prompt"),
                        ('{"prompt": "p", "completion": ""}\n', "nothing to train on"),
                        ("[1]\n", "JSON object"), ("\n", "no examples")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_cold_start(bad)
    bad.write_text('{"prompt": "p", "completion": "", "stop": "<|im_end|>", "extra": 1}\n')
    assert read_cold_start(bad)[0].stop == "<|im_end|>"
    # a run checks every dataset stage's file before any stage trains
    cfg = tiny(tmp_path, f"stages=[{{kind: opd, steps: 1}}, {{kind: cold_start, dataset: "
                         f"{missing}, epochs: 1}}]")
    with pytest.raises(FileNotFoundError, match=r"stages.1.dataset"):
        check_datasets(cfg)
    assert summary_path("a/b.jsonl").as_posix() == "a/b.summary.json"


@pytest.mark.parametrize("overrides,match", [
    (["stages.0.dataset=d.jsonl", "stages.0.epochs=2"], "exactly one of steps / epochs"),
    (["stages.0.dataset=d.jsonl", "stages.0.steps=0"], "exactly one of steps / epochs"),
    (["stages.0.epochs=2"], "leave unset without dataset"),
    (["stages.0.max_attempts=5"], "leave unset without dataset"),
    (["stages.1.dataset=d.jsonl"], "applies to cold_start stages"),
    (["stages.0.dataset=d.jsonl", "stages.0.steps=0", "stages.0.epochs=0"], ">= 1"),
])
def test_stage_field_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(tmp_path, *overrides)


def test_dataset_stage_sampler_defaults_follow_the_reference(tmp_path):
    ds = ["stages.0.dataset=d.jsonl", "stages.0.steps=0", "stages.0.epochs=2"]
    cfg = tiny(tmp_path, *ds)
    s = cfg.resolve_stage(0).sampler
    assert (s.temperature, s.top_p, s.max_new_tokens) == (1.0, 0.95, 8)   # 8: the run level's
    assert cfg.resolve_stage(1).sampler.top_p == 1.0                      # opd: unchanged
    assert tiny(tmp_path, *ds, "sampler.top_p=0.9").resolve_stage(0).sampler.top_p == 0.9
    assert tiny(tmp_path, *ds, "stages.0.sampler={top_p: 0.8}").resolve_stage(0).sampler.top_p \
        == 0.8
    assert tiny(tmp_path).resolve_stage(0).sampler.top_p == 1.0          # on the fly: unchanged
    assert pick_stage(cfg) == 0
    with pytest.raises(ValueError, match="not a cold_start stage"):
        pick_stage(cfg, "opd")
