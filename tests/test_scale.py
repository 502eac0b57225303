"""Scale-out: the trainer on device meshes and across processes (CPU fake devices, subprocesses).

* one device vs meshes (8,1,1), (2,4,1), (2,2,2 fsdp_tp): the same per-step losses (an opd stage
  of 3 steps from configs/tiny_test.yaml); the final checkpoint restores directly into the
  shardings and per-device parameter + optimizer bytes fall as 1/fsdp;
* the compiled train step: per-device argument bytes fall as 1/fsdp, and no all-gather produces a
  full stacked ``[L, ...]`` parameter (only per-layer FSDP gathers, the embedding table and the
  unembedding) or a batch-sized activation;
* two processes on localhost (4 CPU devices each, gloo collectives) train, checkpoint, are killed
  with SIGKILL and resume to the metrics of an uninterrupted two-process run.

The pytest process has already initialised JAX with one device, so every multi-device run happens
in a subprocess that sets the device count before importing JAX.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from opd_jax.train import distributed as mesh_lib
from opd_jax.train.placement import single_device_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")

PRELUDE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
import json
import jax, numpy as np
"""


def _python(*codes: str, n_devices: int = 8, timeout: int = 900):
    """Run each code string in its own subprocess, all at once (compiles dominate: two cores
    compile two programs at a time); returns their stdouts."""
    prelude = PRELUDE.format(n=n_devices, root=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for code in codes]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        outs.append(out)
    return outs


def _last_json(stdout: str):
    return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])


# --- in-process: the single-process helpers are identities ------------------------------------


def test_single_process_helpers_and_row_check():
    records = [{"id": "a", "prompt": "1+1"}]
    assert mesh_lib.gather_records(records) == records
    x = jax.numpy.ones(3)
    assert mesh_lib.to_host(x) is x
    assert mesh_lib.per_process_batch(6) == 6
    tm = single_device_mesh()
    assert tm.batch_shards == 1
    tm.check_rows(3, 1)  # anything splits over one shard
    # optimizer state mirrors parameter shardings by tree path (scalars replicated)
    import optax
    params = {"w": jax.numpy.zeros((4, 2)), "b": jax.numpy.zeros((2,))}
    sh = {"w": tm.replicated(), "b": tm.replicated()}
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    mirrored = tm.mirror_shardings(opt, params, sh)
    assert jax.tree.structure(mirrored) == jax.tree.structure(opt)


# --- meshes vs one device ---------------------------------------------------------------------

MESH_RUNS = """
import dataclasses, functools
from opd_jax.checkpoint import StageCheckpointer, stage_dir
from opd_jax.config import load_config
from opd_jax.train import placement as M
from opd_jax.train.models import build_models
from opd_jax.train.run import run
from opd_jax.train.state import init_state, make_optimizer
from opd_jax.train.step import TeacherSpec

out_dir, tiny, meshes = OUT_DIR, TINY, MESHES
stages = "stages=[{kind: opd, steps: 3, batch_prompts: 8}]"
result = {}
for shape, rules in meshes:
    name = "x".join(map(str, shape))
    cfg = load_config(tiny, [f"out_dir={out_dir}/{name}", stages, "checkpoint.async_save=false",
                             "checkpoint.final_optimizer_state=true",
                             f"mesh.shape.data={shape[0]}", f"mesh.shape.fsdp={shape[1]}",
                             f"mesh.shape.tensor={shape[2]}", f"mesh.rules={rules}"])
    devices = jax.devices()[:int(np.prod(shape))]
    tm = M.build_mesh(cfg.mesh, devices=devices)
    run(cfg, progress=False, mesh=tm)
    rows = [json.loads(l) for l in open(f"{cfg.run_dir}/metrics.jsonl")]
    # restore the final checkpoint straight into the mesh shardings
    models = M.place_models(build_models(cfg.teacher, cfg.student, seed=cfg.seed), tm)
    stage = cfg.resolve_stage(0)
    init_fn = functools.partial(init_state, optimizer=make_optimizer(stage.optim, stage.steps),
                                seed=cfg.seed)
    teacher = TeacherSpec("separate", models.teacher.config)
    abstract, sh = tm.train_shardings(models.student, models.trainable, models.frozen, teacher,
                                      models.teacher.params, init_fn)
    ck = StageCheckpointer(stage_dir(cfg.run_dir, "opd"), async_save=False)
    restored = ck.restore_latest(abstract)
    ck.close()
    st = restored.state
    same = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(st),
                                                        jax.tree.leaves(abstract)))
    per_dev = lambda t: int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(t)))
    result[name] = {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
                    "step": int(st.step), "restored_shardings_match": bool(same),
                    "params_bytes": per_dev(st.trainable), "opt_bytes": per_dev(st.opt_state),
                    "teacher_bytes": per_dev(models.teacher.params),
                    "total_params_bytes": int(sum(x.nbytes for x in jax.tree.leaves(st.trainable)))}
print(json.dumps(result))
"""


