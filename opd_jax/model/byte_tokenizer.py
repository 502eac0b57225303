"""A byte-level tokenizer with ChatML specials, for random-init models (tests, smoke runs).

Ids 0-255 are bytes; 256 ``<|im_start|>``, 257 ``<|im_end|>`` (EOS), 258 ``<pad>``. It follows the
same protocol as the real tokenizers (``encode``/``decode``/``apply_chat_template``/``eos_ids``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from opd_jax.model.chat_template import check_template_kwargs

SPECIALS = {"<|im_start|>": 256, "<|im_end|>": 257, "<pad>": 258}
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class ByteTokenizer:
    vocab_size = 259
    bos_id = None
    pad_id = 258
    eos_ids = (257,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = []
        for part in _SPLIT.split(text):
            ids += [SPECIALS[part]] if part in SPECIALS else list(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        inv = {v: k for k, v in SPECIALS.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            if not skip_special:
                out.append(inv.get(i, ""))
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str | None:
        inv = {v: k for k, v in SPECIALS.items()}
        return inv.get(token_id, f"<0x{token_id:02X}>" if 0 <= token_id < 256 else None)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """ChatML. Extra template variables (``kwargs``) are checked and have no effect: ChatML
        reads none (as with ``transformers`` and a ChatML template)."""
        check_template_kwargs(kwargs)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
