"""Tokenizers behind one small protocol: Hugging Face ``tokenizer.json``, SentencePiece ``.model``
and the vocabulary embedded in a GGUF file.

Every implementation offers ``encode`` / ``decode``, the special ids the sampler and the losses need
(``eos_ids`` = end-of-sequence plus chat end-of-turn tokens such as ``<|im_end|>``; ``pad_id``;
``bos_id``) and ``apply_chat_template``, which renders the model's Jinja chat template the way
transformers does (sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``tojson``) and falls back to ChatML when the model ships none.

Special-token strings inside the text given to ``encode`` (``<|im_start|>``, ``<s>``, ``[INST]`` …)
become their single special ids, so ``encode(apply_chat_template(messages))`` tokenizes a chat
correctly with every backend.

Padding: ``pad_id`` is only a filler value; positions are always masked separately. When a model
defines no pad token (SentencePiece ``pad_id == -1`` as in Mistral, many HF configs) we use the
end-of-sequence id, or 0 when there is none either.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from opd_jax.model.chat_template import render_chat_template
from opd_jax.model.gguf_reader import field, open_gguf

# End-of-turn tokens of common chat formats; each one present as a special token joins ``eos_ids``.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                   "<end_of_turn>", "<|end|>", "</s>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of opd_jax needs from a tokenizer."""

    eos_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...


