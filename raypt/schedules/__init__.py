"""Schedules: values (the LR today; sparsity or density next) as pure functions of global tokens seen. One
registry: a new schedule is a module that registers a `Schedule` subclass, plus its import line below."""
from __future__ import annotations

from raypt.schedules import cosine  # noqa: F401  (registers itself; the default, listed first)
from raypt.schedules import constant  # noqa: F401
from raypt.schedules import linear  # noqa: F401
from raypt.schedules import one_minus_sqrt  # noqa: F401
from raypt.schedules import rewarm  # noqa: F401
from raypt.schedules import wsd  # noqa: F401
from raypt.schedules import inverse_sqrt  # noqa: F401
from raypt.schedules import infinite  # noqa: F401
from raypt.schedules import sparsity  # noqa: F401  (the pruned share of weights: sparsity.schedule)
from raypt.schedules.base import SCHEDULES, Schedule, register
from raypt.schema import tagged_union

# The type of an LR schedule field: the registered schedule whose `name` the job gives, cosine when it gives none.
ScheduleUnion = tagged_union({n: s for n, s in SCHEDULES.items() if s.kind == "lr"}, "name", default="cosine")

__all__ = ["SCHEDULES", "Schedule", "ScheduleUnion", "register"]
