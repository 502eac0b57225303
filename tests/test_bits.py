"""``opd_jax.model.bits``: writes on ``uint16`` bits equal the plain writes, for every dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import bits


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_round_trip_and_writes_equal_the_plain_ones(dtype):
    buf = (jnp.arange(48, dtype=jnp.float32).reshape(4, 12) / 7).astype(dtype)
    upd = (-jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 3).astype(dtype)
    b = bits.to_bits(buf)
    assert b.dtype == (jnp.uint16 if jnp.dtype(dtype).itemsize == 2 and dtype != jnp.int32
                       else dtype)
    np.testing.assert_array_equal(np.asarray(bits.from_bits(b, dtype)), np.asarray(buf))
    got = jax.jit(bits.update_slice)(buf, upd, (1, 5))
    want = jax.lax.dynamic_update_slice(buf, upd, (1, 5))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rows, cols = jnp.array([0, 3, 9]), jnp.array([2, 11, 0])       # row 9: out of range, dropped
    got = bits.scatter_set(buf, (rows, cols), upd[0], mode="drop")
    want = buf.at[rows, cols].set(upd[0], mode="drop")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_float32_update_is_cast_to_the_buffer_dtype():
    buf = jnp.zeros((2, 4), jnp.bfloat16)
    got = bits.update_slice(buf, jnp.full((1, 2), 1.00390625, jnp.float32), (1, 1))
    assert got.dtype == jnp.bfloat16 and float(got[1, 1]) == 1.0   # rounded as astype rounds
