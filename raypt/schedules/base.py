"""A schedule is a section of the job and a pure function of global tokens seen: a restart at another world size
(other tokens per step) stays on the same curve, and nothing but the tokens count needs to be checkpointed."""
from __future__ import annotations

from abc import abstractmethod
from typing import TypeVar

from raypt.schema import Section


class Schedule(Section):
    """`name` picks the schedule (each subclass declares `name: Literal["its name"]`); its other fields shape it."""
    name: str

    @abstractmethod
    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        """The value for the step that brings the run to `tokens` of its `total_tokens`, scaled to `peak`."""


SCHEDULES: dict[str, type[Schedule]] = {}
S = TypeVar("S", bound=Schedule)


def register(cls: type[S]) -> type[S]:
    """Class decorator: make a schedule selectable by its `name` in any schedule field of the config."""
    SCHEDULES[cls.model_fields["name"].default] = cls
    return cls
