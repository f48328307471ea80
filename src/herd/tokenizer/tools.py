"""Llama 3.1 tool calling: tool calls as the model writes them, the parsing of generated calls, and
the tool system prompt, all as `llama_models` and its prompt_format.md have them.

Tool calls travel in the OpenAI shape (`{"id", "type": "function", "function": {"name",
"arguments"}}`); inside herd they are `ToolCall`s.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: builtin tools called as `name.call(query="...")`
SEARCH_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS = (*SEARCH_TOOLS, CODE_INTERPRETER)
KNOWLEDGE_CUTOFF = "December 2023"

# The reference's pattern for a builtin call, anywhere in the text.
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>]+)>")
_FUNCTION_END = "</function>"


class DialogError(ValueError):
    """A dialog (messages or tool definitions) that cannot be encoded; the message names the
    message and what to change."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        """The OpenAI tool-call dict, arguments as a JSON string."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


# --- tool calls written into a dialog ------------------------------------------------------------


def tool_calls_from_openai(calls: Any, where: str) -> list[ToolCall]:
    """Check and convert a message's OpenAI `tool_calls`; `where` names the message in errors."""
    if not isinstance(calls, list):
        raise DialogError(f"{where}: tool_calls must be a list of {{'function': ...}} dicts")
    return [_tool_call_from_openai(call, f"{where}, tool call {i}") for i, call in enumerate(calls)]


def _tool_call_from_openai(call: Any, where: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise DialogError(
            f"{where}: expected {{'type': 'function', 'function': {{'name': ..., "
            "'arguments': ...}}"
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DialogError(f"{where}: function.name must be a non-empty string")
    arguments = _arguments(function.get("arguments", {}), where)
    _check_builtin_arguments(name, arguments, where)
    call_id = call.get("id")
    return (
        ToolCall(name, arguments, call_id)
        if isinstance(call_id, str)
        else ToolCall(name, arguments)
    )


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DialogError(f"{where}: function.arguments is not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise DialogError(
            f"{where}: function.arguments must be a JSON object (a dict or its JSON text)"
        )
    return arguments


def _check_builtin_arguments(name: str, arguments: dict[str, Any], where: str) -> None:
    key = "code" if name == CODE_INTERPRETER else "query" if name in SEARCH_TOOLS else None
    if key is not None and not isinstance(arguments.get(key), str):
        raise DialogError(f'{where}: the builtin tool {name} takes {{"{key}": <string>}}')


def tool_call_text(call: ToolCall) -> str:
    """The text of a call as the model writes it (after <|python_tag|> for code_interpreter)."""
    if call.name in SEARCH_TOOLS:
        return f'{call.name}.call(query="{call.arguments["query"]}")'
    if call.name == CODE_INTERPRETER:
        return call.arguments["code"]
    # The reference's default (JSON) tool-call format, json.dumps defaults included.
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


# --- tool calls read from generated text ---------------------------------------------------------


def parse_tool_calls(text: str, python_tag: bool) -> list[ToolCall]:
    """The tool calls in generated assistant text, in the formats the reference reads, tried in its
    order: `<function=name>{json}`, a JSON object (or list of them) with a name, a Python list of
    calls `[f(a=1)]`, a builtin `tool.call(query="...")`; else, after <|python_tag|>, the text is
    code for code_interpreter. No format is evaluated as code."""
    calls = _function_tag_calls(text) or _json_calls(text) or _python_list_calls(text)
    if not calls:
        builtin = _BUILTIN_CALL.search(text)
        if builtin:
            calls = [ToolCall(builtin["name"], {"query": builtin["query"]})]
        elif python_tag:
            calls = [ToolCall(CODE_INTERPRETER, {"code": text})]
    return [_builtin_in_custom_format(call) for call in calls]


def _function_tag_calls(text: str) -> list[ToolCall]:
    calls = []
    for tag in _FUNCTION_TAG.finditer(text):
        arguments = _json_object_at(text, tag.end())
        if arguments is not None:
            calls.append(ToolCall(tag["name"], arguments))
    return calls


def _json_object_at(text: str, start: int) -> dict[str, Any] | None:
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        # Like the reference, accept single-quoted pseudo-JSON up to the closing tag.
        end = text.find(_FUNCTION_END, start)
        try:
            value = json.loads(text[start : end if end >= 0 else None].replace("'", '"'))
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _json_calls(text: str) -> list[ToolCall]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    objects = value if isinstance(value, list) else [value]
    calls = [_json_call(obj) for obj in objects]
    return calls if calls and all(calls) else []


def _json_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], arguments) if isinstance(arguments, dict) else None