def eos_ids_of(tokenizer: Any, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids that end a completion: ``tokenizer.eos_ids`` (else its ``eos_id``; none for a
    ``None`` tokenizer) together with ``extra``, deduplicated and sorted.

    >>> eos_ids_of(None, extra=[7, 3, 7])
    (3, 7)
    """
    ids = getattr(tokenizer, "eos_ids", None) if tokenizer is not None else ()
    if ids is None:
        one = getattr(tokenizer, "eos_id", None)
        ids = () if one is None else (one,)
    return tuple(sorted({int(i) for i in (*ids, *extra)}))


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id (0 when it has none, or for a ``None`` tokenizer)."""
    return int(getattr(tokenizer, "pad_id", 0) or 0)


def _chat_end_ids(token_to_id, special: set[str]) -> list[int]:
    out = []
    for t in CHAT_END_TOKENS:
        if t in special:
            i = token_to_id(t)
            if i is not None:
                out.append(i)
    return out


def _dedupe(ids: Iterable[int | None]) -> tuple[int, ...]:
    seen: list[int] = []
    for i in ids:
        if i is not None and i >= 0 and i not in seen:
            seen.append(int(i))
    return tuple(seen)


# --- tokenizers (HF tokenizer.json and GGUF byte-level BPE) ---------------------------------------

class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus special ids and a chat template."""

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, extra_eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, pad_id: int | None = None):
        self.backend = tokenizer
        self.chat_template = chat_template
        tid = tokenizer.token_to_id
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tid(bos_token) if bos_token else None
        eos_id = tid(eos_token) if eos_token else None
        self._special = {t.content for t in tokenizer.get_added_tokens_decoder().values()
                         if t.special}
        self.eos_ids = _dedupe([eos_id, *extra_eos_ids, *_chat_end_ids(tid, self._special)])
        if pad_id is None:
            pad_id = tid(pad_token) if pad_token else None
        if pad_id is None:
            pad_id = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad_id)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    **kwargs)

    def __repr__(self) -> str:
        return (f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id})")


def _token_str(value) -> str | None:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _folder_chat_template(folder: Path, tok_config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    template = template or tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _folder_eos_ids(folder: Path) -> list[int]:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def hf_tokenizer(folder: str | os.PathLike, *, pad_id: int | None = None) -> HFTokenizer:
    """``tokenizer.json`` with ``tokenizer_config.json`` / ``special_tokens_map.json`` specials and
    the chat template (``chat_template.jinja`` / ``chat_template.json`` / tokenizer_config)."""
    from tokenizers import Tokenizer as _Backend  # third-party (Rust); imported on use, as below

    folder = Path(folder)
    backend = _Backend.from_file(str(folder / "tokenizer.json"))
    cfg = {**_read_json(folder / "special_tokens_map.json"),
           **_read_json(folder / "tokenizer_config.json")}
    return HFTokenizer(backend, bos_token=_token_str(cfg.get("bos_token")),
                       eos_token=_token_str(cfg.get("eos_token")),
                       pad_token=_token_str(cfg.get("pad_token")),
                       extra_eos_ids=_folder_eos_ids(folder),
                       chat_template=_folder_chat_template(folder, cfg), pad_id=pad_id)


# Pre-tokenizer regexes of llama.cpp's ``tokenizer.ggml.pre`` values (see llama-vocab.cpp).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")


def _gguf_pre_tokenizer(pre: str | None):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if pre in (None, "default", "gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
    if regex is None:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to opd_jax; using GPT-2 splitting "
                      "(tokenization may differ slightly from llama.cpp)", stacklevel=3)
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_pre_name(backend) -> str | None:
    """The ``tokenizer.ggml.pre`` name whose splitting (as this module builds it) equals the
    ``tokenizers.Tokenizer`` ``backend``'s pre-tokenizer, or None (GGUF export writes it)."""
    import json

    from tokenizers import Tokenizer as _Backend
    from tokenizers import models

    def spec(pre_tokenizer) -> dict | None:
        scratch = _Backend(models.BPE())
        scratch.pre_tokenizer = pre_tokenizer
        return json.loads(scratch.to_str())["pre_tokenizer"]

    have = json.loads(backend.to_str())["pre_tokenizer"]
    return next((name for name in ("gpt2", "smollm", "llama-bpe", "qwen2")
                 if spec(_gguf_pre_tokenizer(name)) == have), None)


def tokenizer_from_gguf(reader_or_path) -> HFTokenizer:
    """Byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) built from a GGUF's
    ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``, its special ids and chat template."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as _Backend

    reader = reader_or_path if hasattr(reader_or_path, "fields") else open_gguf(reader_or_path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                         "'gpt2'); load the tokenizer from the original HF folder instead")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: matched atomically in text, never split by BPE.
    added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    backend.add_special_tokens([a for a in added if a.special])
    backend.add_tokens([a for a in added if not a.special])

    def tok(key: str) -> str | None:
        i = field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    pad = field(reader, "tokenizer.ggml.padding_token_id")
    return HFTokenizer(backend, bos_token=tok("tokenizer.ggml.bos_token_id"),
                       eos_token=tok("tokenizer.ggml.eos_token_id"),
                       extra_eos_ids=[i for i in (field(reader, "tokenizer.ggml.eot_token_id"),
                                                  field(reader, "tokenizer.ggml.eom_token_id"))
                                      if i is not None],
                       chat_template=field(reader, "tokenizer.chat_template"),
                       pad_id=None if pad is None else int(pad))


# --- SentencePiece ----------------------------------------------------------------------------------

class SentencePieceTokenizer:
    """A SentencePiece ``.model``. Control pieces (``<s>``, ``</s>``, ``[INST]`` …) written in the
    text are encoded as their ids. ``pad_id``: the model's own, else ``eos``, else 0 (see module doc).
    """

    def __init__(self, model_file: str | os.PathLike, *, chat_template: str | None = None,
                 pad_id: int | None = None):
        import sentencepiece as spm  # third-party, optional: only .model tokenizers

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
        self._control = {i: sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)}
        pieces = {p: i for i, p in self._control.items()}
        self.eos_ids = _dedupe([eos, *_chat_end_ids(pieces.get, set(pieces))])
        if pad_id is None:
            pad_id = sp.pad_id() if sp.pad_id() >= 0 else (eos if eos is not None else 0)
        self.pad_id = int(pad_id)
        self.chat_template = chat_template
        self._split = (re.compile("(" + "|".join(re.escape(p) for p in
                                                 sorted(pieces, key=len, reverse=True)) + ")")
                       if pieces else None)
        self._piece_ids = pieces

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this SentencePiece model has no BOS piece")
            ids.append(self.bos_id)
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self._piece_ids:
                ids.append(self._piece_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self._control])
        out, run = [], []
        for i in ids:
            if i in self._control:
                out.append(self.sp.decode(run))
                out.append(self._control[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(int(token_id)) if 0 <= token_id < self.vocab_size else None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        bos = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        eos = self.sp.id_to_piece(self.eos_ids[0]) if self.eos_ids else ""
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=bos, eos_token=eos, **kwargs)

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id})")


# --- dispatch ---------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike, *, pad_id: int | None = None) -> Tokenizer:
    """A tokenizer from a HF folder (``tokenizer.json`` or ``tokenizer.model``), a ``tokenizer.json``,
    a SentencePiece ``.model`` (``tokenizer.model.v3`` …) or a ``.gguf`` file."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return hf_tokenizer(path, pad_id=pad_id)
        sp = sorted(path.glob("*.model")) or sorted(path.glob("tokenizer.model*"))
        if sp:
            return sentencepiece_tokenizer(sp[0], pad_id=pad_id)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0], pad_id=pad_id)
        raise ValueError(f"no tokenizer in {path}: expected tokenizer.json, a SentencePiece "
                         f"*.model or one *.gguf; found {sorted(p.name for p in path.iterdir())}")
    if not path.exists():
        raise ValueError(f"tokenizer path {path} does not exist")
    if path.suffix == ".gguf":
        tok = tokenizer_from_gguf(path)
        if pad_id is not None:
            tok.pad_id = int(pad_id)
        return tok
    if path.suffix == ".json":
        return hf_tokenizer(path.parent, pad_id=pad_id) if path.name == "tokenizer.json" else \
            HFTokenizer(__import__("tokenizers").Tokenizer.from_file(str(path)), pad_id=pad_id)
    if ".model" in path.name:
        return sentencepiece_tokenizer(path, pad_id=pad_id)
    raise ValueError(f"cannot tell the tokenizer type of {path} (want a folder, tokenizer.json, "
                     "a SentencePiece .model or a .gguf)")


def sentencepiece_tokenizer(model_file: str | os.PathLike, *, pad_id: int | None = None
                            ) -> SentencePieceTokenizer:
    """SentencePiece model with the chat template of a sibling ``tokenizer_config.json``, if any."""
    folder = Path(model_file).parent
    template = _folder_chat_template(folder, _read_json(folder / "tokenizer_config.json"))
    return SentencePieceTokenizer(model_file, chat_template=template, pad_id=pad_id)
