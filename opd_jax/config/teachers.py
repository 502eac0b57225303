"""The ``teachers:`` section: several teachers, each for its own data.

Each entry is a ``teacher:`` section (:class:`~opd_jax.config.schema.ModelSpec`: a model loaded
in-process, or a served teacher's ``http://host:port``) with a ``name`` (its metrics' prefix)
and a ``route``: the data sources it scores, as shell-style patterns matched against each prompt
record's ``source`` (a JSONL / parquet row's own ``source`` column when it has one, else the
loader's: the file name, ``reasoning_gym:<name>``). An entry with an empty ``route`` takes every
source no other entry claims; a record no entry claims is an error naming its source.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from opd_jax.config.schema import ModelSpec, need

__all__ = ["TeacherRoute", "check_teachers"]


@dataclasses.dataclass(frozen=True)
class TeacherRoute(ModelSpec):
    """One of several teachers: a ``teacher:`` section plus its ``name`` and ``route``."""

    name: str = ""
    route: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        need(all(isinstance(p, str) and p for p in self.route), "route", list(self.route),
             "a list of non-empty data-source patterns (e.g. ['reasoning_gym:chain_sum', "
             "'*arith*']), or [] for every source no other teacher takes")


def check_teachers(teachers: Sequence[TeacherRoute], teacher: ModelSpec) -> None:
    """``ValueError`` unless the entries have unique names, at most one catch-all, and the
    single ``teacher:`` section was left alone (``teachers:`` replaces it)."""
    need(teacher == ModelSpec(), "teacher", "(set)", "unset when teachers: is given (each "
         "entry of teachers: is a teacher section of its own)")
    names = [t.name or f"teacher{i}" for i, t in enumerate(teachers)]
    for i, name in enumerate(names):
        need(names.count(name) == 1, f"teachers.{i}.name", name, f"a unique name (names: {names})")
    catch_all = [n for n, t in zip(names, teachers) if not t.route]
    need(len(catch_all) <= 1, "teachers", catch_all,
         "at most one teacher with an empty route (the one taking every other source)")
    need(len(teachers) >= 2, "teachers", names, "two or more teachers (one: use teacher:)")
