"""The one override grammar of every command, the YAML reader of config files, and the wording of refusals.

``key.sub=value`` sets a key of a YAML config (job configs, ``eft-jax train`` files): the value is read as a
YAML scalar or flow collection (``eft.weights=[0.5]``, ``sampling.logit_bias={7: -100}``), a list element is
set by index (``eft.weights.0=0.5``), missing sections are created. :func:`apply_overrides` returns which
override set which dotted key, so :func:`where` can name the override instead of the file in a refusal.

:func:`refusal` words one pydantic error as ``<file or override>: <dotted key>: <what is allowed>; got <value>``
with a "did you mean" hint for unknown keys. This translation layer is the justified hand-written piece of the
config schemas (``eft_jax.config``, ``eft_jax.train.cli``): pydantic's own messages ("Input should be greater
than or equal to 1", "Unexpected keyword argument") name neither the file nor the override nor the allowed
values in our words, so the schemas keep that wording in each field's ``description`` and this layer uses it.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

__all__ = ["ConfigError", "Refused", "apply_override", "apply_overrides", "read_yaml", "refusal", "show",
           "unknown_key", "where"]


class ConfigError(ValueError):
    """A config cannot be used; the message names the file or override, the dotted key and what is allowed."""


class Refused(ValueError):
    """Raised by a schema field's own validator when its message, "must ...", says what is allowed better than
    the field's description (quoted as is by :func:`refusal`)."""


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys and reads 1e-3 as a float (YAML 1.2 style)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str, where: str) -> Any:
    """YAML text as plain data, or ConfigError naming ``where`` and the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {at}{problem}") from None


def apply_override(raw: dict, override: str) -> str:
    """Apply one ``key.sub=value`` to ``raw`` in place; returns the dotted key."""
    where = f"command-line override {override!r}"
    if "=" not in override:
        raise ConfigError(f"{where}: expected key.sub=value (e.g. sampling.temperature=0.5)")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{where}: {key!r} is not a dotted key like sampling.temperature")
    value = read_yaml(text, where) if text.strip() else None
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {here}: the list has {len(node)} element(s); use an index below that "
                                  f"or set the whole list, e.g. {'.'.join(parts[:depth])}=[...]")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a value, not a section, so it has no key {part!r}")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return key


def apply_overrides(raw: dict, overrides: Sequence[str]) -> tuple[dict, dict[str, str]]:
    """A copy of ``raw`` with the overrides applied, and {dotted key: the override that set it}."""
    raw = copy.deepcopy(raw)
    return raw, {apply_override(raw, o): o for o in overrides}


def where(source: str, overridden: Mapping[str, str], key: str) -> str:
    """Where a key's value came from: the file, or the command-line override that set it (or a parent, or,
    for a section an override created, a key below it)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in overridden:
            return f"{source} (command-line override {overridden['.'.join(parts[:i])]!r})"
    below = [o for k, o in overridden.items() if k.startswith(key + ".")]
    return f"{source} (command-line override {below[0]!r})" if below else source


def show(value: Any) -> str:
    """A value as a refusal quotes it: short repr and its YAML kind."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text if len(text) < 60 else text[:57] + '...'} ({kind})"


_MISSING = object()


def _lookup(raw: Any, key: Sequence[str]) -> Any:
    for part in key:
        if not isinstance(raw, dict) or part not in raw:
            return _MISSING
        raw = raw[part]
    return raw


def unknown_key(section: str, name: str, allowed: Sequence[str]) -> str:
    """``<section.name>: unknown key (did you mean ...?); allowed keys in <section>: ...``."""
    hint = difflib.get_close_matches(str(name), allowed, n=1)
    return (f"{section + '.' if section else ''}{name}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; allowed {'keys in ' + section if section else 'top-level keys'}: {', '.join(allowed)}")


def _split(loc: tuple[str, ...], sections: Mapping[str, type | None]) -> tuple[tuple[str, ...], Any, Any]:
    """The config key an error location is about (less list indices and union tags), the schema class whose
    field that key is (None: a name in a mapping of names), and the key's own class when it is a section."""
    key: tuple[str, ...] = ()
    owner, own = sections[""], sections[""]
    for part in loc:
        key, owner = (*key, part), own
        own = sections.get(".".join(key), sections.get(".".join((*key[:-1], "*")), _MISSING))
        if own is _MISSING:
            return key, owner, None
    return key, owner, own


def refusal(error: Mapping[str, Any], raw: Any, sections: Mapping[str, type | None],
            keys_of: Callable[[type], list[str]]) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error (an item of ``ValidationError.errors()``).

    ``sections`` maps each section's dotted key ("" the file; "models.*" any name under models) to its schema
    class (None: a mapping of names); ``keys_of(cls)`` gives the keys a user may write in a class. The allowed
    values are the field's ``description``; a ``ValueError`` raised by a field's own validator that says
    "must ..." is quoted as is."""
    kind, loc = error["type"], tuple(str(p) for p in error["loc"])
    key, owner, own = _split(loc, sections)
    dotted = ".".join(key)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return dotted, unknown_key(".".join(key[:-1]), key[-1], keys_of(owner)).partition(": ")[2]
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return dotted, "is required"
    value = _lookup(raw, key)
    got = f"; got {show(error['input'] if value is _MISSING else value)}"
    if own is not None and len(key) == len(loc):  # a section that is no mapping
        return dotted, f"must be a mapping with keys {', '.join(keys_of(own))}{got}"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, Refused):
        return dotted, f"{cause}{got}"
    info = getattr(owner, "__pydantic_fields__", {}).get(key[-1]) if owner is not None else None
    allowed = info.description if info is not None and info.description else error["msg"]
    return dotted, f"must be {allowed}{got}"
