"""Loaders without torch: HF folders written with numpy safetensors, tiny GGUF files written with
``gguf.GGUFWriter`` (quantized, llama.cpp q/k permutation), ``load_model``, vocab checks, derived
students and sharded placement on 8 fake CPU devices."""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gpt2_bytes import bytes_to_unicode

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig, RopeScaling, param_shapes
from opd_jax.model.derive import derive_student, random_student
from opd_jax.model.gguf_loader import load_gguf, unpermute_qk
from opd_jax.model.hf_loader import config_from_hf, load_hf, to_hf_config, to_hf_state_dict
from opd_jax.model.layers import rope_inv_freq
from opd_jax.model.loading import Model, check_same_vocab, load_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, ffn_dim=96, rope_theta=10000.0, rms_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params with non-trivial norms and biases (so every leaf matters)."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)

    def make(path, shape):
        if "norm" in path:
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (0.15 * rng.standard_normal(shape)).astype(np.float32)

    out = {k: make(k, s) for k, s in shapes.items() if k != "layers"}
    out["layers"] = {k: make(k, s) for k, s in shapes["layers"].items()}
    return out


def write_hf_folder(path: Path, config: ModelConfig, params: dict, n_files: int = 1,
                    state: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_hf_config(config)))
    state = to_hf_state_dict(config, params) if state is None else state
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    if n_files == 1:
        save_file({n: state[n] for n in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for j, chunk in enumerate(np.array_split(np.array(names), n_files)):
        fname = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(path / fname))
        weight_map.update({n: fname for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                   "weight_map": weight_map}))
    return path


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file by hand (numpy cannot save BF16): name -> (dtype tag, array)."""
    header, blobs, offset = {}, [], 0
    for name, (tag, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def assert_params_equal(a: dict, b: dict, atol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   atol=atol, rtol=0, err_msg=jax.tree_util.keystr(p))


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(config, params, tokens):
    h, _ = decoder.forward(params, config, tokens)
    return decoder.logits(params, config, h)


def ref_logits(config, params, tokens):
    return np.asarray(_jit_logits(config, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens)))


# --- Hugging Face folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(),
    dict(family="qwen2", qkv_bias=True),
    dict(family="qwen3", qk_norm=True, head_dim=24),
    dict(tie_embeddings=True, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
], ids=["llama", "qwen2", "qwen3", "tied_llama3"])
def test_hf_folder_roundtrip(tmp_path, kw):
    config = tiny_config(**kw)
    params = random_params(config)
    folder = write_hf_folder(tmp_path / "m", config, params)
    loaded_config, loaded = load_hf(folder)
    assert loaded_config == config
    assert_params_equal(loaded, params)


def test_hf_sharded_index(tmp_path):
    config = tiny_config(n_layers=3)
    params = random_params(config, seed=1)
    folder = write_hf_folder(tmp_path / "m", config, params, n_files=4)
    assert len(list(folder.glob("*.safetensors"))) == 4
    _, loaded = load_hf(folder)
    assert_params_equal(loaded, params)


def test_hf_bf16_checkpoint_and_dtypes(tmp_path):
    import ml_dtypes

    config = tiny_config()
    params = random_params(config, seed=2)
    state = to_hf_state_dict(config, params)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_hf_config(config)))
    write_raw_safetensors(folder / "model.safetensors",
                          {n: ("BF16", a.astype(ml_dtypes.bfloat16)) for n, a in state.items()})
    bf = jax.tree.map(lambda x: np.asarray(x.astype(ml_dtypes.bfloat16), np.float32), params)
    _, loaded32 = load_hf(folder, "float32")
    assert_params_equal(loaded32, bf)
    _, loaded16 = load_hf(folder, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(loaded16)} == {jnp.dtype(jnp.bfloat16)}
    assert_params_equal(loaded16, bf)
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_hf(folder, "float16")


def test_hf_config_variants():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    # transformers 4.x layout
    c4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    # transformers 5.x layout
    c5 = config_from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert c4 == c5 and c4.rope_theta == 500000.0 and c4.rope_scaling.factor == 32.0
    assert c4.head_dim == 4 and c4.n_kv_heads == 1
    for bad, match in [({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2"),
                       ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
                       ({"attention_bias": True}, "attention_bias")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf({**base, **bad})


def test_hf_errors_name_the_tensor(tmp_path):
    config = tiny_config()
    params = random_params(config)
    state = to_hf_state_dict(config, params)

    missing = dict(state)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(write_hf_folder(tmp_path / "a", config, params, state=missing))

    extra = {**state, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor.*o_proj\.bias"):
        load_hf(write_hf_folder(tmp_path / "b", config, params, state=extra))

    wrong = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)}
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(48, 64\), expected \(32, 64\)"):
        load_hf(write_hf_folder(tmp_path / "c", config, params, state=wrong))

    folder = write_hf_folder(tmp_path / "d", config, params)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:20])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_hf(folder)

    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path / "e")


# --- GGUF -------------------------------------------------------------------------------------------

def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest]}"




TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t",
               "h i", "Ġt hi", "Ġthi s", "i s", "Ġ is"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(TINY_SPECIALS) + list(bytes_to_unicode().values())
    for m in TINY_MERGES:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types, list(TINY_MERGES)


def write_tiny_gguf(path: Path, config: ModelConfig, params: dict, qtypes: dict | None = None,
                    *, arch: str = "llama", rope_freqs: np.ndarray | None = None,
                    drop: tuple[str, ...] = (), with_vocab: bool = True,
                    orig_ctx: int | None = None) -> dict[str, np.ndarray]:
    """Write ``params`` the way llama.cpp's converter does; return the dequantized HF state dict
    (unpermuted) the loader must reproduce."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_position)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    if orig_ctx is not None:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    if with_vocab:
        tokens, types, merges = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                            "assistant\n{% endif %}")
    state = to_hf_state_dict(config, params)
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    expected = {}
    for hf_name, arr in state.items():
        name = gguf_name(hf_name)
        if name in drop:
            continue
        if name.endswith("attn_q.weight") and arch == "llama":
            arr = llama_cpp_permute(arr, config.n_heads, config.n_heads)
        elif name.endswith("attn_k.weight") and arch == "llama":
            arr = llama_cpp_permute(arr, config.n_heads, config.n_kv_heads)
        kind = next((q for suffix, q in qtypes.items() if name.endswith(suffix)), Q.F32)
        if arr.ndim == 1:
            kind = Q.F32
        data = gguf.quants.quantize(arr, kind)
        w.add_tensor(name, data, raw_dtype=kind)
        deq = gguf.quants.dequantize(data, kind).reshape(arr.shape)
        expected[hf_name] = deq
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # undo the permutation on the dequantized reference (the loader must do the same)
    for hf_name in list(expected):
        if arch != "llama":
            break
        if hf_name.endswith("q_proj.weight"):
            expected[hf_name] = unpermute_reference(expected[hf_name], config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            expected[hf_name] = unpermute_reference(expected[hf_name], config.n_kv_heads)
    return expected


def unpermute_reference(w: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``llama_cpp_permute`` by brute force: find the row order it applies."""
    rows = np.arange(w.shape[0], dtype=np.float64)[:, None]
    order = llama_cpp_permute(rows, n, n)[:, 0].astype(int)  # permuted[j] = original[order[j]]
    out = np.empty_like(w)
    out[order] = w
    return out


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n, E in [(4, 16), (3, 64), (9, 64)]:
        w = rng.standard_normal((n * E, 24)).astype(np.float32)
        p = llama_cpp_permute(w, n, n)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, n), w)
        np.testing.assert_array_equal(unpermute_reference(p, n), w)


def _qtypes():
    from gguf import GGMLQuantizationType as Q

    return {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1,
            "attn_v.weight": Q.F16, "attn_output.weight": Q.BF16, "ffn_gate.weight": Q.Q8_0,
            "ffn_up.weight": Q.Q4_0, "ffn_down.weight": Q.F32, "output.weight": Q.Q8_0}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_quantized_llama_matches_hf_path(tmp_path, tied):
    config = tiny_config(vocab_size=len(tiny_vocab()[0]), tie_embeddings=tied)
    params = random_params(config, seed=3)
    expected = write_tiny_gguf(tmp_path / "m.gguf", config, params, _qtypes())
    g_config, g_params, tok = load_gguf(tmp_path / "m.gguf")
    assert g_config == config.replace(max_position=config.max_position)
    # the same dequantized weights through the HF path
    folder = write_hf_folder(tmp_path / "hf", config, params, state=dict(expected))
    _, h_params = load_hf(folder)
    assert_params_equal(g_params, h_params)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    np.testing.assert_allclose(ref_logits(g_config, g_params, tokens),
                               ref_logits(config, h_params, tokens), atol=1e-5, rtol=0)
    assert tok is not None and tok.eos_ids[0] == 2


def test_gguf_qwen3_and_llama3_rope_freqs(tmp_path):
    config = tiny_config(family="qwen3", qk_norm=True, vocab_size=len(tiny_vocab()[0]))
    params = random_params(config, seed=4)
    expected = write_tiny_gguf(tmp_path / "q.gguf", config, params, arch="qwen3")
    g_config, g_params, _ = load_gguf(tmp_path / "q.gguf")
    assert g_config == config
    _, h_params = load_hf(write_hf_folder(tmp_path / "hf", config, params, state=expected))
    assert_params_equal(g_params, h_params)

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position=64)
    lconfig = tiny_config(vocab_size=len(tiny_vocab()[0]), rope_theta=500.0)
    base = rope_inv_freq(16, 500.0, None)
    factors = base / rope_inv_freq(16, 500.0, scaling)
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, lconfig, random_params(lconfig), rope_freqs=factors, orig_ctx=64)
    r_config = load_gguf(path, with_tokenizer=False)[0]
    assert r_config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    write_tiny_gguf(path, lconfig, random_params(lconfig), rope_freqs=factors * 1.5, orig_ctx=64)
    with pytest.raises(ValueError, match="rope_freqs.weight does not match"):
        load_gguf(path)


def test_gguf_errors(tmp_path):
    config = tiny_config(vocab_size=len(tiny_vocab()[0]))
    params = random_params(config)
    write_tiny_gguf(tmp_path / "m.gguf", config, params, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing tensor.*blk\.1\.ffn_up\.weight"):
        load_gguf(tmp_path / "m.gguf")
    write_tiny_gguf(tmp_path / "g.gguf", config, params, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "g.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


# --- load_model, Model, check_same_vocab --------------------------------------------------------------

def test_load_model_dispatch_and_logits(tmp_path):
    config = tiny_config(vocab_size=len(tiny_vocab()[0]))
    params = random_params(config, seed=5)
    (tmp_path / "g").mkdir()
    write_tiny_gguf(tmp_path / "g" / "m.gguf", config, params)
    folder = write_hf_folder(tmp_path / "hf", config, params)
    m_hf = load_model(folder)
    m_file = load_model(tmp_path / "g" / "m.gguf")
    m_dir = load_model(tmp_path / "g")
    assert isinstance(m_hf, Model) and m_hf.tokenizer is None and m_hf.lora is None
    assert m_file.tokenizer is not None and m_dir.config == m_file.config
    tokens = np.arange(14).reshape(2, 7)
    out = m_hf.logits(tokens)
    assert out.shape == (2, 7, config.vocab_size) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref_logits(config, params, tokens), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        m_hf.logits(np.arange(3))
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face folder"):
        load_model(tmp_path / "empty")


def test_check_same_vocab(tmp_path):
    from opd_jax.model.tokenizer import load_tokenizer

    config = tiny_config(vocab_size=len(tiny_vocab()[0]))
    params = random_params(config)
    write_tiny_gguf(tmp_path / "a.gguf", config, params)
    tok = load_tokenizer(tmp_path / "a.gguf")
    teacher = Model(config, params, tok)
    check_same_vocab(teacher, Model(config.replace(n_layers=1), params, tok))
    check_same_vocab(teacher, Model(config, params, None))
    with pytest.raises(ValueError, match=r"vocab sizes differ: teacher 274, student 300"):
        check_same_vocab(teacher, Model(config.replace(vocab_size=300), params, None))

    class Renamed:  # same sizes, two token strings swapped
        def __init__(self, base):
            self.base = base
            self.vocab_size, self.bos_id, self.eos_ids = base.vocab_size, base.bos_id, base.eos_ids

        def id_to_token(self, i):
            return {10: "X", 11: "Y"}.get(i, self.base.id_to_token(i))

    with pytest.raises(ValueError, match=r"id 10: teacher .* vs student 'X'; id 11"):
        check_same_vocab(teacher, Model(config, params, Renamed(tok)))


# --- derived students ---------------------------------------------------------------------------------

def test_derive_student_layers():
    config = tiny_config(n_layers=30)
    params = random_params(config)
    c27, p27 = derive_student(config, params, drop_layers=[10, 15, 20])
    assert c27.n_layers == 27 and p27["layers"]["q"].shape[0] == 27
    kept = [i for i in range(30) if i not in (10, 15, 20)]
    np.testing.assert_array_equal(np.asarray(p27["layers"]["gate"]), params["layers"]["gate"][kept])
    c10, p10 = derive_student(config, params, keep_every=3)
    assert c10.n_layers == 10
    np.testing.assert_array_equal(np.asarray(p10["layers"]["o"]), params["layers"]["o"][::3])
    c2, p2 = derive_student(config, params, keep_layers=[29, 0])
    np.testing.assert_array_equal(np.asarray(p2["layers"]["down"]),
                                  params["layers"]["down"][[0, 29]])
    assert p2["embed"] is params["embed"] and c2.n_layers == 2
    for bad in (dict(drop_layers=[30]), dict(keep_layers=[-1]), dict(keep_every=0),
                dict(keep_layers=[1, 1]), dict(drop_layers=list(range(30))),
                dict(keep_every=2, drop_layers=[1]), dict()):
        with pytest.raises(ValueError):
            derive_student(config, params, **bad)
    with pytest.raises(ValueError, match=r"\[30\] out of range .* 0\.\.29"):
        derive_student(config, params, drop_layers=[10, 30])


def test_random_student():
    config = tiny_config(n_layers=4)
    params = random_params(config)
    s_config, s_params = random_student(config, jax.random.key(0), n_layers=2, ffn_dim=32,
                                        teacher_params=params)
    assert s_config.n_layers == 2 and s_config.vocab_size == config.vocab_size
    assert jax.tree.map(jnp.shape, s_params) == jax.tree.map(tuple, param_shapes(s_config),
                                                             is_leaf=lambda x: isinstance(x, tuple))
    np.testing.assert_array_equal(np.asarray(s_params["embed"]), params["embed"])
    np.testing.assert_array_equal(np.asarray(s_params["unembed"]), params["unembed"])
    n_config, n_params = random_student(config, jax.random.key(1), d_model=32, n_heads=2,
                                        teacher_params=params)
    assert (n_config.d_model, n_config.head_dim, n_config.n_kv_heads) == (32, 16, 2)
    assert n_params["embed"].shape == (config.vocab_size, 32)
    assert n_params["unembed"].shape == (32, config.vocab_size)
    with pytest.raises(ValueError, match="vocabulary"):
        random_student(config, jax.random.key(0), vocab_size=10)


# --- sharded placement on 8 fake CPU devices -----------------------------------------------------------

def test_sharded_placement_subprocess(tmp_path):
    config = tiny_config(n_kv_heads=2, vocab_size=128)
    params = random_params(config, seed=6)
    folder = write_hf_folder(tmp_path / "m", config, params, n_files=2)
    np.save(tmp_path / "ref.npy", ref_logits(config, params, np.arange(16).reshape(2, 8)))
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import PartitionSpec as P
        from opd_jax.model.loading import load_model
        from opd_jax.sharding import make_mesh
        assert len(jax.devices()) == 8
        mesh = make_mesh({{"fsdp": 4, "tensor": 2}})
        m = load_model({str(folder)!r}, mesh=mesh, rules="fsdp_tp")
        q = m.params["layers"]["q"]
        assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding.spec
        assert {{s.data.shape for s in q.addressable_shards}} == {{(2, 16, 2, 16)}}
        assert m.params["embed"].sharding.spec == P("tensor", "fsdp")
        assert m.params["layers"]["down"].sharding.spec == P(None, "tensor", "fsdp")
        out = np.asarray(m.logits(np.arange(16).reshape(2, 8)))
        np.testing.assert_allclose(out, np.load({str(tmp_path / "ref.npy")!r}), atol=1e-5)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
