"""Typed run configs: ``core`` (a generic typed-YAML loader that imports nothing of opd_jax),
``schema`` (model, data, sampler, optimizer sections), ``loss`` (the loss section), ``run``
(stages, mesh, checkpointing, :class:`RunConfig`, :func:`load_config`) and ``sections`` (extra
top-level sections such as ``select:`` / ``study:``). Everything public is re-exported here::

    from opd_jax.config import RunConfig, load_config
"""

from opd_jax.config.core import *  # noqa: F403
from opd_jax.config.core import __all__ as _core_all
from opd_jax.config.loss import *  # noqa: F403
from opd_jax.config.loss import __all__ as _loss_all
from opd_jax.config.run import *  # noqa: F403
from opd_jax.config.run import __all__ as _run_all
from opd_jax.config.schema import *  # noqa: F403
from opd_jax.config.schema import __all__ as _schema_all
from opd_jax.config.sections import split_sections

__all__ = [*_core_all, *_schema_all, *_loss_all, *_run_all, "split_sections"]