def _python_list_calls(text: str) -> list[ToolCall]:
    """`[f(a=1, b="x"), g()]`: calls with keyword arguments whose values are literals."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return []
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return []
    calls = []
    for node in tree.body.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return []
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            return []
        if None in arguments:  # **kwargs
            return []
        calls.append(ToolCall(node.func.id, arguments))
    return calls


def _builtin_in_custom_format(call: ToolCall) -> ToolCall:
    """Models sometimes call a search tool in the custom format; the reference keeps its first
    argument as the query."""
    if call.name in SEARCH_TOOLS and "query" not in call.arguments and call.arguments:
        return ToolCall(call.name, {"query": next(iter(call.arguments.values()))}, call.id)
    return call


# --- tool calls streamed as they are generated ---------------------------------------------------

# The start of a JSON call (herd writes "type" first, the reference models often omit it) or of a
# <function=name> call, up to the "{" that opens its arguments.
_JSON_CALL_HEAD = re.compile(
    r'\s*\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"'
    r'\s*,\s*"(?:parameters|arguments)"\s*:\s*(?=\{)'
)
_TAG_CALL_HEAD = re.compile(r"\s*<function=(?P<name>[^>]+)>(?=\{)")
# A builtin call's start, `brave_search.call(`, or as much of it as has been generated;
# group 1 is set once it is whole.
_BUILTIN_CALL_START = re.compile(r"\w*(?:\.(?:c(?:a(?:l(?:l(\()?)?)?)?)?)?")


class ToolCallStream:
    """A reply read as it is generated, as OpenAI's streamed deltas: prose as content pieces, or
    a tool call's id and name as soon as they are read and then its arguments in fragments that
    concatenate to their JSON text (Llama 3.1's JSON calls and `<function=name>{...}` calls).

    A reply that starts like a call ("{", "[", "<", `tool.call(`), or any reply after
    <|python_tag|> (feed the text that follows the tag), is held until it is known to be one; calls in the other
    forms (Python lists, builtin tools, code for code_interpreter) and any calls after the first
    are sent whole by `finish`, which reads the final message as the non-streamed response does.
    A call whose arguments were cut off (max_tokens) stays as sent."""

    def __init__(self, python_tag: bool = False):
        self.text = ""
        self.python_tag = python_tag
        # start -> content | head -> arguments -> after, or hold: everything waits for finish
        self.state = "start"
        self.streamed = 0  # tool calls sent
        self._read = 0  # characters of text consumed
        self._depth, self._in_string, self._escape = 0, False, False

    @property
    def called(self) -> bool:
        return self.streamed > 0

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas that `piece`, the next text of the reply, makes known."""
        self.text += piece
        if self.state == "start":
            stripped = self.text.lstrip()
            if not stripped:
                return []
            builtin = _BUILTIN_CALL_START.match(stripped)
            if builtin.end() == len(stripped) and not builtin[1]:
                return []  # a first word that may yet become `tool.call(`
            if builtin[1] or self.python_tag:
                self.state = "hold"
            elif stripped[0] not in "{[<":
                self.state = "content"
                return [{"content": self.text}]
            self.state = "head"
        if self.state == "content":
            return [{"content": piece}] if piece else []
        deltas = []
        if self.state == "head":
            head = _JSON_CALL_HEAD.match(self.text) or _TAG_CALL_HEAD.match(self.text)
            if head is None:
                return []
            name = head["name"]
            if head.re is _JSON_CALL_HEAD:
                name = json.loads(f'"{name}"')
            call = ToolCall(name, {}).openai() | {"index": 0}
            call["function"]["arguments"] = ""
            deltas.append({"tool_calls": [call]})
            self.state, self._read, self.streamed = "arguments", head.end(), 1
        if self.state == "arguments" and (fragment := self._arguments()):
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
        return deltas

    def _arguments(self) -> str:
        """The new text of the arguments object, up to the brace that closes it."""
        start = end = self._read
        for end in range(start, len(self.text)):
            char = self.text[end]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{}":
                self._depth += 1 if char == "{" else -1
                if self._depth == 0:
                    self.state, self._read = "after", end + 1
                    return self.text[start : end + 1]
        self._read = len(self.text)
        return self.text[start:]

    def finish(self, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The last deltas, from the final assistant `message` (`decode_assistant`'s reading)."""
        calls = message.get("tool_calls") or []
        if self.state in ("start", "head", "hold") and not calls:
            return [{"content": message.get("content") or ""}] if self.text else []
        rest = calls[self.streamed :] if self.called else calls
        first = self.streamed
        self.streamed += len(rest)
        return (
            [{"tool_calls": [call | {"index": first + i} for i, call in enumerate(rest)]}]
            if rest
            else []
        )


# --- the tool system prompt ----------------------------------------------------------------------


def system_prompt(
    builtin_tools: Sequence[str] = (),
    custom_tools: Sequence[Mapping[str, Any]] | None = None,
    date: datetime.date | str | None = None,
    instructions: str = "",
) -> str:
    """The Llama 3.1 system prompt for tool use, as prompt_format.md shows it.

    "Environment: ipython" (which also enables code_interpreter) when any tool is given, the
    "Tools:" line for builtin tools other than code_interpreter, the knowledge cutoff and today's
    date, then `instructions` (the dialog's own system message). The custom tools themselves go
    into a user message (`custom_tools_prompt`).
    """
    unknown = set(builtin_tools) - set(BUILTIN_TOOLS)
    if unknown:
        raise DialogError(
            f"unknown builtin tools {sorted(unknown)}; the builtin tools are {BUILTIN_TOOLS}"
        )
    text = ""
    if builtin_tools or custom_tools:
        text += "Environment: ipython\n"
        listed = [t for t in builtin_tools if t != CODE_INTERPRETER]
        if listed:
            text += "Tools: " + ", ".join(listed)
        text += "\n"
    text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {_date_text(date)}\n"
    if instructions:
        text += f"\n{instructions}\n"
    return text


def _date_text(date: datetime.date | str | None) -> str:
    if isinstance(date, str):
        return date
    return (date or datetime.date.today()).strftime("%d %B %Y")


def custom_tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The user message that lists custom tools for JSON tool calling (prompt_format.md).

    Each tool is an OpenAI function definition (`{"type": "function", "function": {...}}` or the
    bare `{"name", "description", "parameters"}`). As in the reference, every parameter is listed
    with type "object" and its description; types and defaults are not shown to the model.
    """
    blocks = "".join(_tool_json(function_definition(tool)) + "\n" for tool in tools)
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        f"{blocks}\nReturn function calls in JSON format."
    )


def function_definition(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function of an OpenAI tool definition, checked."""
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise DialogError(
            f"a tool definition must be {{'type': 'function', 'function': {{'name': ..., "
            f"'description': ..., 'parameters': <JSON schema>}}}}, got {tool!r:.200}"
        )
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {} if isinstance(parameters, Mapping) else None
    if not isinstance(properties, Mapping) or not all(
        isinstance(spec, Mapping) for spec in properties.values()
    ):
        raise DialogError(
            f"tool {function['name']}: parameters must be a JSON schema object whose "
            "'properties' maps each parameter name to its schema"
        )
    return function


def _tool_json(function: Mapping[str, Any]) -> str:
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = [name for name in properties if name in (parameters.get("required") or ())]
    listed = [
        {name: {"type": "object", "description": spec.get("description", "")}}
        for name, spec in properties.items()
    ]
    # The reference writes "required" on one line inside the indented block.
    marker = "\x00required\x00"
    block = {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": {"type": "object", "properties": listed, "required": marker},
        },
    }
    text = json.dumps(block, indent=4, ensure_ascii=False)
    return text.replace(json.dumps(marker), json.dumps(required, ensure_ascii=False))


def with_tools(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    date: datetime.date | str | None = None,
) -> list[Mapping[str, Any]]:
    """The dialog with tool definitions placed as Llama 3.1 expects them.

    A tool named brave_search, wolfram_alpha, photogen or code_interpreter (as a function name, or
    `{"type": "<name>"}`) is a builtin; others are custom functions. The system message becomes
    `system_prompt(...)` with the dialog's own system text as its instructions, and custom tools
    are listed in a user message right after it (`custom_tools_prompt`).
    """
    builtin, custom = [], []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        name = kind if kind in BUILTIN_TOOLS else function_definition(tool)["name"]
        if name in BUILTIN_TOOLS:
            builtin.append(name)
        else:
            custom.append(tool)
    rest = list(messages)
    instructions = ""
    if rest and isinstance(rest[0], Mapping) and rest[0].get("role") == "system":
        instructions = text_of(rest.pop(0).get("content"), "message 0")
    system = system_prompt(builtin, custom, date, instructions)
    added: list[Mapping[str, Any]] = [{"role": "system", "content": system}]
    if custom:
        added.append({"role": "user", "content": custom_tools_prompt(custom)})
    return added + rest


def text_of(content: Any, where: str) -> str:
    """Message content as one string: a string, or the concatenation of its text parts."""
    return "".join(text_parts(content, where))


def text_parts(content: Any, where: str) -> list[str]:
    """Message content as its text pieces: a string, or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise DialogError(
            f"{where}: content must be a string or a list of {{'type': 'text', 'text': ...}} "
            f"parts, not {type(content).__name__}"
        )
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DialogError(
                f"{where}: content part {i} is {kind!r}; only text parts are supported"
            )
        if not isinstance(part.get("text"), str):
            raise DialogError(f"{where}: content part {i} needs a string 'text'")
        parts.append(part["text"])
    return parts
