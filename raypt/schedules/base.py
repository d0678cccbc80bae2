"""A schedule is a section of the job and a pure function of global tokens seen: a restart at another world size
(other tokens per step) stays on the same curve, and nothing but the tokens count needs to be checkpointed."""
from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Optional, TypeVar

from pydantic_core import PydanticCustomError

from raypt.schema import Section


class Schedule(Section):
    """`name` picks the schedule (each subclass declares `name: Literal["its name"]`); its other fields shape it."""
    name: str
    kind: ClassVar[str] = "lr"  # what its value is: a schedule field offers the schedules of its own kind

    @abstractmethod
    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        """The value for the step that brings the run to `tokens` of its `total_tokens`, scaled to `peak`."""


SCHEDULES: dict[str, type[Schedule]] = {}
S = TypeVar("S", bound=Schedule)


def register(cls: type[S]) -> type[S]:
    """Class decorator: make a schedule selectable by its `name` in any schedule field of the config."""
    SCHEDULES[cls.model_fields["name"].default] = cls
    return cls


def span(share: float, tokens: Optional[float], total_tokens: float) -> float:
    """A phase's length in tokens: its token count when the job gives one (a length that stays put when the run
    gets longer), else its share of the run."""
    return share * total_tokens if tokens is None else tokens


def refused(message: str) -> PydanticCustomError:
    """What a field validator raises for a value that clashes with another field: pydantic places it at the field,
    so the config's message leads with the user's dotted key and value (a ValueError's would have to name them)."""
    return PydanticCustomError("schedule_fields_clash", message)
