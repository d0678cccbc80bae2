"""What config fields are made of, for error messages and `raypt config explain`: the sections nested in a field,
the sections a tagged field chooses between, and a field's type and bounds in words."""
from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import annotated_types as at
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from raypt.schema import absolute


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def tagged(field: FieldInfo) -> Optional[tuple[str, dict[str, type[BaseModel]]]]:
    """(tag key, {tag: section}) of a field holding one of several sections picked by a key (schema.tagged_union);
    None for any other field."""
    if not isinstance(field.discriminator, str):
        return None
    key = field.discriminator
    return key, {member.model_fields[key].default: member for member in get_args(field.annotation)}


def members(tp: Any) -> list[Any]:
    """The types a union (Optional included) allows; [tp] for anything else."""
    if get_origin(tp) in (Union, types.UnionType):
        return list(get_args(tp))
    return [tp]


def nested(tp: Any) -> Optional[type[BaseModel]]:
    """The section a field holds, directly, in a union or Optional, or as the items of a list."""
    for member in members(tp):
        if get_origin(member) is list:
            member = get_args(member)[0]
        if is_section(member):
            return member
    return None


def bounds(metadata: list[Any]) -> str:
    """Constraints in words: 'in [0, 1)', '>= 1', 'matching ^[a-z]+$'."""
    low = next((f"[{m.ge}" for m in metadata if isinstance(m, at.Ge)), None) or next(
        (f"({m.gt}" for m in metadata if isinstance(m, at.Gt)), None)
    high = next((f"{m.le}]" for m in metadata if isinstance(m, at.Le)), None) or next(
        (f"{m.lt})" for m in metadata if isinstance(m, at.Lt)), None)
    out = []
    if low and high:
        out.append(f"in {low}, {high}")
    elif low:
        out.append((">= " if low[0] == "[" else "> ") + low[1:])
    elif high:
        out.append(("<= " if high[-1] == "]" else "< ") + high[:-1])
    out += [f"at least {m.min_length} long" for m in metadata if isinstance(m, at.MinLen) and m.min_length > 0]
    out += [f"matching {m.pattern}" for m in metadata if getattr(m, "pattern", None)]
    return " ".join(out)


def describe(tp: Any, metadata: Optional[list[Any]] = None) -> str:
    """A field's type and bounds in words, e.g. 'int >= 1 or {min, max}', '[float in [0, 1), float in [0, 1)]'."""
    metadata = list(metadata or [])
    if get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        for item in extra:
            metadata += item.metadata if isinstance(item, FieldInfo) else [item]
    if any(isinstance(m, AfterValidator) and m.func is absolute for m in metadata):
        text = "path or URI"
    elif get_origin(tp) is Literal:
        text = " | ".join(repr(v) for v in get_args(tp))
    elif get_origin(tp) in (Union, types.UnionType):
        text = " or ".join(describe(m, metadata if m is not type(None) else None) for m in get_args(tp))
        return text.replace("NoneType", "None")
    elif get_origin(tp) is list:
        text = f"list of {describe(get_args(tp)[0])}"
    elif get_origin(tp) is tuple:
        text = "[" + ", ".join(describe(item) for item in get_args(tp)) + "]"
    elif get_origin(tp) is dict:
        text = "mapping of " + " -> ".join(describe(item) for item in get_args(tp))
    elif is_section(tp):
        return "{" + ", ".join(tp.model_fields) + "}"
    else:
        text = getattr(tp, "__name__", str(tp))
    return " ".join(filter(None, [text, bounds(metadata)]))
