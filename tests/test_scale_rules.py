"""Scale-out, part 2: different teacher / student rules tables on one mesh, blocked attention on
a mesh, and the sampler on a two-process mesh (CPU fake devices in subprocesses; helpers from
``test_scale``).

* student ``fsdp_tp`` + teacher ``fsdp`` on (2, 2, 2), student ``fsdp`` + teacher ``replicated``
  on (2, 4, 1), student ``fsdp_tp`` + teacher ``replicated`` on (1, 4, 2) with blocked attention:
  a cold-start stage (teacher sampling with the teacher's table) then an opd stage give the
  per-step losses of one device, and the teacher's parameters are placed as its table says;
* two processes x 4 devices: the sampler places its per-row keys (and padding rows) on the global
  mesh itself and draws the tokens one process draws without a mesh.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_scale import ROOT, TINY, _free_port, _last_json, _python

from opd_jax.config import ConfigError, load_config

MESH_RUNS = """
from opd_jax import sharding as shd
from opd_jax.config import load_config
from opd_jax.model.config import param_axes
from opd_jax.train import placement as M
from opd_jax.train.models import build_models
from opd_jax.train.run import run

out_dir, tiny, runs = OUT_DIR, TINY, RUNS
# cold start samples from the teacher (its sampler uses the teacher's table); filters off so the
# SFT loss depends on what the teacher drew
stages = ("stages=[{kind: cold_start, steps: 2, batch_prompts: 8, filters: {no_answer: false, "
          "repeated_lines: false, ngram_n: null}}, {kind: opd, steps: 2, batch_prompts: 8}]")
result = {}
for name, shape, rules, teacher_rules, extra in runs:
    cfg = load_config(tiny, [f"out_dir={out_dir}/{name}", stages, "checkpoint.async_save=false",
                             f"mesh.shape.data={shape[0]}", f"mesh.shape.fsdp={shape[1]}",
                             f"mesh.shape.tensor={shape[2]}", f"mesh.rules={rules}",
                             f"mesh.teacher_rules={teacher_rules}"] + extra)
    tm = M.build_mesh(cfg.mesh, devices=jax.devices()[:int(np.prod(shape))])
    run(cfg, progress=False, mesh=tm)
    rows = [json.loads(l) for l in open(f"{cfg.run_dir}/metrics.jsonl")]
    # the placement run() uses: the teacher by its own table, the student by its table
    models = M.place_models(build_models(cfg.teacher, cfg.student, seed=cfg.seed), tm)
    t_axes = param_axes(models.teacher.config)
    specs = lambda tree, axes: {jax.tree_util.keystr(p): [list(s) if isinstance(s, tuple) else s
                                                          for s in x.sharding.spec]
                                for (p, x) in jax.tree_util.tree_flatten_with_path(tree)[0]}
    expected = {jax.tree_util.keystr(p): [list(s) if isinstance(s, tuple) else s for s in
                                          shd.logical_to_spec(a, tm.teacher_rules, x.shape, tm.mesh)]
                for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(models.teacher.params)[0],
                                     jax.tree.leaves(t_axes, is_leaf=lambda v: isinstance(v, tuple)))}
    per_dev = lambda t: int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(t)))
    result[name] = {
        "loss": [r["loss"] for r in rows if r["stage"] == "opd"],
        "sft_loss": [r["loss"] for r in rows if r["stage"] == "cold_start"],
        "grad_norm": [r["grad_norm"] for r in rows if "grad_norm" in r],
        "teacher_specs": specs(models.teacher.params, t_axes), "teacher_expected": expected,
        "student_specs": specs(models.trainable, None),
        "teacher_bytes": per_dev(models.teacher.params),
        "teacher_total": int(sum(x.nbytes for x in jax.tree.leaves(models.teacher.params)))}
