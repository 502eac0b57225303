"""``opd_jax.compile_options``: XLA CPU's instruction scheduler per program, and JAX's
persistent compilation cache around the ``opd-jax`` commands.

The memory-optimized scheduler never keeps more temporaries alive than XLA's default
(concurrency) one on a program with independent branches, computes the same values, and reaches
module-level programs through :func:`memory_jit` (made on first use, so the backend is known);
``optim.cpu_scheduler`` is checked at load time and reaches the train step."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import compile_options
from opd_jax.compile_options import (
    CPU_SCHEDULERS,
    compilation_cache,
    cpu_scheduler_options,
    memory_jit,
    memory_scheduler_env,
)
from opd_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def branches(x, ws):
    """Eight independent ``tanh(x @ w)`` activations ``[256, 512]``, each reduced through a
    ``[512, 512]`` Gram matrix: XLA's default scheduler runs the branches side by side (8.9 MB of
    temporaries), the memory one one after the other (1.6 MB)."""
    acc = 0.0
    for w in ws:
        h = jnp.tanh(x @ w)
        acc = acc + (h.T @ h).sum()
    return acc


def _temp(options):
    x, ws = jnp.ones((256, 256)), [jnp.ones((256, 512)) * i for i in range(8)]
    compiled = jax.jit(branches, compiler_options=options).lower(x, ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes


TEMP_IN_CHILD = """
import jax, jax.numpy as jnp, sys
sys.path.insert(0, sys.argv[1])
from test_compile_options import branches
x, ws = jnp.ones((256, 256)), [jnp.ones((256, 512)) * i for i in range(8)]
print(jax.jit(branches).lower(x, ws).compile().memory_analysis().temp_size_in_bytes)
"""


def test_memory_scheduler_keeps_no_more_live_than_the_default():
    if not cpu_scheduler_options("memory"):
        pytest.skip("this jaxlib has no xla_cpu_scheduler_type (XLA's default scheduler is used)")
    assert cpu_scheduler_options("memory") == (("xla_cpu_scheduler_type",
                                                CPU_SCHEDULERS["memory"]),)
    memory = _temp(dict(cpu_scheduler_options("memory")))
    assert memory < _temp(dict(cpu_scheduler_options("concurrency")))
    assert memory < _temp(None)
    # the opd-jax command's process-wide flag gives every program the same schedule
    env = memory_scheduler_env({**os.environ, "XLA_FLAGS": ""})
    child = subprocess.run([sys.executable, "-c", TEMP_IN_CHILD, os.path.dirname(__file__)],
                           env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.split()[-1]) == memory


def test_process_flag_only_where_it_applies():
    flag = f"--xla_cpu_scheduler_type={CPU_SCHEDULERS['memory']}"
    assert memory_scheduler_env({"XLA_FLAGS": "--xla_cpu_ftz=true"}, "0.10.2")["XLA_FLAGS"] == \
        f"--xla_cpu_ftz=true {flag}"
    assert memory_scheduler_env({}, "0.11.0.dev20270101")["XLA_FLAGS"] == flag
    assert memory_scheduler_env({}, "0.7.0") is None            # 0.7.0 aborts on the flag
    assert memory_scheduler_env({"OPD_JAX_MALLOC": "0"}, "0.10.2") is None
    mine = {"XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}
    assert memory_scheduler_env(mine, "0.10.2") is None          # the user's choice wins


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="concurrency"):
        cpu_scheduler_options("fastest")


def test_memory_jit_is_a_jit_made_on_first_use():
    calls = []

    @memory_jit(static_argnums=1)
    def f(x, n):
        calls.append(n)   # traced once per static value
        return jnp.tanh(x) * n

    x = jnp.linspace(-2, 2, 7)
    np.testing.assert_allclose(f(x, 3), np.tanh(np.linspace(-2, 2, 7)) * 3,
                               rtol=1e-6, atol=1e-6)
    f(x + 1, 3)
    assert calls == [3]                                    # cached like jax.jit
    assert f.__name__ == "f"
    text = f.lower(x, 2).as_text()                         # attributes reach the jitted function
    assert "tanh" in text


def test_optim_cpu_scheduler_is_checked_and_defaults_to_memory():
    tiny = os.path.join(ROOT, "configs", "tiny_test.yaml")
    cfg = load_config(tiny)
    assert cfg.resolve_stage(0).optim.cpu_scheduler == "memory"
    cfg = load_config(tiny, ["optim.cpu_scheduler=concurrency"])
    assert {cfg.resolve_stage(i).optim.cpu_scheduler
            for i in range(len(cfg.stages))} == {"concurrency"}
    with pytest.raises(ConfigError, match="cpu_scheduler"):
        load_config(tiny, ["optim.cpu_scheduler=fastest"])


def _entries(path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_compilation_cache_writes_programs_and_restores_jax_settings(tmp_path):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    with compilation_cache(None):   # off: nothing changes
        assert {k: getattr(jax.config, k) for k in keys} == before
    cache = tmp_path / "xla"
    with compilation_cache(str(cache), min_compile_secs=0):
        assert jax.config.jax_compilation_cache_dir == str(cache)
        x = jnp.arange(7.0)
        np.testing.assert_allclose(jax.jit(lambda v: jnp.sin(v) * 3.25 + 0.125)(x),
                                   np.sin(np.arange(7.0)) * 3.25 + 0.125, rtol=1e-6)
    assert _entries(cache), "the compiled program was not written"
    assert {k: getattr(jax.config, k) for k in keys} == before
    n = len(_entries(cache))
    jax.jit(lambda v: jnp.cos(v) * 1.5)(x)   # outside: not written
    assert len(_entries(cache)) == n


def test_cli_commands_use_the_configs_compilation_cache(tmp_path, monkeypatch, capsys):
    """``opd-jax sample`` compiles into ``compilation_cache`` (here every program, however fast
    it compiled), writes nothing with ``compilation_cache=null``, and leaves JAX's settings as
    they were."""
    from opd_jax import cli

    monkeypatch.setattr(compile_options, "CACHE_MIN_COMPILE_SECS", 0.0)
    seen = []   # the cache directory JAX had while each command ran

    def recording(path, *args, **kwargs):
        seen.append(path)
        return compilation_cache(path, *args, **kwargs)

    monkeypatch.setattr(compile_options, "compilation_cache", recording)
    before = jax.config.jax_compilation_cache_dir
    cache = tmp_path / "xla"
    argv = ["sample", "configs/tiny_test.yaml", "--prompt", "What is 2+3?", "--max-new-tokens"]
    assert cli.main([*argv, "3", "compilation_cache=null"]) == 0
    assert seen == [None] and jax.config.jax_compilation_cache_dir == before
    # another (unusual) length: new programs to compile (a process keeps what it compiled)
    assert cli.main([*argv, "13", f"compilation_cache={cache}"]) == 0
    assert seen == [None, str(cache)]
    assert _entries(cache)
    assert jax.config.jax_compilation_cache_dir == before
    assert load_config("configs/tiny_test.yaml").compilation_cache == "~/.cache/opd_jax/xla"
