"""Prompt templates as the references build them (issue 14, "Templates"): OPSD's exact student and
teacher prompts in the shipped OPSD config, and chat-template kwargs (``enable_thinking``) reaching
every render, with clear config errors for values a template cannot take."""

from __future__ import annotations

import os

import pytest

from opd_jax.config import ConfigError, load_config
from opd_jax.data import PromptTemplate, make_record, tokenize_prompts
from opd_jax.data.templates import OPSD_STUDENT_TEMPLATE, OPSD_TEACHER_TEMPLATE, render_prompt
from opd_jax.model.byte_tokenizer import ByteTokenizer
from opd_jax.model.chat_template import render_chat_template
from opd_jax.train.rollout import encode_prompts
from opd_jax.train.run import make_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPSD = os.path.join(ROOT, "configs", "qwen3_opsd.yaml")
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")

# Qwen3's chat template, reduced to what matters here: ChatML turns and the generation prompt's
# enable_thinking branch (Qwen3-*/tokenizer_config.json: `enable_thinking is defined and
# enable_thinking is false` appends an empty think block)
QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
THINK_OFF = "<think>\n\n</think>\n\n"


class ReferenceCollator:
    """siyan-zhao/OPSD ``SelfDistillationDataCollator`` string construction, ported verbatim
    (data_collator.py:28, :52, :82-87; ``reason_first=False``, the default of opsd_train.py:57)."""

    transition_prompt = "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your own step-by-step reasoning that derives the same final answer to the problem below:\n"  # noqa: E501

    def student_user_message(self, problem):
        return f"Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."  # noqa: E501

    def teacher_user_message(self, problem, solution):
        return (
            f"{problem}\n\n"
            f"Here is a reference solution to this problem:\n{solution}\n"
            f"{self.transition_prompt}\n"
            f"Please reason step by step, and put your final answer within \\boxed{{}}."
        )


