"""What every config section is built from, light (pydantic only): tasks and schedules define their own sections
with these, and config imports their registries, so none of this may import config."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class ConfigError(ValueError):
    """A user mistake in a job config: one message that names the field, the value and what is allowed."""


class Section(BaseModel):
    """One section of a job: unknown keys are errors (a typo must not fall back to a default silently), and
    assignments are validated like the YAML is."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute(path: Optional[str]) -> Optional[str]:
    """A local path resolved against this process's directory; URIs (anything with "://") as they are."""
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


# A path field: made absolute when the job is validated, because Ray workers run in another directory. Idempotent,
# so a job re-validated on a worker (from its dict) keeps the driver's paths.
Location = Annotated[str, AfterValidator(absolute)]


def tagged_union(members: Mapping[str, type[Section]], tag: str, default: str) -> Any:
    """A field type holding one of `members`, picked by the value of its `tag` key (each member declares
    `tag: Literal[its name]`); a mapping that leaves the tag out gets `default`, a bare name is that member with its
    defaults (train.schedule=constant). Pydantic's errors then name the tag in their location, which config's error
    formatting turns back into the user's dotted key."""
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return {tag: value}
        return {tag: default, **value} if isinstance(value, dict) else value

    return Annotated[Union[tuple(members.values())], Field(discriminator=tag), BeforeValidator(fill)]