def test_meshes_match_one_device_and_state_shrinks_with_fsdp(tmp_path):
    groups = [[((1, 1, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")],
              [((8, 1, 1), "fsdp"), ((2, 4, 1), "fsdp")]]
    codes = [f"OUT_DIR, TINY, MESHES = {str(tmp_path)!r}, {TINY!r}, {g!r}\n" + MESH_RUNS
             for g in groups]
    res = {}
    for out in _python(*codes):
        res.update(_last_json(out))
    ref = res["1x1x1"]
    assert len(ref["loss"]) == 3
    for name in ("8x1x1", "2x4x1", "2x2x2"):
        r = res[name]
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(r["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=name)
        assert r["step"] == 3 and r["restored_shardings_match"], (name, r)
    full_params, full_opt = ref["params_bytes"], ref["opt_bytes"]
    assert full_params == ref["total_params_bytes"]
    # pure data parallelism replicates; fsdp=4 holds a quarter of params and optimizer state
    assert res["8x1x1"]["params_bytes"] == full_params
    assert res["2x4x1"]["params_bytes"] * 4 == full_params
    # AdamW mu + nu mirror the params (plus a few replicated scalar counts)
    assert abs(res["2x4x1"]["opt_bytes"] * 4 - full_opt) <= 4 * 64
    # fsdp 2 x tensor 2: at most half per device (vocab 259 is not split by tensor=2)
    assert res["2x2x2"]["params_bytes"] <= full_params / 2
    assert res["2x2x2"]["teacher_bytes"] <= ref["teacher_bytes"] / 2


# --- compiled train step: memory per device and no full gathers -------------------------------

COMPILED = """
import functools, math, re
from opd_jax import losses, sharding as shd
from opd_jax.config.loss import LossSpec
from opd_jax.config.schema import OptimSpec
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig, param_shapes
from opd_jax.train.placement import TrainMesh
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec, init_state, make_optimizer
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.step import TeacherSpec, make_train_step

c = ModelConfig(vocab_size=256, n_layers=3, d_model=128, ffn_dim=256, n_heads=4, n_kv_heads=2,
                head_dim=32)
ps, pt = dec.init_params(c, jax.random.key(0)), dec.init_params(c, jax.random.key(1))
B, P, N = 8, 16, 8
toks = np.asarray(jax.random.randint(jax.random.key(2), (B, P + N), 0, c.vocab_size))
valid = np.ones((B, P + N), bool)
batch = RolloutBatch(toks, valid, toks, valid, toks[:, P:], valid[:, P:],
                     np.full((B, N), -4.0, np.float32))
student, teacher = StudentSpec(c), TeacherSpec("separate", c)
opt = make_optimizer(OptimSpec(lr=1e-3), 10)
init_fn = functools.partial(init_state, optimizer=opt, seed=0)
stacked = {tuple(s) for s in jax.tree.leaves(param_shapes(c)["layers"],
                                             is_leaf=lambda x: isinstance(x, tuple))}
per_layer = {s[1:] for s in stacked}
# the projections' dots run on 2-D [K, N] views of their weights (decoder._project), so a layer's
# q/k/v/o weight may be gathered in that form too
layer_shapes = param_shapes(c)["layers"]
per_layer |= {(math.prod(layer_shapes[n][1:1 + len(w_in)]), math.prod(layer_shapes[n][1 + len(w_in):]))
              for n, (_, w_in, _) in dec.PROJECTIONS.items()}
whole = {(c.vocab_size, c.d_model), (c.d_model, c.vocab_size), (c.d_model,)}  # embed, unembed, norm
out = {}
for shape in SHAPES:
    tm = TrainMesh(shd.make_mesh(shape), shd.RULES_FSDP, shd.RULES_FSDP)
    tr = tm.place(ps, tm.trainable_shardings(student, ps))
    tp = tm.place(pt, tm.params_shardings(c, pt, teacher=True))
    _, sh = tm.train_shardings(student, tr, None, teacher, tp, init_fn)
    state = tm.init_state(init_fn, tr, sh["state"])
    b = tm.place(batch, sh["batch"])
    step = make_train_step(student=student, teacher=teacher, optimizer=opt,
                           chunk_fn=make_chunk_fn(LossSpec(objective="reverse_kl", top_k=None)),
                           reduction=losses.token_mean, chunk_size=8, shardings=sh)
    with tm.scope():
        compiled = step.lower(state, b, None, tp).compile()
    ma = compiled.memory_analysis()
    gathers = [tuple(int(x) for x in s.split(",") if x)
               for s in re.findall(r"= \\w+\\[([\\d,]*)\\]\\S* all-gather\\(", compiled.as_text())]
    out["x".join(map(str, shape))] = {
        "argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
        "state": int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))),
        "full_gathers": [g for g in gathers if g in stacked],
        "layer_gathers": sorted({g for g in gathers if g in per_layer}),
        "other_gathers": sorted({g for g in gathers if g not in per_layer | whole})}
print(json.dumps(out))
"""


def test_compiled_step_memory_falls_with_fsdp_and_gathers_only_per_layer():
    res = {}
    for out in _python(*[f"SHAPES = [{s!r}]\n" + COMPILED for s in [(8, 1, 1), (1, 8, 1)]]):
        res.update(_last_json(out))
    dp, fsdp = res["8x1x1"], res["1x8x1"]
    # parameters + AdamW state + teacher dominate the arguments: 1/8 per device, up to the batch
    # and replicated scalars
    assert dp["state"] / fsdp["state"] > 7.9
    assert dp["argument"] / fsdp["argument"] > 6.5, (dp, fsdp)
    assert fsdp["temp"] <= dp["temp"]
    # FSDP gathers each layer's weights inside the layer scan; never a whole stacked [L, ...] leaf
    assert fsdp["full_gathers"] == [] and dp["full_gathers"] == []
    assert len(fsdp["layer_gathers"]) >= 4, fsdp["layer_gathers"]
    assert dp["layer_gathers"] == []  # pure data parallelism: weights are already whole
    # and no activations: the loss runs on each device's rows (shard_map), the embedding lookup
    # in a gathered table (no [B, T, D] gathers across the batch, forward or backward)
    assert fsdp["other_gathers"] == [] and dp["other_gathers"] == [], (fsdp, dp)


def test_rows_that_do_not_split_over_the_mesh_fail_clearly(tmp_path):
    code = f"""
    from opd_jax.config import load_config
    from opd_jax.train.run import run
    cfg = load_config({TINY!r}, ["out_dir={tmp_path}/r", "mesh.shape.fsdp=8",
                                 "stages=[{{kind: opd, steps: 1, batch_prompts: 2}}]"])
    try:
        run(cfg, progress=False)
    except ValueError as e:
        print("ERR", e)
    """
    out, = _python(code)
    assert "ERR" in out and "splits rows 8 ways" in out and "multiple of 8" in out, out[-2000:]


# --- two processes: train, SIGKILL both, resume -----------------------------------------------

DRIVER = """
import os, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[4])
import json
from opd_jax.config import load_config
from opd_jax.train.run import run
if len(sys.argv) > 6:  # the fault: SIGKILL right after the checkpointer's save at step argv[6]
    import signal
    from opd_jax import checkpoint
    save, after = checkpoint.StageCheckpointer.save, int(sys.argv[6])
    def save_then_die(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    checkpoint.StageCheckpointer.save = save_then_die
cfg = load_config(sys.argv[5], [
    f"out_dir={out}", "stages=[{kind: opd, steps: 4, batch_prompts: 8}]",
    "checkpoint.every_n_steps=2", "checkpoint.async_save=true",
    "mesh.shape.data=2", "mesh.shape.fsdp=4", "mesh.distributed.initialize=true",
    f"mesh.distributed.coordinator_address=localhost:{port}",
    "mesh.distributed.num_processes=2", f"mesh.distributed.process_id={pid}"])
summary = run(cfg, progress=False)
import jax
from opd_jax.data import make_prompt_dataset, make_prompt_iterator
from opd_jax.train import distributed as M
from opd_jax.train.run import load_data
# grain shards the prompts by process; the trainer joins the shards into the global batch
batch = next(make_prompt_iterator(make_prompt_dataset(load_data(cfg)[0], batch_size=4, seed=0,
                                                      num_epochs=None)))
print("RESULT", json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                            "devices": jax.device_count(), "stages": summary["stages"],
                            "local_ids": [r["id"] for r in batch],
                            "global_ids": [r["id"] for r in M.gather_records(batch)]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(out_dir, env=None, timeout=600, kill_after_step=None):
    port = _free_port()
    fault = [] if kill_after_step is None else [str(kill_after_step)]
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(i), str(port), str(out_dir), ROOT,
                               TINY, *fault], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, **(env or {})}) for i in range(2)]
    deadline = time.time() + timeout
    first_exit = None
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if first_exit is None and any(p.poll() is not None for p in procs):
            first_exit = time.time()
        # once one process is gone (killed), its peer may block in a collective: kill it too
        if first_exit is not None and time.time() - first_exit > 20:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate() for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_kill_and_resume(tmp_path):
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    codes, outs = _two_processes(tmp_path / "ref", cache)
    assert codes == [0, 0], [o[1][-3000:] for o in outs]
    results = [json.loads(o[0].split("RESULT ", 1)[1]) for o in outs]
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["count"] == 2 and results[0]["devices"] == 8
    assert results[0]["stages"] == results[1]["stages"]  # metrics are global on every process
    a, b = results[0]["local_ids"], results[1]["local_ids"]
    assert len(a) == len(b) == 4 and not set(a) & set(b)  # disjoint prompt shards
    assert results[0]["global_ids"] == results[1]["global_ids"] == a + b

    codes, outs = _two_processes(tmp_path / "res", cache, kill_after_step=3)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL], [o[1][-3000:] for o in outs]
    assert (tmp_path / "res" / "checkpoints" / "opd" / "2").is_dir()
    codes, outs = _two_processes(tmp_path / "res", cache)
    assert codes == [0, 0], [o[1][-3000:] for o in outs]

    keys = ("step", "loss", "grad_norm", "overlap", "token_reverse_kl", "gen_tokens")
    read = lambda d: [{k: r[k] for k in keys} for r in map(
        json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
    ref, res = read("ref"), read("res")
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    assert res == ref
    # only process 0 writes the run directory's files
    assert not list((tmp_path / "ref").glob("process_*"))
