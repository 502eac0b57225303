"""``load_model``: one entry point for Hugging Face folders and GGUF files, and the ``Model`` bundle.

>>> from opd_jax.model.loading import load_model           # doctest: +SKIP
>>> teacher = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> teacher.logits([[1, 2, 3]]).shape                        # doctest: +SKIP
(1, 3, 49152)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.model.gguf_loader import load_gguf
from opd_jax.model.hf_loader import load_hf
from opd_jax.model.tokenizer import Tokenizer, load_tokenizer


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(params, lora, tokens_BxT, valid_BxT, config: ModelConfig):
    hidden_BxTxD, _ = decoder.forward(params, config, tokens_BxT, valid_BxT=valid_BxT, lora=lora)
    return decoder.logits(params, config, hidden_BxTxD)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: architecture, parameter tree (see ``opd_jax.model.config``), tokenizer.

    Attributes:
      config: the ``ModelConfig``.
      params: the parameter tree, placed on the mesh it was loaded with.
      tokenizer: a ``Tokenizer`` or ``None`` (weights-only checkpoints).
      lora: LoRA adapters applied by ``logits`` (``None``: base weights).
    """

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer | None = None
    lora: decoder.Lora | None = None

    def logits(self, tokens_BxT, valid_BxT=None) -> jax.Array:
        """``[B, T]`` int tokens → ``[B, T, V]`` float32 logits (jitted; for small inputs only —
        training code chunks the unembedding instead)."""
        tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
        if tokens_BxT.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens_BxT.shape}")
        if valid_BxT is not None:
            valid_BxT = jnp.asarray(valid_BxT, bool)
        return _logits(self.params, self.lora, tokens_BxT, valid_BxT, config=self.config)

    def replace(self, **changes: Any) -> "Model":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        return f"Model({self.config}, tokenizer={self.tokenizer!r}, lora={self.lora is not None})"


def _folder_tokenizer(folder: Path) -> Tokenizer | None:
    if (folder / "tokenizer.json").exists() or list(folder.glob("*.model")):
        return load_tokenizer(folder)
    return None


def load_model(path: str | os.PathLike, dtype: str = "float32", *, mesh=None,
               rules="fsdp") -> Model:
    """Load a Hugging Face folder (``config.json`` + safetensors) or a ``.gguf`` file.

    Args:
      path: a HF model folder, a ``.gguf`` file, or a folder holding exactly one ``.gguf``.
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"``.
      mesh: where to place the parameters (default: a single-device mesh); each leaf goes straight
        into its sharding under ``rules``.
      rules: sharding rules table name (``"fsdp"``, ``"fsdp_tp"``) or mapping.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"model path {path} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"{path} is neither a Hugging Face folder (no config.json) nor holds "
                             f"exactly one .gguf (found {[p.name for p in ggufs]})")
        path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file or a Hugging Face folder")
        config, params, tokenizer = load_gguf(path, dtype, mesh=mesh, rules=rules)
        return Model(config, params, tokenizer)
    config, params = load_hf(path, dtype, mesh=mesh, rules=rules)
    return Model(config, params, _folder_tokenizer(path))


def check_same_vocab(teacher: Model, student: Model, *, show: int = 5) -> None:
    """Refuse a teacher/student pair that does not share one vocabulary (distillation compares
    distributions id by id). Compares vocab sizes and, when both have tokenizers, BOS/EOS ids and
    the token string of every id; the error lists the first ``show`` differences."""
    problems = []
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        problems.append(f"vocab sizes differ: teacher {tv}, student {sv}")
    tt, st = teacher.tokenizer, student.tokenizer
    if tt is not None and st is not None:
        if tt.vocab_size != st.vocab_size:
            problems.append(f"tokenizer vocab sizes differ: teacher {tt.vocab_size}, "
                            f"student {st.vocab_size}")
        if tt.bos_id != st.bos_id:
            problems.append(f"bos ids differ: teacher {tt.bos_id}, student {st.bos_id}")
        if set(tt.eos_ids) != set(st.eos_ids):
            problems.append(f"eos ids differ: teacher {tt.eos_ids}, student {st.eos_ids}")
        diffs = []
        for i in range(min(tt.vocab_size, st.vocab_size)):
            a, b = tt.id_to_token(i), st.id_to_token(i)
            if a != b:
                diffs.append(f"id {i}: teacher {a!r} vs student {b!r}")
                if len(diffs) >= show:
                    break
        if diffs:
            problems.append("token strings differ at " + "; ".join(diffs))
    if problems:
        raise ValueError("teacher and student do not share a vocabulary: " + "; ".join(problems))
