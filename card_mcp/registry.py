"""What a tool is: its name, body, argument and result models, annotations, durability and replay hook; its
published schemas; and how its arguments are read (strictly, as its inputSchema says).

A body is ``async def name(call: Call, <flat named arguments>) -> ResultModel`` with a docstring written for the
model. Its arguments' model is derived from its signature (unknown keys refused), its result model from its return
annotation; server.py lists and calls tools from tools.TOOLS alone.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from functools import cached_property
from types import UnionType
from typing import Annotated, Any, Union, cast, get_args, get_origin, get_type_hints

from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .calls import Call
from .errors import InvalidArgument

Body = Callable[..., Awaitable[BaseModel]]
# Answers a call from what it already did, before its arguments are validated (a retried batch); None otherwise.
Replay = Callable[[Call, dict[str, Any]], Awaitable[BaseModel | None]]


class Tool:
    """One tool of the registry. Everything derived (models, schemas) is built on first use, not at import."""

    def __init__(
        self,
        body: Body,
        *,
        title: str,
        durable: bool,
        read_only: bool = False,
        destructive: bool = False,
        idempotent: bool = True,
        replay: Replay | None = None,
    ) -> None:
        self.name = body.__name__
        self.body = body
        self.title = title
        self.durable = durable  # whether its COMMIT waits for the WAL flush: a property of the tool, not its hints
        self.replay = replay
        self.annotations = ToolAnnotations(
            read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
        )

    @cached_property
    def description(self) -> str:
        """The body's docstring as the model reads it: paragraphs kept, each on one line, no indentation."""
        paragraphs = inspect.cleandoc(self.body.__doc__ or "").split("\n\n")
        return "\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)

    @cached_property
    def _hints(self) -> dict[str, Any]:
        return get_type_hints(self.body, include_extras=True)

    @cached_property
    def arguments(self) -> type[BaseModel]:
        """The model of the tool's arguments: every parameter after ``call``, unknown keys refused."""
        parameters = list(inspect.signature(self.body).parameters.values())[1:]
        fields: dict[str, Any] = {
            p.name: (self._hints[p.name], ... if p.default is inspect.Parameter.empty else p.default)
            for p in parameters
        }
        model = create_model(  # the name the SDK gives it: the schema's title stays as clients saw it
            f"{self.name}Arguments", __config__=ConfigDict(extra="forbid"), __module__=__name__, **fields
        )
        return cast("type[BaseModel]", model)

    @cached_property
    def result(self) -> type[BaseModel]:
        result: type[BaseModel] = self._hints["return"]
        return result

    @cached_property
    def input_schema(self) -> dict[str, Any]:
        return compact_schema(inline_refs(self.arguments.model_json_schema(by_alias=True)))

    @cached_property
    def output_schema(self) -> dict[str, Any]:
        return compact_schema(inline_refs(self.result.model_json_schema()), result=True)

    @cached_property
    def _text_fields(self) -> frozenset[str]:
        return frozenset(name for name, f in self.arguments.model_fields.items() if admits_text(f.annotation))

    def parse(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The validated arguments, ready to call the body with; InvalidArgument naming the fields and rules broken
        (never the rejected values) otherwise.

        Clients that send objects and lists as JSON text (Claude Desktop does) are read as the SDK reads them: a
        string is parsed as JSON where the schema allows no string (content, tags, cards); where it allows one (a
        query, a new title, an idempotency key) it stays the string it is: "[1]" is a query, not a list."""
        data = {key: self._pre_parse(key, value) for key, value in arguments.items()}
        try:
            validated = self.arguments.model_validate(data)
        except ValidationError as exc:
            raise invalid_arguments(exc, self.arguments) from None
        return {name: getattr(validated, name) for name in self.arguments.model_fields}

    def _pre_parse(self, key: str, value: Any) -> Any:
        if not isinstance(value, str) or key in self._text_fields or key not in self.arguments.model_fields:
            return value
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):  # not JSON, or JSON the parser refuses: validation decides
            return value
        return value if isinstance(parsed, str | int | float) else parsed

    async def invoke(self, call: Call, arguments: dict[str, Any]) -> BaseModel:
        """Run the tool inside ``call``: its replay hook first, if it has one, then its body."""
        if self.replay is not None:
            replayed = await self.replay(call, arguments)
            if replayed is not None:
                return replayed
        return await self.body(call, **self.parse(arguments))


def admits_text(annotation: Any) -> bool:
    """Whether a parameter annotated ``annotation`` takes a string (str, an Annotated str, a union with str)."""
    if annotation is str:
        return True
    args = get_args(annotation)
    if get_origin(annotation) is Annotated:
        return admits_text(args[0])
    return any(admits_text(arg) for arg in args) if get_origin(annotation) in (Union, UnionType) else False


# pydantic quotes pieces of the input in some messages ("invalid character: found `z` at 0" for a UUID).
_QUOTED = re.compile(r"`[^`]*`")


# An unexpected key is named when it reads as a name: it is the client's own key (SPEC section 4 forbids echoing
# values, not keys), and the name is what lets a model fix its call. Anything else (long, control characters, a
# value pasted as a key) is described, not shown.
NAMEABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def invalid_arguments(exc: ValidationError, model: type[BaseModel] | None = None) -> InvalidArgument:
    """A one-line message naming the fields and rules broken, never the rejected values; an unexpected key is
    named, with the nearest valid one (``get_card {"id": ...}``: "unexpected argument 'id' (did you mean
    'card_id'?)")."""
    problems = []
    errors = exc.errors(include_input=False, include_url=False, include_context=False)
    errors.sort(key=lambda err: err["type"] != "extra_forbidden")  # a wrong name first: it explains the rest
    for err in errors[:5]:
        if err["type"] == "extra_forbidden":
            *place, key = err["loc"]
            where = ".".join(str(part) for part in place) or "arguments"
            problems.append(f"{where}: {_unexpected(str(key), _names_at(model, place))}")
            continue
        where = ".".join(str(part) for part in err["loc"]) or "arguments"
        problems.append(f"{where}: {_QUOTED.sub('a character', err['msg'])}")
    return InvalidArgument(
        "; ".join(problems), hint="Fix these arguments to match the tool's inputSchema and call again."
    )


def _unexpected(key: str, valid: list[str]) -> str:
    if not NAMEABLE.fullmatch(key):
        return f"an unexpected argument name (allowed: {', '.join(valid)})" if valid else "unexpected argument"
    import difflib  # only for a wrong argument name: not at start-up

    lowered = key.lower()
    near = [name for name in valid if lowered in name or name in lowered] or difflib.get_close_matches(
        lowered, valid, n=1, cutoff=0.6
    )
    if near:
        return f"unexpected argument '{key}' (did you mean '{near[0]}'?)"
    return f"unexpected argument '{key}' (allowed: {', '.join(valid)})" if valid else f"unexpected argument '{key}'"


def _names_at(model: type[BaseModel] | None, place: list[str | int]) -> list[str]:
    """The argument names valid at ``place`` (a location of a validation error) in ``model``."""
    for part in place:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (list[NewCard], NewCard | None, Annotated[...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def compact_schema(schema: dict[str, Any], *, result: bool = False) -> dict[str, Any]:
    """``schema`` as few bytes as say the same: every client loads every tool's schemas into its model's context.
    Dropped: pydantic's generated titles ("Card Type" for card_type), ``default: null`` and
    ``additionalProperties: true`` (what omission means anyway) and the docstrings of nested models (the tool's
    description says what goes in); for results (``result=True``) also descriptions, ``format``, ``enum``,
    ``required`` at the root and, below it, every type: a nested object is the list of its fields' names
    (``_names_only``). The tool's description says what comes back, every field of a result is always there, and a
    model reads the values themselves. An argument keeps every
    bound, enum, format and default.
    A nullable ``anyOf`` of one typed schema and ``{"type": "null"}`` becomes that schema with ``null`` added to its
    ``type`` (and ``enum``). Every bound, enum, format and default stays."""

    def compact(node: Any, *, properties: bool = False, root: bool = False) -> Any:
        if isinstance(node, list):
            return [compact(item) for item in node]
        if not isinstance(node, dict):
            return node
        if properties:  # the keys are argument names, not keywords
            return {name: compact(value) for name, value in node.items()}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title" or (result and key in ("description", "required", "format", "enum")):
                continue
            if key == "description" and "properties" in node:  # a nested model's docstring
                continue
            if (key, value) in (("default", None), ("additionalProperties", True)):
                continue
            if result and not root and (key, value) == ("type", "object") and "properties" in node:
                continue  # a nested result object: its properties say it (the root keeps its type, as MCP asks)
            out[key] = compact(value, properties=key == "properties")
        return _nullable(out)

    compacted: dict[str, Any] = compact(schema, root=True)
    if result:
        compacted["properties"] = {name: _names_only(value) for name, value in compacted.get("properties", {}).items()}
    return compacted


def _names_only(node: Any) -> Any:
    """A result's schema below its root as the names of its fields: an object as ``required``, the list of its
    fields' names (each is always there), with ``properties`` only for a field that has fields of its own; an array
    as its ``items`` where those name fields; every other schema is ``{}``, any value (MCP's schema wants each
    property an object, and the MCP Inspector refuses a list that has a ``true``).
    The SDK's client validates structuredContent against outputSchema with jsonschema on every call: about 8 us
    for each typed value (0.8 ms of a ten-card search page, 25 ms of a 1000-card batch's results), and 5 us for
    each value under ``properties`` even when its schema is ``{}`` (0.4 ms of a ten-card page), where a
    ``required`` list is one check per object (0.06 ms a page); the values still say their types, and the result
    models keep them (tests/test_server.py)."""
    if not isinstance(node, dict):
        return node
    properties = node.get("properties")
    if isinstance(properties, dict) and properties:
        nested = {name: named for name, value in properties.items() if (named := _names_only(value))}
        return {"required": list(properties), **({"properties": nested} if nested else {})}
    items = _names_only(node["items"]) if isinstance(node.get("items"), dict) else {}
    return {"items": items} if items else {}


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``{"anyOf": [X, {"type": "null"}], ...}`` as X with ``null`` in its type (and enum), where X has one type."""
    options = node.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return node
    (other,) = [option for option in options if option != {"type": "null"}]
    if not isinstance(other.get("type"), str):
        return node
    merged = {**other, **{k: v for k, v in node.items() if k != "anyOf"}, "type": [other["type"], "null"]}
    if "enum" in merged:  # the outer description (what null means here) wins over the type's own
        merged["enum"] = [*merged["enum"], None]
    return merged


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``#/$defs/...`` reference replaced by its definition. Clients validate each item of
    a 1000-card batch or result against the schema, and resolving a $ref per item was most of that cost; a
    self-contained schema is also easier for simple validators."""
    definitions = schema.get("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen or name not in definitions:  # recursive or foreign: keep the reference
                return node
            siblings = {k: inline(v, seen) for k, v in node.items() if k != "$ref"}
            return {**inline(definitions[name], (*seen, name)), **siblings}
        return {k: inline(v, seen) for k, v in node.items() if k != "$defs"}

    result: dict[str, Any] = inline(schema, ())
    return schema if "$ref" in json.dumps(result) else result  # a recursive model keeps its $defs