print(json.dumps(result))
"""

BLOCKED = ["student.attention=blocked", "student.attention_block=16",
           "teacher.attention=blocked", "teacher.attention_block=16", "student.remat=full"]


def test_teacher_rules_differ_from_student_on_one_mesh(tmp_path):
    groups = [[("ref", (1, 1, 1), "fsdp", "null", []),
               ("tp_student_fsdp_teacher", (2, 2, 2), "fsdp_tp", "fsdp", [])],
              [("fsdp_student_replicated_teacher", (2, 4, 1), "fsdp", "replicated", []),
               ("tp_student_replicated_teacher_blocked", (1, 4, 2), "fsdp_tp", "replicated",
                BLOCKED)]]
    codes = [f"OUT_DIR, TINY, RUNS = {str(tmp_path)!r}, {TINY!r}, {g!r}\n" + MESH_RUNS
             for g in groups]
    res = {}
    for out in _python(*codes):
        res.update(_last_json(out))
    ref = res["ref"]
    assert len(ref["loss"]) == 2 and len(ref["sft_loss"]) == 2
    assert min(ref["sft_loss"]) > 0 and min(ref["loss"]) != 0  # rows were kept and trained on
    for name, r in res.items():
        np.testing.assert_allclose(r["sft_loss"], ref["sft_loss"], rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(r["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=name)
        assert r["teacher_specs"] == r["teacher_expected"], name

    # the tables differ where it matters: q is [L, D, H, E] (H = 4 teacher heads)
    q = "['layers']['q']"
    tp = res["tp_student_fsdp_teacher"]
    assert tp["teacher_specs"][q] == [None, "fsdp", None, None]            # not over tensor
    assert tp["student_specs"][q] == [None, "fsdp", "tensor", None]        # student: TP
    assert tp["teacher_bytes"] * 2 == tp["teacher_total"]                  # 1/fsdp (fsdp = 2)
    for name in ("fsdp_student_replicated_teacher", "tp_student_replicated_teacher_blocked"):
        r = res[name]
        assert all(all(a is None for a in s) for s in r["teacher_specs"].values()), name
        assert r["teacher_bytes"] == r["teacher_total"], name              # whole on each device
    assert res["fsdp_student_replicated_teacher"]["student_specs"][q] == [None, "fsdp", None, None]


@pytest.mark.parametrize("overrides,ok", [
    (["mesh.shape.tensor=2", "mesh.rules=fsdp_tp", "mesh.teacher_rules=fsdp"], True),
    (["mesh.shape.tensor=2", "mesh.rules=fsdp_tp", "mesh.teacher_rules=replicated"], True),
    (["mesh.shape.tensor=2", "mesh.rules=fsdp", "mesh.teacher_rules=fsdp_tp"], True),
    (["mesh.rules=fsdp", "mesh.teacher_rules=replicated"], True),
    (["mesh.rules=replicated"], True),
    (["mesh.shape.tensor=2", "mesh.rules=fsdp"], False),
    (["mesh.shape.tensor=2", "mesh.rules=fsdp", "mesh.teacher_rules=replicated"], False),
])
def test_rules_combinations(overrides, ok):
    if ok:
        load_config(TINY, overrides)
        return
    with pytest.raises(ConfigError, match=r"mesh\.rules=.*neither table uses the tensor axis"):
        load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=r"choose one of: 'fsdp', 'fsdp_tp', 'replicated'"):
        load_config(TINY, ["mesh.teacher_rules=tp"])


# --- the sampler on a two-process mesh ---------------------------------------------------------

SAMPLER_DRIVER = """
import os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[3])
import json
import jax, numpy as np
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
from opd_jax import sharding as shd
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig, param_axes
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Sampling
from opd_jax.data.padding import pad_left
from opd_jax.train import placement as M
from opd_jax.train.distributed import to_host

c = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=64)
params = dec.init_params(c, jax.random.key(0))        # the same on every process
mesh = shd.make_mesh((2, 4, 1))
tm = M.TrainMesh(mesh, shd.RULES_FSDP, shd.RULES_FSDP)
placed = tm.place(params, tm.params_shardings(c, params))
tok, val = pad_left([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])   # 3 rows: 5 padding rows on 8 shards
out = {}
for name, key in [("one_key", jax.random.key(7)),
                  ("row_keys", jax.random.split(jax.random.key(8), 3))]:
    sampling = Sampling(temperature=1.0)
    ref = Sampler(c, sampling, 6)(params, tok, val, key)          # this process, no mesh
    got = to_host(Sampler(c, sampling, 6, mesh=mesh, rules="fsdp")(placed, tok, val, key))
    out[name] = {"tokens": np.asarray(got.tokens).tolist(),
                 "ref_tokens": np.asarray(ref.tokens).tolist(),
                 "logprobs_diff": float(np.max(np.abs(np.asarray(got.logprobs_full)
                                                      - np.asarray(ref.logprobs_full))))}
print("RESULT", json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                            "out": out}))
"""


@pytest.mark.slow
def test_sampler_places_row_keys_on_a_two_process_mesh():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SAMPLER_DRIVER, str(i), str(port), ROOT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    results = [json.loads(o[0].split("RESULT ", 1)[1]) for o in outs]
    assert results[0]["devices"] == 8
    for r in results:
        for name, o in r["out"].items():
            assert len(o["tokens"]) == 3 and len(o["tokens"][0]) == 6
            assert o["tokens"] == o["ref_tokens"], (r["process"], name)
            assert o["logprobs_diff"] < 1e-5, (r["process"], name)
    for name in ("one_key", "row_keys"):   # every process gets the whole (global) batch
        assert results[0]["out"][name]["tokens"] == results[1]["out"][name]["tokens"]
