"""Benchmark: the train step on device meshes (8 fake CPU devices): per-device memory and step time.

For each mesh ``(data, fsdp, tensor)`` in (1,1,1), (8,1,1), (1,8,1), (2,4,1), (2,2,2) the train
step is built exactly as the trainer builds it (``opd_jax.train.placement.TrainMesh``: params and AdamW
state by the rules table, teacher by its rules, batch over ``("data", "fsdp")``, explicit
in/out shardings, donated state) for a mid-size random student + teacher, and reported:

* per-device bytes of the train state (params + AdamW mu/nu + counters) and of the teacher, from
  the arrays' addressable shards;
* the compiled step's ``memory_analysis()`` per device: arguments, outputs, temporaries and the
  peak estimate ``temp + argument + output - alias``;
* compile seconds and the median step seconds.

The 8 devices are fake (``--xla_force_host_platform_device_count=8``) and share this machine's
cores: step time on them measures the overhead of partitioning and collectives, not a speedup.
Memory per device is what a real 8-chip mesh would hold.

    python benchmarks/scaling.py            # mid-size model (quiet machine)
    python benchmarks/scaling.py --small    # tiny model, seconds-long smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt_bytes, load_report, machine_info, print_table, time_calls, write_results  # noqa: E402

MESHES = [((1, 1, 1), "fsdp"), ((8, 1, 1), "fsdp"), ((1, 8, 1), "fsdp"), ((2, 4, 1), "fsdp"),
          ((2, 2, 2), "fsdp_tp")]


def configs(small: bool):
    from opd_jax.model.config import ModelConfig

    if small:
        s = ModelConfig(vocab_size=256, n_layers=2, d_model=64, ffn_dim=128, n_heads=4,
                        n_kv_heads=2, head_dim=16)
        return s, s.replace(n_layers=3), dict(B=8, P=16, N=8, repeats=2)
    student = ModelConfig(vocab_size=4096, n_layers=6, d_model=384, ffn_dim=1024, n_heads=6,
                          n_kv_heads=2, head_dim=64)
    teacher = student.replace(n_layers=8, d_model=512, ffn_dim=1536, n_heads=8)
    return student, teacher, dict(B=16, P=64, N=64, repeats=3)


def per_device_bytes(tree) -> int:
    import jax

    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))


def bench_mesh(shape, rules, cs, ct, batch_np, repeats):
    import jax

    from opd_jax import losses
    from opd_jax import sharding as shd
    from opd_jax.config.loss import LossSpec
    from opd_jax.config.schema import OptimSpec
    from opd_jax.model import decoder as dec
    from opd_jax.train.objectives import make_chunk_fn
    from opd_jax.train.placement import TrainMesh
    from opd_jax.train.state import StudentSpec, init_state, make_optimizer
    from opd_jax.train.step import TeacherSpec, make_train_step

    devices = jax.devices()[:int(np.prod(shape))]
    tm = TrainMesh(shd.make_mesh(shape, devices=devices), shd.get_rules(rules),
                   shd.get_rules(rules))
    student, teacher = StudentSpec(cs), TeacherSpec("separate", ct)
    ps = dec.init_params(cs, jax.random.key(0))
    pt = dec.init_params(ct, jax.random.key(1))
    trainable = tm.place(ps, tm.trainable_shardings(student, ps))
    tparams = tm.place(pt, tm.params_shardings(ct, pt, teacher=True))
    del ps, pt
    opt = make_optimizer(OptimSpec(lr=1e-5), 100)
    init_fn = functools.partial(init_state, optimizer=opt, seed=0)
    _, sh = tm.train_shardings(student, trainable, None, teacher, tparams, init_fn)
    state = tm.init_state(init_fn, trainable, sh["state"])
    del trainable
    batch = tm.place(batch_np, sh["batch"])
    step = make_train_step(student=student, teacher=teacher, optimizer=opt,
                           chunk_fn=make_chunk_fn(LossSpec(objective="topk_reward", top_k=16)),
                           reduction=losses.token_mean, chunk_size=256, shardings=sh)
    t0 = time.perf_counter()
    with tm.scope():
        compiled = step.lower(state, batch, None, tparams).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    mem["peak_estimate"] = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch, None, tparams)
        return metrics["scalars"]["loss"]

    timing = time_calls(call, warmup=1, repeats=repeats)
    return {"mesh": "x".join(map(str, shape)), "rules": rules,
            "state_per_device": per_device_bytes(holder["state"]),
            "teacher_per_device": per_device_bytes(tparams), "compiled": mem,
            "compile_s": round(compile_s, 2), "step": timing,
            "loss": float(call())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model smoke run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    load = load_report()
    import jax

    from opd_jax.train.batch import RolloutBatch

    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()} (XLA_FLAGS set too late?)")
    cs, ct, b = configs(args.small)
    B, P, N = b["B"], b["P"], b["N"]
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cs.vocab_size, (B, P + N)).astype(np.int32)
    valid = np.ones((B, P + N), bool)
    batch = RolloutBatch(toks, valid, toks, valid, toks[:, P:], valid[:, P:],
                         np.full((B, N), -4.0, np.float32))
    print(f"student {cs.n_params / 1e6:.1f}M params, teacher {ct.n_params / 1e6:.1f}M, "
          f"batch {B} x ({P} prompt + {N} completion); 8 fake CPU devices share "
          f"{os.cpu_count()} cores: step time is partitioning/collective overhead, not speedup")
    rows = []
    for shape, rules in MESHES:
        r = bench_mesh(shape, rules, cs, ct, batch, b["repeats"])
        rows.append(r)
        print(f"  {r['mesh']} {rules}: compiled in {r['compile_s']} s, "
              f"step {r['step']['median_s']:.3f} s", flush=True)
    losses = [r["loss"] for r in rows]
    print()
    print_table([{**r, "state": fmt_bytes(r["state_per_device"]),
                  "teacher": fmt_bytes(r["teacher_per_device"]),
                  "arg": fmt_bytes(r["compiled"]["argument"]),
                  "temp": fmt_bytes(r["compiled"]["temp"]),
                  "peak": fmt_bytes(r["compiled"]["peak_estimate"]),
                  "step_s": f"{r['step']['median_s']:.3f}"} for r in rows],
                [("mesh", "mesh d x f x t"), ("rules", "rules"), ("state", "state/dev"),
                 ("teacher", "teacher/dev"), ("arg", "args/dev"), ("temp", "temp/dev"),
                 ("peak", "peak/dev"), ("compile_s", "compile s"), ("step_s", "step s")])
    print(f"\nloss after the timed steps, every mesh: {min(losses):.6f} .. {max(losses):.6f}")
    write_results("scaling", {"benchmark": "scaling", "small": args.small, "load": load,
                     "machine": machine_info(),
                     "note": "8 fake CPU devices share the host cores: step time shows overhead, "
                             "not speedup; memory per device is what a real mesh holds",
                     "student": {"n_params": cs.n_params, **dataclasses.asdict(cs)},
                     "teacher": {"n_params": ct.n_params, **dataclasses.asdict(ct)},
                     "batch": {"rows": B, "prompt": P, "completion": N}, "rows": rows},
                  small=args.small, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
