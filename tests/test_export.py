"""`opd-jax export`: a run's student as a Hugging Face folder, PEFT adapters or a GGUF.

References: transformers' own Llama forward on the written folder (float32 logits within 1e-4),
``load_model`` reading it back bit-exactly, PEFT's LoRA delta ``(B @ A) * alpha / r`` (peft
``tuners/lora/layer.py`` ``get_delta_weight``) re-implemented in numpy, and the GGUF loader (F32
exact, F16 / Q8_0 within their rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.export import RunLockedError, export_run, load_student, locate
from opd_jax.export.gguf_file import permute_qk, write_gguf
from opd_jax.export.hf_folder import write_hf_folder
from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.model.gguf_loader import unpermute_qk
from opd_jax.model.loading import Model, load_model
from opd_jax.train.run import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")
STAGES = "stages=[{kind: opd, steps: 2, batch_prompts: 2}]"


def _train(path, *overrides):
    cfg = load_config(TINY, [f"out_dir={path}", "checkpoint.every_n_steps=1", STAGES, *overrides])
    run(cfg, progress=False)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {"full": _train(base / "full"),
            "lora": _train(base / "lora", "student.lora.rank=4", "student.lora.alpha=8")}


def _same_tree(a, b):
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_run_marker_is_gone_after_training(runs):
    assert not (runs["full"] / ".running").exists()


def test_hf_folder_reads_back_bit_exactly_and_matches_transformers(runs, tmp_path):
    out = tmp_path / "hf"
    s = export_run(runs["full"], out, to="hf")
    assert (s["stage"], s["step"], s["stage_done"]) == ("opd", 2, True)
    student, _ = load_student(locate(runs["full"]))
    back = load_model(out)
    assert back.config == student.config.replace(attention=back.config.attention,
                                                 attention_block=back.config.attention_block)
    assert _same_tree(back.params, student.params)
    # trained weights, not the initial ones
    init = _initial(runs["full"])
    assert not _same_tree(init.params, student.params)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 257 and gen["pad_token_id"] == 258
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    toks = np.random.default_rng(0).integers(0, student.config.vocab_size, (2, 11))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(student.logits(toks)), want, atol=1e-4, rtol=1e-4)


def _initial(run_dir) -> Model:
    from opd_jax.train.models import student_base

    cfg = locate(run_dir).cfg
    return student_base(cfg.teacher, cfg.student, seed=cfg.seed)


def test_earlier_step_and_sharded_safetensors(runs, tmp_path):
    out = tmp_path / "step1"
    s = export_run(runs["full"], out, step=1, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and s["step"] == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    back = load_model(out)
    at_step_2 = load_model(export_run(runs["full"], tmp_path / "step2")["out"])
    assert not _same_tree(back.params, at_step_2.params)   # step 1 is not step 2


def test_lora_merged_and_peft_adapters(runs, tmp_path):
    from safetensors.numpy import load_file

    merged = load_model(export_run(runs["lora"], tmp_path / "merged")["out"])
    s = export_run(runs["lora"], tmp_path / "peft", lora_only=True)
    peft = tmp_path / "peft"
    cfg = json.loads((peft / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert s["base_model"] == str(peft / "base")
    base = load_model(peft / "base")
    assert _same_tree(base.params, _initial(runs["lora"]).params)   # the untrained base
    from opd_jax.model.hf_loader import to_hf_state_dict

    base_sd = to_hf_state_dict(base.config, base.params)
    merged_sd = to_hf_state_dict(merged.config, merged.params)
    adapters = load_file(str(peft / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    n_checked = 0
    for name, w in base_sd.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" not in adapters:
            np.testing.assert_array_equal(merged_sd[name], w)
            continue
        a, b = adapters[f"{prefix}.lora_A.weight"], adapters[f"{prefix}.lora_B.weight"]
        delta = (b.astype(np.float64) @ a.astype(np.float64)) * scale   # PEFT get_delta_weight
        np.testing.assert_allclose(merged_sd[name], w + delta, atol=1e-6, rtol=1e-5)
        n_checked += 1
    assert n_checked == 7 * base.config.n_layers
    assert any(np.abs(adapters[k]).max() > 0 for k in adapters if "lora_B" in k)  # trained


@pytest.mark.parametrize("kind,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1e-2)])
def test_gguf_reads_back_within_quantisation_error(runs, tmp_path, kind, tol):
    out = tmp_path / f"s-{kind}.gguf"
    export_run(runs["full"], out, to="gguf", gguf_type=kind)
    student, _ = load_student(locate(runs["full"]))
    back = load_model(out)
    err = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                          / np.abs(np.asarray(a)).max()), student.params, back.params)
    assert max(jax.tree.leaves(err)) <= tol


def test_permute_qk_inverts_the_loader():
    w = np.arange(4 * 8 * 6, dtype=np.float32).reshape(4 * 8, 6)
    assert not np.array_equal(permute_qk(w, 4), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)


def test_tokenizer_and_chat_template_travel(tmp_path):
    from opd_jax.model.assets import default_teacher_path
    from opd_jax.model.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(default_teacher_path())
    config = ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=32, ffn_dim=64, n_heads=2,
                         n_kv_heads=1, head_dim=16)
    model = Model(config, decoder.init_params(config, jax.random.key(0)), tok)
    texts = ["What is 12 + 30? Think step by step.", "naïve café  — 1234567 <|im_end|> x"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0]}]
    # GGUF: our loader reads the tokenizer back identically
    write_gguf(tmp_path / "m.gguf", model, gguf_type="f32")
    g = load_model(tmp_path / "m.gguf").tokenizer
    assert [g.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (g.eos_ids, g.pad_id, g.chat_template) == (tok.eos_ids, tok.pad_id, tok.chat_template)
    # HF folder: our loader and transformers' AutoTokenizer agree with the original
    (tmp_path / "hf").mkdir()
    assert write_hf_folder(tmp_path / "hf", model)["tokenizer"] == "tokenizers"
    h = load_model(tmp_path / "hf").tokenizer
    assert [h.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert h.apply_chat_template(messages) == tok.apply_chat_template(messages)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [auto.encode(t, add_special_tokens=False) for t in texts] == [tok.encode(t) for t in texts]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages)
    assert auto.eos_token_id == tok.eos_ids[0]


def test_refusals_come_before_any_work(runs, tmp_path):
    full = runs["full"]
    with pytest.raises(ValueError, match="no train stage 'nope'.*\\['opd'\\]"):
        export_run(full, tmp_path / "a", stage="nope")
    with pytest.raises(ValueError, match="no saved step 7; saved steps: \\[1, 2\\]"):
        export_run(full, tmp_path / "a", step=7)
    with pytest.raises(ValueError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "a")
    with pytest.raises(ValueError, match="no adapters"):
        export_run(full, tmp_path / "a", lora_only=True)
    with pytest.raises(ValueError, match="overlaps the run directory"):
        export_run(full, full / "exported")
    # an existing output is kept unless --force, and replaced only by a complete export
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_run(full, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(full, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left
    # a live trainer (this process) holds the run; a dead one does not
    marker = full / ".running"
    import socket

    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        with pytest.raises(RunLockedError, match="still being written"):
            export_run(full, tmp_path / "b")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        marker.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
        assert export_run(full, tmp_path / "b")["step"] == 2
    finally:
        marker.unlink()


def test_cli_export_and_its_errors(runs, tmp_path):
    from opd_jax.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(runs["full"]), "--to", "hf", str(out)]) == 0
    assert (out / "config.json").exists()
    assert main(["export", str(runs["full"]), str(out)]) == 2   # exists, no --force
    assert main(["export", str(runs["full"]), str(tmp_path / "g.gguf"), "--to", "gguf",
                 "--gguf-type", "q8_0"]) == 0


def test_a_config_changed_after_training_is_refused(runs, tmp_path):
    import shutil

    from opd_jax.checkpoint import CheckpointStructureError
    from opd_jax.export.run_source import running_owner

    moved = tmp_path / "moved"
    shutil.copytree(runs["full"], moved)
    assert running_owner(moved) is None          # no marker: nobody is writing it
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace("d_model: 32", "d_model: 48", 1))
    with pytest.raises(CheckpointStructureError, match="do not match the student that"):
        export_run(moved, tmp_path / "out")
    assert not (tmp_path / "out").exists()
