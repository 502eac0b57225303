"""Rules tables, mesh construction and per-device placement (8 fake CPU devices in a subprocess)."""

import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from opd_jax import sharding


def test_logical_to_spec_tables():
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), sharding.RULES_FSDP) == P(None, "fsdp", None)
    assert (sharding.logical_to_spec(("layers", "embed", "mlp"), sharding.RULES_FSDP_TP)
            == P(None, "fsdp", "tensor"))
    # batch uses fsdp, so a second fsdp use in the same spec falls back to replication
    assert (sharding.logical_to_spec(("batch", "length", "embed"), sharding.RULES_FSDP)
            == P(("data", "fsdp"), None, None))
    with pytest.raises(ValueError, match="no entry in the rules table"):
        sharding.logical_to_spec(("nonsense",), sharding.RULES_FSDP)
    with pytest.raises(ValueError, match="unknown sharding rules"):
        sharding.get_rules("zero9")


def test_make_mesh_single_device_and_errors():
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == len(jax.devices())
    with pytest.raises(ValueError, match="needs 64 devices"):
        sharding.make_mesh({"data": 64})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"pipeline": 1})


def test_params_shard_over_eight_devices_and_forward_matches():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from opd_jax import sharding
        from opd_jax.model import decoder as dec
        from opd_jax.model.config import ModelConfig, param_axes
        c = ModelConfig(d_model=64, ffn_dim=128, n_heads=4, n_kv_heads=2)
        params = dec.init_params(c, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, c.vocab_size)
        ref = np.asarray(dec.forward(params, c, tokens)[0])
        for shape, rules in [((8, 1, 1), "fsdp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")]:
            mesh = sharding.make_mesh(shape)
            shard = sharding.tree_shardings(mesh, param_axes(c), sharding.get_rules(rules),
                                            jax.tree.map(lambda x: x.shape, params))
            p = jax.device_put(params, shard)
            emb = p["layers"]["gate"]
            per_dev = emb.addressable_shards[0].data.size
            expect = emb.size // (shape[1] * (shape[2] if rules == "fsdp_tp" else 1))
            assert per_dev == expect, (shape, per_dev, expect)
            with sharding.use_mesh_rules(mesh, rules):
                out = jax.jit(lambda p, t: dec.forward(p, c, t)[0])(p, tokens)
            np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
