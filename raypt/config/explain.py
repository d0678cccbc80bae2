"""`raypt config explain [SECTION]`: every field of the job, or of one section, with its type, bounds, default and
meaning, read from the schema itself so that it cannot drift from what validation enforces."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raypt.config.fields import describe, nested, tagged
from raypt.config.job import JobConfig
from raypt.schema import ConfigError

WIDTH = 116


@dataclass
class Node:
    """One section of the job: a plain section, or one picked among `variants` by its `tag` key."""
    key: str
    doc: str
    section: Optional[type[BaseModel]] = None
    tag: str = ""
    variants: dict[str, type[BaseModel]] = field(default_factory=dict)
    default: str = ""


def _words(text: Optional[str]) -> str:
    """A docstring or description on one line (textwrap re-wraps it)."""
    return " ".join((text or "").split())


def _sections(cls: type[BaseModel] = JobConfig, prefix: str = "") -> dict[str, Node]:
    """Every section below `cls` by dotted key, each followed by its own sections."""
    out: dict[str, Node] = {}
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        options = tagged(info)
        if options:
            tag, variants = options
            default = getattr(getattr(cls(), name), tag)  # the holder's defaults pick the default variant
            out[key] = Node(key, _words(info.description), tag=tag, variants=variants, default=default)
            for variant in variants.values():
                out.update(_sections(variant, key))
        elif section := nested(info.annotation):
            each = "a list; each item: " if get_origin(info.annotation) is list else ""
            out[key] = Node(key, each + _words(section.__doc__ or info.description), section=section)
            out.update(_sections(section, key))
    return out


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    return repr(list(value) if isinstance(value, tuple) else value)


def _field(name: str, info: FieldInfo, key: str, sections: dict[str, Node], indent: str) -> list[str]:
    sub = sections.get(f"{key}.{name}")
    if sub and sub.variants:
        head = f"{name}: one of {', '.join(map(repr, sub.variants))} by {sub.key}.{sub.tag} (default " \
               f"{sub.default!r}); see {sub.key}"
    elif sub and info.annotation is sub.section:
        head = f"{name}: section; see {sub.key}"
    else:
        more = f"; see {sub.key}" if sub else ""
        head = f"{name}: {describe(info.annotation, info.metadata)} = {_default(info)}{more}"
    body = textwrap.wrap(_words(info.description), WIDTH - len(indent) - 4)
    return [indent + head] + [indent + "    " + line for line in body]


def _render(node: Node, sections: dict[str, Node], same_as: Optional[str]) -> list[str]:
    lines = textwrap.wrap(f"{node.key}: {node.doc}", WIDTH, subsequent_indent="  ")
    if same_as:
        return lines + [f"  (the fields of {same_as})"]
    if node.section is not None:
        for name, info in node.section.model_fields.items():
            lines += _field(name, info, node.key, sections, "  ")
        return lines
    for tag, variant in node.variants.items():
        lines += textwrap.wrap(f"{node.tag}: {tag!r}: {_words(variant.__doc__)}", WIDTH, initial_indent="  ",
                               subsequent_indent="    ")
        for name, info in variant.model_fields.items():
            if name != node.tag:
                lines += _field(name, info, node.key, sections, "    ")
    return lines


def explain(section: Optional[str] = None) -> str:
    """The fields of the whole job, or of one section (a dotted key such as 'train' or 'train.schedule'): type and
    bounds, default, and meaning. Sections picked by a key (model by `task`, train.schedule by `name`) list each
    choice's fields under its name."""
    sections = _sections()
    if section is not None and section not in sections:
        raise ConfigError(f"config explain: no section {section!r}; sections: {', '.join(sections)}")
    keys = [k for k in sections if section is None or k == section or k.startswith(section + ".")]
    # Each section class's fields once, under its shortest key (data.prepare, not data.sources.prepare).
    first: dict[Any, str] = {}
    for key in sorted(keys, key=lambda k: k.count(".")):
        first.setdefault(sections[key].section or key, key)
    out = []
    for key in keys:
        canonical = first[sections[key].section or key]
        out.append("\n".join(_render(sections[key], sections, canonical if canonical != key else None)))
    return "\n\n".join(out) + "\n"
