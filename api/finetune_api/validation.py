"""Check a FineTuneJob locally exactly as the API server would, and apply the schema's defaults.

Used by `finetune validate`, by the trainer before it touches any data, and by the operator's
tests. Structural checks come from the schema converted to JSON Schema; cross-field checks
evaluate the schema's own CEL rules (`x-kubernetes-validations`) with cel-python, so no rule is
written twice. Transition rules (those that read `oldSelf`) only make sense on update and are left
to the API server.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import celpy
import jsonschema

from finetune_api import API_VERSION, KIND
from finetune_api.schema import Schema, spec_schema


class SpecError(ValueError):
    """A manifest that does not satisfy the API. `problems` holds one line per problem, each
    starting with the field path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class _CelRule:
    path: tuple[str, ...]  # where the rule's `self` sits, under spec
    rule: str
    message: str
    field_path: str
    # The fields of `self` the rule reads (`self.x`), or None when it reads `self` as a whole.
    reads: tuple[str, ...] | None = None


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill in defaults the way the API server does: top-down, a missing field takes its default,
    and an object created from a default `{}` gets its own fields' defaults too."""
    if schema.get("type") != "object" or not isinstance(value, dict):
        return value
    result = dict(value)
    for name, field_schema in schema.get("properties", {}).items():
        if name not in result and "default" in field_schema:
            result[name] = copy.deepcopy(field_schema["default"])
        if name in result:
            result[name] = apply_defaults(result[name], field_schema)
    return result


def _to_json_schema(schema: Schema) -> Schema:
    """Kubernetes' OpenAPI v3 dialect to JSON Schema draft 4, refusing unknown fields like
    `kubectl apply` with strict field validation."""
    out: Schema = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_json_schema(value)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (schema.get("type") == "object" and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


_SELF_FIELD = re.compile(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)")
_SELF = re.compile(r"\bself\b")


def _fields_read(rule: str, schema: Schema) -> tuple[str, ...] | None:
    """The properties of `self` a rule reads, when every use of `self` is `self.<property>`;
    None when it may read more (bare `self`, a macro such as `self.all(...)`)."""
    fields = _SELF_FIELD.findall(rule)
    if len(fields) != len(_SELF.findall(rule)):
        return None
    if not set(fields) <= set(schema.get("properties", {})):
        return None
    return tuple(sorted(set(fields)))


def _cel_rules(schema: Schema, path: tuple[str, ...] = ()) -> Iterator[_CelRule]:
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        yield _CelRule(path, rule["rule"], rule["message"], rule.get("fieldPath", ""),
                       _fields_read(rule["rule"], schema))
    for name, sub in schema.get("properties", {}).items():
        yield from _cel_rules(sub, path + (name,))


_compile_lock = threading.Lock()
_compiled_once: tuple[Schema, jsonschema.Draft4Validator, list[tuple[_CelRule, Any]]] | None = None


def _compiled() -> tuple[Schema, jsonschema.Draft4Validator, list[tuple[_CelRule, Any]]]:
    """The schema, its validator and its CEL programs, built once per process (building the CEL
    parser costs ~0.3 s; without the lock every thread of a pool that meets its first job at the
    same time would build its own)."""
    global _compiled_once
    with _compile_lock:
        if _compiled_once is None:
            schema = spec_schema()
            validator = jsonschema.Draft4Validator(_to_json_schema(schema))
            env = celpy.Environment()
            rules = [(rule, env.program(env.compile(rule.rule))) for rule in _cel_rules(schema)]
            _compiled_once = schema, validator, rules
        return _compiled_once


def prepare() -> None:
    """Build the validator now (at a process' start), not on its first job."""
    _compiled()


class _VerdictCache:
    """CEL verdicts by rule and by the values of the fields the rule reads. Interpreted CEL
    costs ~2 ms a rule; jobs of one team mostly share the fields the rules read (a sweep differs
    in its output and a learning rate), so most verdicts are known. Bounded, thread-safe."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.verdicts: OrderedDict[tuple[int, str], bool] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> bool | None:
        with self.lock:
            verdict = self.verdicts.get(key)
            if verdict is not None:
                self.verdicts.move_to_end(key)
            return verdict

    def put(self, key: tuple[int, str], verdict: bool) -> None:
        with self.lock:
            self.verdicts[key] = verdict
            if len(self.verdicts) > self.size:
                self.verdicts.popitem(last=False)


_verdicts = _VerdictCache()


def _holds(index: int, rule: _CelRule, program: Any, node: Any) -> bool:
    if isinstance(node, dict) and rule.reads is not None:
        read = {name: node[name] for name in rule.reads if name in node}
    elif not isinstance(node, (dict, list)):
        read = node
    else:
        return bool(program.evaluate({"self": celpy.json_to_cel(node)}))
    key = (index, json.dumps(read, sort_keys=True))
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = bool(program.evaluate({"self": celpy.json_to_cel(read)}))
        _verdicts.put(key, verdict)
    return verdict


def _typed_for_cel(value: Any, schema: Schema) -> Any:
    """CEL is strictly typed: a `number` field is a double even when written as 1."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: _typed_for_cel(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed_for_cel(v, schema.get("items", {})) for v in value]
    return value


def _field(path: Any) -> str:
    return ".".join(["spec", *[str(p) for p in path]])


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "pattern":
        expected = error.schema.get("description") or f"pattern {error.validator_value}"
        return f"{error.instance!r} is not valid here. Expected: {expected}"
    return error.message


def validate_spec(spec: Any) -> dict[str, Any]:
    """Return the spec with defaults applied, or raise SpecError naming every bad field."""
    schema, validator, rules = _compiled()
    if not isinstance(spec, dict):
        raise SpecError(["spec: must be a mapping"])
    problems = [f"{_field(e.absolute_path)}: {_message(e)}"
                for e in sorted(validator.iter_errors(spec), key=lambda e: list(e.absolute_path))]
    if problems:
        raise SpecError(problems)
    defaulted = apply_defaults(spec, schema)
    typed = _typed_for_cel(defaulted, schema)
    for index, (rule, program) in enumerate(rules):
        node = typed
        for name in rule.path:
            node = node.get(name) if isinstance(node, dict) else None
        if node is None:
            continue
        if not _holds(index, rule, program, node):
            where = _field(rule.path) + rule.field_path
            problems.append(f"{where}: {rule.message}")
    if problems:
        raise SpecError(problems)
    return defaulted


def validate_manifest(document: Any) -> dict[str, Any]:
    """Accept a whole FineTuneJob manifest or a bare spec; return the defaulted spec."""
    if isinstance(document, dict) and "spec" in document and ("kind" in document
                                                              or "apiVersion" in document):
        problems = []
        if document.get("apiVersion") != API_VERSION:
            problems.append(f"apiVersion: must be {API_VERSION}, got {document.get('apiVersion')!r}")
        if document.get("kind") != KIND:
            problems.append(f"kind: must be {KIND}, got {document.get('kind')!r}")
        if problems:
            raise SpecError(problems)
        return validate_spec(document["spec"])
    return validate_spec(document)
