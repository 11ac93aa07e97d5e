"""The CRD's CEL rules (``x-kubernetes-validations``), evaluated offline as the API server evaluates them.

Each cross-field rule is written once, as CEL on the pydantic model it belongs to (``spec.cel``); the CRD
is generated from the same JSON schema. ``sftctl validate`` and the trainer call ``problems`` after pydantic
accepted the types, so they refuse what the API server refuses, with the same field path and message.

As the API server does: the schema's defaults are applied first, rules on absent (or null) objects are not
evaluated, ``x-kubernetes-list-type: map`` lists refuse a repeated key, and transition rules (``oldSelf``)
apply only to updates, so they are skipped here.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel

Schema = dict[str, Any]
Path = tuple[str | int, ...]


def problems(model: type[BaseModel], document: Any) -> list[tuple[str, str]]:
    """The rules ``document`` (the model's camelCase wire form) breaks, as (dotted field path, message)."""
    out: list[tuple[str, str]] = []
    for path, value, rule in rule_sites(model, document):
        if not _program(rule["rule"])(value):  # RuleError: the caller reports the value's type first
            where = path + tuple(p for p in rule.get("fieldPath", "").split(".") if p)
            out.append((".".join(str(p) for p in where), rule["message"]))
    out.extend(_duplicate_map_keys(schema_of(model), document, ()))
    return out


M = TypeVar("M", bound=BaseModel)


def own_rules(instance: M) -> M:
    """A model's own rules as a pydantic error (an after-validator), for a model also parsed outside any manifest.
    Only for a small model whose dump is its wire form: no nested objects, no defaults."""
    for path, message in problems(type(instance), instance.model_dump(by_alias=True, exclude_none=True)):
        raise ValueError(f"{path}: {message}")
    return instance


def rule_sites(model: type[BaseModel], document: Any) -> Iterator[tuple[Path, Any, dict[str, str]]]:
    """Every (path, defaulted value, rule) the API server evaluates on ``document``, outermost rules last."""
    schema = schema_of(model)
    value = copy.deepcopy(document)
    _default(schema, value)
    yield from _sites(schema, value, ())


@functools.cache
def schema_of(model: type[BaseModel]) -> Schema:
    """The model's JSON schema with every ``$ref`` inlined and ``Optional[X]`` read as X (rules of both kept)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _resolve({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            inner = _resolve(options[0], defs)
            outer = {k: v for k, v in node.items() if k != "anyOf"}
            rules = inner.get("x-kubernetes-validations", []) + outer.pop("x-kubernetes-validations", [])
            merged = {**inner, **_resolve(outer, defs)}
            if rules:
                merged["x-kubernetes-validations"] = rules
            return merged
    return {k: (v if k == "default" else _resolve(v, defs)) for k, v in node.items() if k != "$defs"}


def _children(schema: Schema, value: Any) -> Iterator[tuple[str | int, Schema, Any]]:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield key, sub, item
    elif isinstance(value, list) and schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield index, schema["items"], item


def _default(schema: Schema, value: Any) -> None:
    """Fill in absent properties that have a default (a structural schema's defaulting), in place."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in schema.get("properties", {}).items():
            if key not in value and sub.get("default") is not None:
                value[key] = copy.deepcopy(sub["default"])
    for key, sub, item in _children(schema, value):
        if sub.get("type") == "number" and isinstance(item, int) and not isinstance(item, bool):
            value[key] = float(item)  # a CRD number is a CEL double, also when written as 0
        else:
            _default(sub, item)


def _sites(schema: Schema, value: Any, path: Path) -> Iterator[tuple[Path, Any, dict[str, str]]]:
    if value is None:
        return
    for key, sub, item in _children(schema, value):
        yield from _sites(sub, item, path + (key,))
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"]:
            yield path, value, rule


def _duplicate_map_keys(schema: Schema, value: Any, path: Path) -> Iterator[tuple[str, str]]:
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple[Any, ...]] = set()
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                named = ", ".join(f"{k}={item.get(k)}" for k in keys)
                yield ".".join(str(p) for p in path + (index,)), f"duplicate entry ({named}): one entry per {', '.join(keys)}"
            seen.add(key)
    for key, sub, item in _children(schema, value):
        yield from _duplicate_map_keys(sub, item, path + (key,))


class RuleError(Exception):
    """A rule that does not compile or evaluate: a bug in the rule, or a value of the wrong type."""


@functools.cache
def _program(rule: str) -> Callable[[Any], bool]:
    import cel  # the library (common-expression-language); here, so importing the models stays cheap

    try:
        program = cel.compile(rule)
    except Exception as err:  # noqa: BLE001 - the library raises plain ValueError/RuntimeError
        raise RuleError(f"{rule}: {err}") from None

    def run(value: Any) -> bool:
        try:
            out = program.execute({"self": value})
        except Exception as err:  # noqa: BLE001
            raise RuleError(f"{rule}: {err}") from None
        if not isinstance(out, bool):
            raise RuleError(f"{rule}: gave {type(out).__name__}, not bool")
        return out

    return run
