"""Tokenizers: GGUF byte-level BPE (tiny hand-made vocab and the real SmolLM2 vocab) against
transformers' GPT-2 tokenizer on the same vocab/merges, SentencePiece trained in the test (pad
handling, control pieces), HF tokenizer.json folders, chat templates."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from _gpt2_bytes import bytes_to_unicode

from opd_jax.model.chat_template import CHATML_TEMPLATE, render_chat_template
from opd_jax.model.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    eos_ids_of,
    load_tokenizer,
    pad_id_of,
    tokenizer_from_gguf,
)

TEXTS = ["Hello world!", "hello world, this is hell", "What is 2+3? The year 2024 had 366 days.",
         "  leading spaces\n\n\ttabs and émojis 🤗 ", "def f(x):\n    return x**2  # comment",
         "don't I'll we've", "<|im_start|>user\nhi<|im_end|>\n", ""]




SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t", "h i",
          "Ġt hi", "Ġthi s", "i s", "Ġ is"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_vocab():
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gpt2_reference(tokens, types, merges):
    """transformers' GPT-2 byte-level BPE on the same vocab and merges (4.x and 5.x APIs)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:  # transformers >= 5: the tokenizer takes the vocab and merges directly
        ref = transformers.GPT2Tokenizer(vocab=vocab, merges=pairs)
        assert len(ref) >= len(tokens)
    except (TypeError, AssertionError):  # transformers 4.x: files
        import tempfile

        d = Path(tempfile.mkdtemp())
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        ref = transformers.GPT2TokenizerFast(vocab_file=str(d / "vocab.json"),
                                             merges_file=str(d / "merges.txt"))
    ref.add_tokens([AddedToken(tokens[i], special=True, normalized=False)
                    for i in range(len(tokens)) if types[i] == 3], special_tokens=True)
    return ref


# --- GGUF vocab -------------------------------------------------------------------------------------

def test_gguf_tiny_vocab(tiny_gguf):
    tok = load_tokenizer(tiny_gguf)
    assert isinstance(tok, Tokenizer) and isinstance(tok, HFTokenizer)
    tokens, _ = tiny_vocab()
    assert tok.vocab_size == len(tokens) and tok.bos_id == 1
    assert tok.eos_ids == (2, 0)  # eos, then the other chat end token present
    assert tok.pad_id == 2  # no padding id in the file: eos
    ids = tok.encode("hello world this is")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld", "Ġthis", "Ġis"]
    assert tok.encode("hi", add_bos=True)[0] == 1
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=False) == text
    chat = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2 and "<|im_start|>" not in tok.decode(chat)
    assert tok.decode(chat) == "user\nhello"


@pytest.mark.torch
def test_gguf_tiny_vocab_matches_transformers(tiny_gguf):
    tok = load_tokenizer(tiny_gguf)
    tokens, types = tiny_vocab()
    ref = gpt2_reference(tokens, types, MERGES)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def smollm2_vocab():
    from opd_jax.model.assets import default_teacher_path
    from opd_jax.model.gguf_reader import field, open_gguf

    reader = open_gguf(default_teacher_path())
    return reader, [field(reader, k) for k in
                    ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")]


@pytest.mark.torch
def test_smollm2_gguf_tokenizer_matches_transformers():
    reader, (tokens, types, merges) = smollm2_vocab()
    tok = tokenizer_from_gguf(reader)
    assert tok.vocab_size == 49152 and tok.bos_id == 1 and tok.eos_ids[0] == 2 and tok.pad_id == 2
    assert tok.id_to_token(2) == "<|im_end|>"
    ref = gpt2_reference(tokens, types, merges)
    more = ["The quick brown fox jumps over the lazy dog. " * 3, "x = [1, 22, 333]; y = {'a': 0}",
            "Ünïcödé ünd 日本語 テキスト", "tabs\tand\r\nwindows newlines", "a" * 50]
    for text in TEXTS + more:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special=False) == text
    ref.chat_template = tok.chat_template
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 2+4?"}]
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


# --- HF tokenizer.json folders ---------------------------------------------------------------------

def test_hf_folder_tokenizer(tiny_gguf, tmp_path):
    gtok = load_tokenizer(tiny_gguf)
    gtok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2, 0), 0)
    for text in TEXTS:
        assert tok.encode(text) == gtok.encode(text)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # a chat_template.jinja file wins over tokenizer_config (newer transformers layout)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "u", "content": "x"}]) == "x!"
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_ids == (2, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")


# --- SentencePiece ---------------------------------------------------------------------------------

def _corpus(n=400):
    subjects = ["the cat", "a dog", "my teacher", "the student", "our model", "every token"]
    verbs = ["reads", "writes", "predicts", "samples", "distills", "counts"]
    objects = ["a book", "the answer", "many numbers", "its own rollouts", "the next word",
               "seven apples"]
    return [f"{subjects[i % 6]} {verbs[(i // 6) % 6]} {objects[(i // 36) % 6]} number {i}."
            for i in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=120, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["[INST]", "[/INST]"],
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder / "tokenizer.model"


def test_sentencepiece_pad_and_specials(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert tok.sp.pad_id() == -1
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 2)  # no pad piece: eos
    assert load_tokenizer(sp_model, pad_id=0).pad_id == 0
    text = "the cat reads a book number 7."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode(text, add_bos=True) == [1, *ids]
    inst, end_inst = tok.sp.piece_to_id("[INST]"), tok.sp.piece_to_id("[/INST]")
    chat = tok.encode("<s>[INST] the dog [/INST] counts</s>")
    assert chat[:2] == [1, inst] and end_inst in chat and chat[-1] == 2
    assert tok.decode(chat) == "the dog counts"
    assert tok.decode(chat, skip_special=False).startswith("<s>[INST]")
    assert tok.id_to_token(inst) == "[INST]" and tok.id_to_token(10_000) is None


def test_sentencepiece_with_pad_piece_and_template(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buf,
                                   vocab_size=100, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                "{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_id == 3
    text = tok.apply_chat_template([{"role": "user", "content": "a dog"},
                                    {"role": "assistant", "content": "reads"}])
    assert text == "<s>[INST] a dog [/INST]reads</s>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2


# --- chat templates ---------------------------------------------------------------------------------

def test_chat_templates():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat_template(None, msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_template(CHATML_TEMPLATE, msgs, add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    assert render_chat_template("{{ messages | tojson }}", msgs) == '[{"role": "user", "content": "hi"}]'
    gen = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert render_chat_template(gen, msgs) == "hi"
    # trim_blocks / lstrip_blocks as in transformers
    assert render_chat_template("  {% if true %}\nA{% endif %}\n", msgs) == "A"
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
        render_chat_template("{{ raise_exception('no system') }}", msgs)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.mro()[1].__subclasses__() }}",
                             msgs)
    with pytest.raises(ValueError, match="role"):
        render_chat_template(None, [{"content": "x"}])


def test_eos_and_pad_id_helpers():
    class Tok:
        eos_ids = (5, 2)
        pad_id = None

    class OneEos:
        eos_id = 9
        pad_id = 3

    assert eos_ids_of(Tok()) == (2, 5)
    assert eos_ids_of(Tok(), extra=[7, 5]) == (2, 5, 7)
    assert eos_ids_of(OneEos()) == (9,)
    assert eos_ids_of(None) == () and eos_ids_of(None, extra=(4,)) == (4,)
    assert pad_id_of(Tok()) == 0 and pad_id_of(OneEos()) == 3 and pad_id_of(None) == 0
