"""YAML + dotted overrides -> a validated JobConfig, with errors a user can act on."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, NamedTuple, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from raypt.config.fields import is_section, members, tagged
from raypt.config.job import JobConfig
from raypt.schema import ConfigError

# pydantic's error types that only say the value was not of a union member's kind: noise beside a member's real
# complaint (scaling.workers=0 is "not a mapping" for {min, max}, but what matters is "must be >= 1")
KIND_ERRORS = ("_type", "_parsing", "literal_error")


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars/lists (data only, never code)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value (e.g. train.steps=200)")
    key, value = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        slot = _slot(node, part, key)
        child = node.setdefault(slot, {}) if isinstance(node, dict) else node[slot]
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{key}: cannot set a sub-key of '{part}', which holds {child!r}")
        node = child
    node[_slot(node, parts[-1], key)] = _parse_value(value)


def _slot(node: Union[dict, list], part: str, key: str) -> Union[str, int]:
    """Where `part` of a dotted key goes: a mapping's key, or the index of an item already in a list
    (data.sources.0.path=...; a whole list is set as one value, data.sources=[...])."""
    if isinstance(node, dict):
        return part
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: '{part}' is not an index of that list, which has {len(node)} items")
    return int(part)


class Choice(NamedTuple):
    """A tagged section as the user chose it: model.task 'clm' is Choice('model', 'task', 'clm', {tag: section})."""
    key: str
    tag_key: str
    tag: str
    variants: dict[str, type[BaseModel]]


class Located:
    """Where a pydantic error points, as the user wrote it: pydantic puts union member labels and the tags of
    tagged sections into its locations (model.clm.mask_ratio), the user wrote model.mask_ratio."""

    def __init__(self, loc: tuple):
        self.path: list[str] = []
        self.section: Optional[type[BaseModel]] = None  # the section the last key belongs to
        self.choice: Optional[Choice] = None  # when that section is one of a tagged field's choices
        self.union: Optional[str] = None  # the dotted key of a plain union the error went through
        node: Any = JobConfig
        chosen: Optional[Choice] = None
        parts = list(loc)
        while parts:
            if get_origin(node) is Annotated:
                node = get_args(node)[0]
            kinds = [k for k in members(node) if k is not type(None)]
            if len(kinds) == 1:  # not a union, or an Optional: pydantic adds no label
                node = kinds[0]
            part = parts.pop(0)
            if is_section(node):
                self.section, self.choice, chosen = node, chosen, None
                field = node.model_fields.get(str(part))
                self.path.append(str(part))
                node = field and field.annotation
                options = field and tagged(field)
                if options and parts and parts[0] in options[1]:
                    chosen = Choice(self.key, options[0], parts[0], options[1])
                    node = options[1][parts.pop(0)]
            elif len(kinds) > 1:  # `part` labels the member pydantic tried, e.g. 'constrained-int'
                self.union = self.key
                node = next((m for m in kinds if is_section(m) and m.__name__ in str(part)), None)
            else:  # a list index, a mapping key, a tuple position
                self.path.append(str(part))
                node = get_args(node)[-1] if get_origin(node) in (list, dict) else None

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _unknown_key(where: Located) -> str:
    name, options = where.path[-1], list(where.section.model_fields) if where.section else []
    if where.choice:
        owners = [repr(t) for t, section in where.choice.variants.items() if name in section.model_fields]
        if owners:
            return (f"{where.key}: not a field of {where.choice.key}.{where.choice.tag_key} {where.choice.tag!r} "
                    f"(it is a field of {', '.join(owners)}); allowed keys: {', '.join(options)}")
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    allowed = f"{hint}allowed keys: {', '.join(options)}" if options else "this section takes no sub-keys"
    return f"{where.key}: unknown key; {allowed}"


def _format_error(err: ValidationError) -> str:
    errors = [(e, Located(e["loc"])) for e in err.errors()]
    # Within one plain union, "not of this member's kind" errors only matter when no member has a real complaint.
    complaints = {w.union for e, w in errors if w.union and not e["type"].endswith(KIND_ERRORS)}
    lines = []
    for e, where in errors:
        if where.union in complaints and e["type"].endswith(KIND_ERRORS):
            continue
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key(where))
        elif e["type"] == "union_tag_invalid":
            tags = e["ctx"]["expected_tags"].rsplit(", ", 1)
            lines.append(f"{where.key}.{e['ctx']['discriminator'].strip(chr(39))}: got {e['ctx']['tag']!r}; "
                         f"Input should be {' or '.join(tags)}")
        elif e["type"] == "value_error" or not where.path:
            lines.append(str(e["msg"]).removeprefix("Value error, "))  # our validators name field and value
        else:
            lines.append(f"{where.key}: got {e.get('input')!r}; {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(dict.fromkeys(lines))


def from_dict(d: dict) -> JobConfig:
    """A job from its dict (YAML as read, overrides applied, or to_dict's output on another process)."""
    try:
        return JobConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")


def read_mapping(path: Union[str, Path], what: str = "job file") -> dict:
    """A YAML file that must hold a mapping (data only: safe_load never builds objects)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: '{path}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load(path: Union[str, Path, None], overrides: Optional[list[str]] = None, check_data: bool = True) -> JobConfig:
    """The job of a YAML file (or defaults alone, for None) with dotted overrides applied; local paths come out
    absolute. With check_data, what a run reads must answer and hold what it should (preflight.check_run)."""
    raw = read_mapping(path) if path is not None else {}
    for o in overrides or []:
        apply_override(raw, o)
    cfg = from_dict(raw)
    if check_data:
        from raypt import preflight, storage

        with storage.settings(cfg.s3.env()):  # the job's own S3 settings, without keeping them in os.environ
            preflight.check_run(cfg)
    return cfg
