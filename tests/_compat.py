"""What the tests need across the supported JAX range (CI runs the oldest pins too)."""

import jax


def enable_x64(on: bool = True):
    """``jax.enable_x64(on)`` (a context manager since jax 0.8), or the older
    ``jax.experimental.enable_x64`` on jax 0.7."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import enable_x64 as legacy

    return legacy(on)