class Qwen3StyleTokenizer:
    """Bytes plus the Qwen3-style template, rendered by opd_jax's renderer (kwargs pass through)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return render_chat_template(QWEN3_STYLE, messages,
                                    add_generation_prompt=add_generation_prompt, **kwargs)

    def encode(self, text):
        return list(text.encode("utf-8"))


PROBLEM = "Let $f(x) = \\frac{1}{x}$ for {x > 0}. Find $f(f(2))$."
SOLUTION = "$f(2) = \\tfrac12$, so $f(f(2)) = f(\\tfrac12) = 2$. The answer is $\\boxed{2}$."


def test_opsd_config_prompts_equal_the_reference_strings():
    cfg = load_config(OPSD)
    template = make_template(cfg)
    assert (template.student_template, template.teacher_template) == (OPSD_STUDENT_TEMPLATE,
                                                                      OPSD_TEACHER_TEMPLATE)
    rec = make_record("r0", PROBLEM, source="t", answer="2", solution=SOLUTION)
    ref = ReferenceCollator()
    student = [{"role": "user", "content": ref.student_user_message(PROBLEM)}]
    teacher = [{"role": "user", "content": ref.teacher_user_message(PROBLEM, SOLUTION)}]
    assert template.student(rec) == student
    assert template.teacher(rec) == teacher
    # rendered: the reference applies the tokenizer's chat template with add_generation_prompt
    # and no kwargs (Qwen3: thinking mode); the config's enable_thinking: true renders the same
    tok = Qwen3StyleTokenizer()
    for ours, theirs in ((template.student, student), (template.teacher, teacher)):
        rendered = render_prompt(tok, ours(rec), template.chat_template_kwargs)
        assert rendered == tok.apply_chat_template(theirs, add_generation_prompt=True)
        assert rendered.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_enable_thinking_changes_the_rendered_prompt():
    rec = make_record("r0", "2+3?", source="t", answer="5", solution="2+3=5")
    tok = Qwen3StyleTokenizer()
    default = PromptTemplate()
    off = PromptTemplate(chat_template_kwargs={"enable_thinking": False})
    on = PromptTemplate(chat_template_kwargs={"enable_thinking": True})
    plain = render_prompt(tok, default.student(rec), default.chat_template_kwargs)
    assert not plain.endswith(THINK_OFF)
    assert render_prompt(tok, on.student(rec), on.chat_template_kwargs) == plain
    assert render_prompt(tok, off.student(rec), off.chat_template_kwargs) == plain + THINK_OFF
    ids = tokenize_prompts([rec], tok, off.teacher, 4096,
                           chat_template_kwargs=off.chat_template_kwargs).token_ids[0]
    assert bytes(ids).decode().endswith("<|im_start|>assistant\n" + THINK_OFF)


def test_chat_template_kwargs_from_the_config_reach_rollout_prompts():
    """data.chat_template_kwargs -> make_template -> the trainer's prompt encoding (student and
    privileged teacher)."""
    recs = [make_record("r0", "2+3?", source="t", answer="5", solution="2+3=5")]
    tok = Qwen3StyleTokenizer()
    texts = {}
    for value in ("true", "false"):
        cfg = load_config(TINY, [f"data.chat_template_kwargs.enable_thinking={value}"])
        assert cfg.data.chat_template_kwargs == {"enable_thinking": value == "true"}
        p = encode_prompts(recs, tok, make_template(cfg), max_prompt_len=512,
                           privileged_teacher=True, pad_id=0)
        texts[value] = [bytes(int(t) for t, v in zip(row, valid) if v).decode()
                        for row, valid in ((p.student_tokens[0], p.student_valid[0]),
                                           (p.teacher_tokens[0], p.teacher_valid[0]))]
    for on, off in zip(texts["true"], texts["false"]):
        assert off == on + THINK_OFF


def test_hf_tokenizer_passes_kwargs_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from opd_jax.model.tokenizer import load_tokenizer

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hi": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                               eos_token="<|im_end|>")
    ref.chat_template = QWEN3_STYLE
    ref.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        assert ours.apply_chat_template(msgs, **kwargs) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template(msgs, enable_thinking=False).endswith(THINK_OFF)


def test_byte_tokenizer_accepts_and_checks_kwargs():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, enable_thinking=False) == tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="may not set 'bos_token'"):
        tok.apply_chat_template(msgs, bos_token="<s>")
    with pytest.raises(ValueError, match="may not set 'messages'"):
        PromptTemplate(chat_template_kwargs={"messages": []})


@pytest.mark.parametrize("override, match", [
    ("data.chat_template_kwargs.when=2024-01-01",
     r"data\.chat_template_kwargs\.when=datetime\.date\(2024, 1, 1\) is invalid: a bool, number, "
     r"string or null, or a list / mapping of these \(found a date\)"),
    ("data.chat_template_kwargs.tools=[{a: 1}, !!set {b}]", r"tools=.*\(found a set\)"),
    ("data.chat_template_kwargs.messages=[]",
     r"chat_template_kwargs\.messages=\[\] is invalid: a chat-template variable name.*renderer"),
    ("data.chat_template_kwargs.add_generation_prompt=false", r"add_generation_prompt=False"),
    ("data.chat_template_kwargs={enable-thinking: false}", r"enable-thinking=False.*identifier"),
    ("data.chat_template_kwargs={1: false}", r"chat_template_kwargs\.1: expected str, got int"),
    ("data.chat_template_kwargs=[enable_thinking]", r"chat_template_kwargs: expected a mapping"),
])
def test_chat_template_kwargs_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_nested_plain_values_are_accepted():
    cfg = load_config(TINY, ["data.chat_template_kwargs={enable_thinking: false, "
                             "tools: [{name: f, args: [1, 2.5, null]}], date_string: '26 Jul'}"])
    assert cfg.data.chat_template_kwargs["tools"][0]["args"] == [1, 2.5, None]
    assert make_template(cfg).chat_template_kwargs == cfg.data.chat_template_kwargs
