"""Logit parity with Hugging Face transformers (float32, CPU) on random-init tiny models of every
supported family, saved with ``save_pretrained`` and loaded with ``load_model``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict  # noqa: E402
from opd_jax.model.loading import load_model  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4
SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0, rms_norm_eps=1e-5)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=10000.0)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_theta=1e6)),
    "smollm2_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, num_attention_heads=3, num_key_value_heads=1,
        hidden_size=96, rope_theta=1e5, rms_norm_eps=1e-5)),
}


def build_hf(case: str, seed: int = 0):
    cfg_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # make norms, biases and every projection non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def tokens_for(model, B=2, T=40, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, (B, T))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity(tmp_path, case):
    model = build_hf(case)
    model.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.family == CASES[case][1].split("For")[0].lower()
    tokens = tokens_for(model)
    diff = np.abs(np.asarray(ours.logits(tokens)) - hf_logits(model, tokens)).max()
    assert diff <= TOL, f"{case}: max abs logit diff {diff:.3g}"


def test_sharded_checkpoint_parity(tmp_path):
    model = build_hf("qwen3_qknorm", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    tokens = tokens_for(model, seed=1)
    diff = np.abs(np.asarray(load_model(tmp_path).logits(tokens)) - hf_logits(model, tokens)).max()
    assert diff <= TOL


def test_bf16_checkpoint(tmp_path):
    model = build_hf("llama", seed=2)
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    with torch.no_grad():  # reference: the bf16-rounded weights, computed in float32
        for p in model.parameters():  # (not model.float(): that would round inv_freq too)
            p.copy_(p.to(torch.bfloat16).float())
    tokens = tokens_for(model, seed=2)
    diff = np.abs(np.asarray(load_model(tmp_path, "float32").logits(tokens))
                  - hf_logits(model, tokens)).max()
    assert diff <= TOL
    ours16 = load_model(tmp_path, "bfloat16")
    assert str(ours16.params["layers"]["q"].dtype) == "bfloat16"
    assert np.isfinite(np.asarray(ours16.logits(tokens))).all()


@pytest.mark.parametrize("case", ["llama3_rope", "qwen2_bias", "smollm2_tied"])
def test_to_hf_state_dict_roundtrip(tmp_path, case):
    """Our params → HF state dict → a fresh transformers model gives our logits."""
    model = build_hf(case, seed=3)
    model.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    cfg_cls, model_cls, _ = CASES[case]
    fresh = getattr(transformers, model_cls)(
        getattr(transformers, cfg_cls)(**to_hf_config(ours.config))).eval()
    state = {k: torch.from_numpy(v) for k, v in to_hf_state_dict(ours.config, ours.params).items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = tokens_for(model, seed=3)
    np.testing.assert_allclose(hf_logits(fresh, tokens), hf_logits(model, tokens), atol=1e-5)
