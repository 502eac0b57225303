"""Reading GGUF files (llama.cpp) with the ``gguf`` package: open a file, read a metadata field.

Shared by the weight loader (:mod:`opd_jax.model.gguf_loader`) and the tokenizer
(:mod:`opd_jax.model.tokenizer`), so neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["field", "open_gguf", "numpy_shape"]


def field(reader, key: str, default: Any = None) -> Any:
    """A metadata value (``default`` when absent)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if hasattr(f, "contents"):
        return f.contents()
    return _contents(f)


def _contents(f) -> Any:
    """``ReaderField.contents()`` for gguf releases that predate it."""
    import gguf  # third-party, optional: only GGUF files need it (here and below)

    text = lambda x: bytes(x).decode("utf-8")  # noqa: E731
    main = f.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [text(f.parts[i]) for i in f.data]
        return [v for i in f.data for v in f.parts[i].tolist()]
    if main == gguf.GGUFValueType.STRING:
        return text(f.parts[-1])
    return f.parts[-1].tolist()[0]


def open_gguf(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated / not a GGUF file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def numpy_shape(tensor) -> tuple[int, ...]:
    """Numpy (HF) order of a GGUF tensor's dims: ``ne`` reversed."""
    return tuple(int(d) for d in reversed(list(tensor.shape)))
