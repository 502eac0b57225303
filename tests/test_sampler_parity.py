"""Greedy decoding matches Hugging Face transformers token for token on identical weights:
tiny random Llama / Qwen2 / Qwen3 models (saved with ``save_pretrained``, loaded with
``load_model``) and the real default teacher SmolLM2-135M-Instruct (GGUF, dequantized)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict  # noqa: E402
from opd_jax.model.loading import load_model  # noqa: E402
from opd_jax.sampling.generation import generate  # noqa: E402

pytestmark = pytest.mark.torch

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6,
                                                                tie_word_embeddings=True)),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_theta=1e6)),
}
PROMPTS = [[5, 17, 3, 99, 12, 7], [1, 2], [150, 42, 42, 8, 9, 10, 11, 3, 4, 60, 61, 2, 77]]


def build_hf(case: str, seed: int = 0):
    cfg_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial norms / biases, peaked next-token distributions
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def hf_greedy(model, prompt: list[int], max_new: int, eos_ids=None, pad_id: int = 0) -> list[int]:
    """transformers' greedy continuation of one prompt (no padding), up to and including EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                              dtype=torch.long),
                             max_new_tokens=max_new, min_new_tokens=0, do_sample=False,
                             eos_token_id=eos_ids, pad_token_id=pad_id)
    new = out[0, len(prompt):].tolist()
    if eos_ids:
        for i, t in enumerate(new):
            if t in eos_ids:
                return new[:i + 1]
    return new


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers_tiny(tmp_path, case):
    hf = build_hf(case)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    N = 20
    out = generate(ours, PROMPTS, max_new_tokens=N, eos_ids=[])  # batched, left-padded
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i] == hf_greedy(hf, prompt, N), (case, i)
    # EOS handling agrees too: stop at a token HF emits mid-way
    eos = out.tokens[0][N // 2]
    out = generate(ours, PROMPTS, max_new_tokens=N, eos_ids=[eos])
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i] == hf_greedy(hf, prompt, N, eos_ids=[eos]), (case, i)


def test_greedy_matches_transformers_on_our_random_params():
    """The other direction: our random params exported with ``to_hf_state_dict``."""
    import jax

    from opd_jax.model import decoder
    from opd_jax.model.config import ModelConfig

    config = ModelConfig(vocab_size=200, n_layers=2, tie_embeddings=False)
    params = decoder.init_params(config, jax.random.PRNGKey(7))
    params["embed"], params["unembed"] = params["embed"] * 20, params["unembed"] * 20
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config))).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in to_hf_state_dict(config, params).items()},
                       strict=False)
    hf.generation_config.eos_token_id = None

    class M:
        pass

    m = M()
    m.config, m.params = config, params
    out = generate(m, PROMPTS, max_new_tokens=12, eos_ids=[])
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i] == hf_greedy(hf, prompt, 12), i


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2():
    from opd_jax.model.assets import default_teacher

    teacher = default_teacher()
    tok = teacher.tokenizer
    questions = ["What is 2+3? Answer with a number.", "Name a colour.",
                 "Write one sentence about the sea."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in questions]
    N = 24
    out = generate(teacher, prompts, max_new_tokens=N)  # tokenizer's EOS set
    assert max(len(t) for t in out.tokens) > 3, out.texts
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(teacher.config)))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in
                        to_hf_state_dict(teacher.config, teacher.params).items()}, strict=False)
    hf.eval()
    for i, prompt in enumerate(prompts):
        ref = hf_greedy(hf, prompt, N, eos_ids=list(tok.eos_ids), pad_id=tok.pad_id)
        assert out.tokens[i] == ref, (questions[i], out.texts[i], tok.decode(ref))
