"""The configs' own documentation: each field's docstring (the string literal under it), its type
and default, for `rdistill run --help KEY` and for anyone reading a config from Python."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass, from the string literal that follows each field."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and \
                    isinstance(nxt.value.value, str):
                out[node.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def _nested(tp: Any) -> type | None:
    """The dataclass a field holds (directly, in a list, in a dict, or optionally)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _nested(arg)
        if found:
            return found
    return None


def resolve_key(root: type, key: str) -> tuple[type, str]:
    """The dataclass a dotted key names (`merge.search`, `domains.math` -> DomainConfig), and the
    key as written."""
    cls = root
    hints = typing.get_type_hints(cls)
    for part in [p for p in key.split(".") if p]:
        if part not in hints:  # a dict entry (domains.math): the key names its values' class
            continue
        nxt = _nested(hints[part])
        if nxt is None:
            raise KeyError(f"{key}: {part} is a value, not a group of settings")
        cls, hints = nxt, typing.get_type_hints(nxt)
    return cls, key


def describe(cls: type, prefix: str = "") -> str:
    """One entry per field: `key (type, default ...)` and its docstring, indented."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            default = "{...}" if dataclasses.is_dataclass(made) else repr(made)
        else:
            default = "required"
        h = hints[f.name]
        tp = h.__name__ if isinstance(h, type) else str(h).replace("typing.", "")
        choices = f.metadata.get("choices")
        lines.append(f"{prefix}{f.name}  ({tp}, default {default}"
                     + (f"; one of {', '.join(map(str, choices))}" if choices else "") + ")")
        for doc_line in (docs.get(f.name) or "(no description)").splitlines():
            lines.append(f"    {doc_line}")
    return "\n".join(lines)
