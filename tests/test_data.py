"""Tests for opd_jax.data: sources, splits, grain pipeline, templates, tokenisation."""

from __future__ import annotations

import json

import grain
import pytest

from opd_jax import data

ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": "+-*"}


class ByteTokenizer:
    """Byte-level fake tokenizer with a ChatML-like template (implements ChatTokenizer)."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text):
        return list(text.encode("utf-8"))


def _recs(n, source="toy"):
    return [data.make_record(f"{source}:{i}", f"problem {i}", source=source, answer=i)
            for i in range(n)]


def _shards(records, count, drop):
    opts = [grain.sharding.ShardOptions(i, count, drop_remainder=drop) for i in range(count)]
    return [data.shard_records(records, o) for o in opts]


# ----------------------------------------------------------------------------- sources

def test_jsonl_and_parquet_round_trip(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"question": f"What is {i}+{i}?", "final": 2 * i, "qid": f"q{i}", "level": i % 2}
            for i in range(5)]
    jpath = tmp_path / "p.jsonl"
    jpath.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ppath = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), ppath)
    keys = dict(prompt_key="question", answer_key="final", id_key="qid")
    from_jsonl = data.load_jsonl(jpath, source="toy", **keys)
    from_parquet = data.load_parquet(ppath, source="toy", **keys)
    assert from_jsonl == from_parquet
    assert [r["id"] for r in from_jsonl] == [f"q{i}" for i in range(5)]
    assert from_jsonl[3]["prompt"] == "What is 3+3?" and from_jsonl[3]["answer"] == "6"
    assert from_jsonl[3]["metadata"] == {"level": 1} and from_jsonl[3]["solution"] is None
    spec = {"type": "parquet", "path": str(ppath), "source": "toy", **keys}
    assert data.load_records(spec) == from_parquet


def test_bad_field_name_lists_available_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"no field 'prompt'.*\['answer', 'question'\]"):
        data.load_jsonl(path)
    with pytest.raises(ValueError, match="Bad keys"):
        data.load_records({"type": "jsonl", "path": str(path), "prompt_field": "question"})
    with pytest.raises(ValueError, match="needs 'type'"):
        data.load_records({"path": str(path)})


def test_empty_file_names_source_and_fix(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*Fix:"):
        data.load_jsonl(path)


def test_reasoning_gym_deterministic_per_seed_and_scorable():
    from opd_jax.eval import is_correct, reasoning_gym_score

    a = data.load_reasoning_gym("basic_arithmetic", size=20, seed=3, config=ARITH)
    b = data.load_reasoning_gym("basic_arithmetic", size=20, seed=3, config=ARITH)
    c = data.load_reasoning_gym("basic_arithmetic", size=20, seed=4, config=ARITH)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    json.dumps(a)  # records are JSON-able
    for name in ("basic_arithmetic", "chain_sum", "leg_counting"):
        recs = data.load_reasoning_gym(name, size=4, seed=0,
                                       config=ARITH if name == "basic_arithmetic" else None)
        for r in recs:
            assert r["source"] == f"reasoning_gym:{name}"
            assert reasoning_gym_score(r, r["answer"]) == 1.0
            assert is_correct(r, f"Some work.\nAnswer: {r['answer']}")
            assert not is_correct(r, "Answer: 123456789")


def test_reasoning_gym_solution_and_errors():
    recs = data.load_reasoning_gym("gsm_symbolic", size=2, seed=0)
    assert all(r["solution"] and "####" in r["solution"] for r in recs)
    with pytest.raises(ValueError, match="Unknown reasoning-gym dataset 'nope'.*chain_sum"):
        data.load_reasoning_gym("nope", size=2)
    with pytest.raises(ValueError, match="Invalid reasoning-gym config"):
        data.load_reasoning_gym("basic_arithmetic", size=2, config={"min_terms": 3, "max_terms": 2})


# ----------------------------------------------------------------------------- dedupe / split

def test_dedupe_keeps_first_occurrence():
    recs = _recs(4) + [data.make_record("dup", "problem 2", source="toy", answer=9)]
    kept, removed = data.dedupe_records(recs)
    assert removed == 1 and kept == recs[:4]
    clash = [data.make_record("x", "a", source="t"), data.make_record("x", "b", source="t")]
    with pytest.raises(ValueError, match="Duplicate record id 'x'"):
        data.dedupe_records(clash)


@pytest.mark.parametrize("kwargs", [{"heldout_fraction": 0.2}, {"heldout_size": 37}])
def test_split_disjoint_deterministic(kwargs):
    recs = _recs(200)
    train, held = data.split_records(recs, **kwargs)
    assert (train, held) == data.split_records(list(recs), **kwargs)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(train) + len(held) == 200
    if "heldout_size" in kwargs:
        assert len(held) == 37
    else:
        assert 20 <= len(held) <= 60
    # Duplicated prompts land on one side only.
    dup = recs + [dict(r, id=r["id"] + "b") for r in recs[:50]]
    train2, held2 = data.split_records(dup, heldout_fraction=0.2)
    assert not {r["prompt"] for r in train2} & {r["prompt"] for r in held2}


# ----------------------------------------------------------------------------- pipeline

def test_sharding_disjoint_and_covering():
    recs = _recs(23)
    shards = _shards(recs, 2, drop=False)
    ids = [{r["id"] for r in s} for s in shards]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {r["id"] for r in recs}
    equal = _shards(recs, 3, drop=True)
    assert [len(s) for s in equal] == [7, 7, 7]
    # Through the full pipeline: one epoch per process, disjoint, same number of batches.
    seen = []
    for i in range(2):
        opts = grain.sharding.ShardOptions(i, 2, drop_remainder=True)
        ds = data.make_prompt_dataset(recs, batch_size=3, seed=0, shard_options=opts)
        seen.append([r["id"] for batch in data.make_prompt_iterator(ds) for r in batch])
    assert len(seen[0]) == len(seen[1]) == 9 and not set(seen[0]) & set(seen[1])


def test_single_process_default_sharding():
    ds = data.make_prompt_dataset(_recs(10), batch_size=5, seed=1)  # ShardByJaxProcess, 1 process
    batches = list(data.make_prompt_iterator(ds))
    assert len(batches) == 2 and all(isinstance(b, list) and len(b) == 5 for b in batches)
    assert sorted(r["id"] for b in batches for r in b) == sorted(r["id"] for r in _recs(10))


def test_shuffle_seeded_and_epochs_differ():
    recs = _recs(12)
    order = lambda seed: [r["id"] for b in data.make_prompt_iterator(
        data.make_prompt_dataset(recs, batch_size=4, seed=seed, num_epochs=2)) for r in b]
    a = order(0)
    assert a == order(0) and a != order(1)
    assert sorted(a[:12]) == sorted(a[12:]) and a[:12] != a[12:]


def test_iterator_state_restores_remaining_batches():
    ds = data.make_prompt_dataset(_recs(30), batch_size=4, seed=7, num_epochs=None)
    it = data.make_prompt_iterator(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    expected = [next(it) for _ in range(10)]
    resumed = data.make_prompt_iterator(ds, state)
    assert [next(resumed) for _ in range(10)] == expected
    # Batches are copies: mutating one does not leak into later epochs.
    expected[0][0]["prompt"] = "mutated"
    again = data.make_prompt_iterator(ds, state)
    assert next(again)[0]["prompt"] != "mutated"


def test_empty_dataset_errors():
    with pytest.raises(ValueError, match="No prompt records left from <no records>.*Fix:"):
        data.make_prompt_dataset([], batch_size=2, seed=0)
    train, held = data.split_records(_recs(3, "tiny"), heldout_size=3)
    with pytest.raises(ValueError, match="tiny after filtering/splitting"):
        data.make_prompt_dataset(train, batch_size=2, seed=0, source="tiny")
    with pytest.raises(ValueError, match="tiny.*sharding into 4 shards"):
        data.make_prompt_dataset(_recs(3, "tiny"), batch_size=1, seed=0,
                                 shard_options=grain.sharding.ShardOptions(0, 4, True))
    with pytest.raises(ValueError, match="no full batch of 8"):
        data.make_prompt_dataset(_recs(3, "tiny"), batch_size=8, seed=0)


# ----------------------------------------------------------------------------- templates

def test_student_and_teacher_messages():
    rec = data.make_record("r", "What is 2+3?", source="t", answer=5, solution="2+3=5")
    tpl = data.PromptTemplate(system="Be brief.")
    student, teacher = tpl.student(rec), tpl.teacher(rec)
    assert [m["role"] for m in student] == ["system", "user"]
    assert student[1]["content"] == 'What is 2+3?\n\nEnd with "Answer: <value>" on the last line.'
    assert "2+3=5" in teacher[1]["content"] and "What is 2+3?" in teacher[1]["content"]
    custom = data.PromptTemplate(teacher_template="{problem}|{solution}|{answer}")
    assert custom.teacher(rec)[-1]["content"] == "What is 2+3?|2+3=5|5"
    assert custom.teacher(dict(rec, solution=None))[-1]["content"] == "What is 2+3?|5|5"
    with pytest.raises(ValueError, match="unknown placeholders"):
        data.PromptTemplate(teacher_template="{problem} {hint}")
    with pytest.raises(ValueError, match="neither a solution nor an answer"):
        tpl.teacher(dict(rec, solution=None, answer=None))


def test_tokenize_prompts_raise_and_drop():
    tok = ByteTokenizer()
    recs = [data.make_record("short", "1+1?", source="t", answer=2),
            data.make_record("long", "x" * 500, source="t", answer=1)]
    tpl = data.PromptTemplate()
    limit = len(tok.encode(tok.apply_chat_template(tpl.student(recs[0])))) + 10
    with pytest.raises(ValueError,
                       match=rf"'long' is \d+ tokens, over max_prompt_len={limit}.*on_too_long='drop'"):
        data.tokenize_prompts(recs, tok, tpl.student, limit)
    out = data.tokenize_prompts(recs, tok, tpl.student, limit, on_too_long="drop")
    assert [r["id"] for r in out.records] == ["short"] and list(out.dropped) == ["long"]
    assert out.token_ids[0] == tok.encode(tok.apply_chat_template(tpl.student(recs[0])))
    assert all(len(t) <= limit for t in out.token_ids)
    teacher = data.tokenize_prompts(recs[:1], tok, tpl.teacher, 1000)
    assert len(teacher.token_ids[0]) > len(out.token_ids[0])


def test_tokenize_checks_before_expensive_work():
    """The error fires before anything downstream runs: no batch is returned at all."""
    tok = ByteTokenizer()
    recs = _recs(5) + [data.make_record("huge", "y" * 1000, source="toy")]
    with pytest.raises(ValueError, match="1 of 6 prompts are too long"):
        data.tokenize_prompts(recs, tok, data.PromptTemplate().student, 200)


def test_default_teacher_template_asks_for_the_students_answer_format():
    # issue 14: with data.instruction set and no teacher_template, the privileged teacher used to
    # get the default 'End with "Answer: <value>"' instruction instead of the student's
    import dataclasses
    import os

    from opd_jax.config import load_config
    from opd_jax.data.templates import DEFAULT_INSTRUCTION
    from opd_jax.train.run import make_template

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "tiny_test.yaml"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, instruction="{problem}\nPut the answer in \\boxed{{}}."))
    rec = {"id": "0", "prompt": "2+3?", "answer": "5", "solution": "2+3=5"}
    template = make_template(cfg)
    student = template.student(rec)[-1]["content"]
    teacher = template.teacher(rec)[-1]["content"]
    assert student == "2+3?\nPut the answer in \\boxed{}."
    assert teacher.startswith("2+3?\n\nHere is a reference solution:\n2+3=5\n\n")
    assert teacher.endswith("in your own words.\nPut the answer in \\boxed{}.")
    assert DEFAULT_INSTRUCTION not in teacher
