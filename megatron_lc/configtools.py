"""Typed dataclass configs built from dicts and YAML, with errors that name the bad key and the closest valid one.

Dataclasses are the single source of truth; YAML files and ``key=value`` overrides only change their fields.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import os
import textwrap
import tokenize
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and the fix."""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a user most likely meant by ``key``: one ending in the same last part (``model.vocab_size``
    -> ``model.config.vocab_size``) if any, else the most similar spelling; None when nothing is close."""
    last = key.rpartition(".")[2]
    same_end = [v for v in valid if v.rpartition(".")[2] == last]
    if same_end:
        return (difflib.get_close_matches(key, same_end, n=1, cutoff=0) or same_end)[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def check_keys(cls, data: dict, where: str) -> None:
    """Raise ConfigError for keys of ``data`` that ``cls`` lacks, naming the closest valid key."""
    valid = field_names(cls)
    for key in data:
        if key not in valid:
            close = closest_key(str(key), valid)
            hint = f"did you mean '{close}'?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key '{key}' in {where}: {hint}")


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys fail naming the closest valid key, missing required
    fields are named too (value types are the class's own check, e.g. ModelConfig.__post_init__)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    check_keys(cls, data, where)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (fields without a default: give each of them)")
    return cls(**data)


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its one-line doc} of dataclass ``cls``, read from its source: the string literal under the
    field (its docstring), else the comment at the end of its line; "" for a field with neither."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                doc = after.value.value
            doc = doc or comments.get(node.end_lineno, "")
            docs[node.target.id] = " ".join(doc.split())  # one line, as --list-keys shows it
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def type_name(tp) -> str:
    """A field annotation as a user reads it: int, str | None, tuple[float, float], dict."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


# ---- value types, read off the dataclass annotations ------------------------------------------------------------------
@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    """How an error message names type ``tp``: 'an integer', 'a list of 2 numbers', 'a string or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping", tuple: "a list", type(None): "null"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, _describe(tp))


class _WrongType(Exception):
    """A value does not fit a type; ``key`` and ``expected`` say where and what (for nested values)."""

    def __init__(self, key: str, expected: str, value: Any):
        super().__init__(key)
        self.key, self.expected, self.value = key, expected, value


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp``, converting only where YAML is loose (an int for a float, ``1e-4``, which PyYAML
    reads as a string, a list for a tuple, an int for a string such as a folder named 2024)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except _WrongType as e:
                    if e.key != key or e.expected.startswith("a finite"):  # a nested or non-finite value: say so
                        raise
        raise _WrongType(key, _describe(tp), value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _WrongType(key, _describe(tp), value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise _WrongType(key, "a finite number", value)
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif (origin or tp) in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise _WrongType(key, _describe(tp), value)
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            if args:
                items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
                return tuple(items) if origin is tuple else items
            return tuple(value) if (origin or tp) is tuple else list(value)
    elif (origin or tp) is dict:
        if isinstance(value, dict):
            return value
    else:  # a type this checker does not know: the class checks it itself
        return value
    raise _WrongType(key, _describe(tp), value)


def yaml_text(value: Any) -> str:
    """``value`` as one would write it after ``key=`` (true, null, [0.9, 0.95], cosine)."""
    return value if isinstance(value, str) and value else json.dumps(value)


def check_types(cls, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` (some or all fields of dataclass ``cls``) with every value checked against its field's annotation
    (int, float, bool, str, tuples, lists, dicts, ``X | None``, ``str | dict``); floats must be finite. Returns the
    converted values; a value of the wrong type is a ConfigError naming ``prefix + field``, the expected type, the
    value and the field's default as an example."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        try:
            out[key] = _coerce(value, hints[key], prefix + key)
        except _WrongType as e:
            f = fields[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            example = ""
            if default is not dataclasses.MISSING and default is not None and e.key == prefix + key:
                example = f"; e.g. {e.key}={yaml_text(default)} (the default)"
            raise ConfigError(f"{e.key} must be {e.expected}, got {e.value!r} ({type(e.value).__name__})"
                              f"{example}") from None
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, with the construct it was reading (line and column 1-based)."""
    problem = getattr(e, "problem", None) or str(e)
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None:
        problem += f", {context} at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a syntax error (named by file:line:column) or a non-mapping top level
    is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML: {yaml_problem(e)}; fix the YAML there (indentation, a ':' "
                              f"after each key, closed brackets and quotes)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data
