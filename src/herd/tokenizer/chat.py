"""Chat formats: dialogs of OpenAI-style messages <-> token ids.

`ChatFormat` is the Llama 3 / 3.1 format (headers, <|eot_id|>/<|eom_id|>, tool calls), token for
token as `llama_models` encodes it. `TemplateChatFormat` renders a checkpoint's own Jinja chat
template (ChatML and the like). `chat_format` picks one for a tokenizer.

Messages are OpenAI-style dicts: `role` (system, user, assistant, tool or ipython), `content` (a
string or a list of `{"type": "text", "text": ...}` parts), and on assistant messages optional
`tool_calls` (OpenAI shape) and `stop_reason`. Message text is always encoded as text: special
token text typed by a user never becomes a special token.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from herd.tokenizer.base import Tokenizer
from herd.tokenizer.tools import (
    CODE_INTERPRETER,
    DialogError,
    ToolCall,
    parse_tool_calls,
    text_parts,
    tool_call_text,
    tool_calls_from_openai,
    with_tools,
)

# Written for herd. Renders the same text as `ChatFormat` for string or text-part content: roles
# system, user, assistant, and tool/ipython as "ipython"; an assistant message with tool calls
# (unless its stop_reason says otherwise) or with stop_reason "end_of_message" ends with
# <|eom_id|>. Tool calls as the reference writes them: brave_search/wolfram_alpha/photogen as
# `name.call(query="...")`, code_interpreter as <|python_tag|> + code, other functions as a JSON
# object. Builtin-call arguments must be a mapping here (Jinja cannot parse JSON text); a custom
# call's JSON-text arguments are inserted as they are. `tools` are placed as `with_tools` places
# them (the "Today Date" is `date_string`, else today). Every tag trims whitespace, so it renders
# the same with or without trim_blocks.
LLAMA3_CHAT_TEMPLATE = r"""
{%- set builtin_tools = ['brave_search', 'wolfram_alpha', 'photogen', 'code_interpreter'] -%}
{%- macro text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro describe(value) -%}
    {{- (value if value is defined and value is not none else '') | tojson -}}
{%- endmacro -%}
{%- macro tool_json(fn) -%}
    {#- The reference's layout: parameters as a list of {name: {"type": "object", ...}}. -#}
    {%- set parameters = fn['parameters'] if fn['parameters'] is defined and fn['parameters']
        else {} -%}
    {%- set properties = parameters['properties'] if parameters['properties'] is defined
        and parameters['properties'] else {} -%}
    {%- set required = parameters['required'] if parameters['required'] is defined
        and parameters['required'] else [] -%}
    {%- set ns = namespace(required=[]) -%}
    {{- '{\n    "type": "function",\n    "function": {\n        "name": ' ~ (fn['name'] | tojson)
        ~ ',\n        "description": ' ~ describe(fn['description'])
        ~ ',\n        "parameters": {\n            "type": "object",\n            "properties": ' -}}
    {%- if properties -%}
        {{- '[' -}}
        {%- for name, spec in properties.items() -%}
            {%- if name in required -%}
                {%- set ns.required = ns.required + [name] -%}
            {%- endif -%}
            {{- '\n                {\n                    ' ~ (name | tojson)
                ~ ': {\n                        "type": "object",\n                        '
                ~ '"description": ' ~ describe(spec['description'])
                ~ '\n                    }\n                }' ~ ('' if loop.last else ',') -}}
        {%- endfor -%}
        {{- '\n            ]' -}}
    {%- else -%}
        {{- '[]' -}}
    {%- endif -%}
    {{- ',\n            "required": ' ~ (ns.required | tojson) ~ '\n        }\n    }\n}' -}}
{%- endmacro -%}
{{- bos_token -}}
{%- set dialog = messages -%}
{%- if tools -%}
    {%- set ns = namespace(listed=[], custom=[], instructions='') -%}
    {%- for tool in tools -%}
        {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
        {%- set name = tool['type'] if tool['type'] in builtin_tools else fn['name'] -%}
        {%- if name not in builtin_tools -%}
            {%- set ns.custom = ns.custom + [fn] -%}
        {%- elif name != 'code_interpreter' -%}
            {%- set ns.listed = ns.listed + [name] -%}
        {%- endif -%}
    {%- endfor -%}
    {%- if messages and messages[0]['role'] == 'system' -%}
        {%- set ns.instructions = text(messages[0]['content']) -%}
        {%- set dialog = messages[1:] -%}
    {%- endif -%}
    {{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n' -}}
    {%- if ns.listed -%}
        {{- 'Tools: ' ~ (ns.listed | join(', ')) -}}
    {%- endif -%}
    {{- '\nCutting Knowledge Date: December 2023\nToday Date: '
        ~ (date_string if date_string is defined else strftime_now('%d %B %Y')) ~ '\n' -}}
    {%- if ns.instructions -%}
        {{- '\n' ~ ns.instructions ~ '\n' -}}
    {%- endif -%}
    {{- '<|eot_id|>' -}}
    {%- if ns.custom -%}
        {{- '<|start_header_id|>user<|end_header_id|>\n\n'
            ~ "Answer the user's question by making use of the following functions if needed.\n"
            ~ 'If none of the function can be used, please say so.\n'
            ~ 'Here is a list of functions in JSON format:\n' -}}
        {%- for fn in ns.custom -%}
            {{- tool_json(fn) ~ '\n' -}}
        {%- endfor -%}
        {{- '\nReturn function calls in JSON format.<|eot_id|>' -}}
    {%- endif -%}
{%- endif -%}
{%- for message in dialog -%}
    {%- set role = message['role'] -%}
    {%- if role not in ['system', 'user', 'assistant', 'tool', 'ipython'] -%}
        {{- raise_exception('unknown role ' ~ role ~ '; use system, user, assistant or tool') -}}
    {%- endif -%}
    {%- set calls = message['tool_calls'] if role == 'assistant'
        and message['tool_calls'] is defined and message['tool_calls'] else [] -%}
    {{- '<|start_header_id|>' ~ ('ipython' if role in ['tool', 'ipython'] else role)
        ~ '<|end_header_id|>\n\n' -}}
    {%- if calls -%}
        {%- set first = calls[0]['function'] if calls[0]['function'] is defined else calls[0] -%}
        {%- if first['name'] == 'code_interpreter' -%}
            {{- '<|python_tag|>' -}}
        {%- endif -%}
    {%- endif -%}
    {{- text(message['content']) -}}
    {%- for call in calls -%}
        {%- set fn = call['function'] if call['function'] is defined else call -%}
        {%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}
        {%- if fn['name'] in builtin_tools and args is not mapping -%}
            {{- raise_exception('pass the arguments of a ' ~ fn['name'] ~ ' call as a mapping') -}}
        {%- elif fn['name'] == 'code_interpreter' -%}
            {{- args['code'] -}}
        {%- elif fn['name'] in builtin_tools -%}
            {{- fn['name'] ~ '.call(query="' ~ args['query'] ~ '")' -}}
        {%- else -%}
            {{- '{"type": "function", "name": ' ~ (fn['name'] | tojson) ~ ', "parameters": '
                ~ (args if args is string else args | tojson) ~ '}' -}}
        {%- endif -%}
    {%- endfor -%}
    {%- if role == 'assistant' and (message['stop_reason'] == 'end_of_message'
        or (calls and not message['stop_reason'])) -%}
        {{- '<|eom_id|>' -}}
    {%- else -%}
        {{- '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

ROLES = ("system", "user", "assistant", "tool", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
# The specials that make a vocabulary speak the Llama 3 dialog format.
LLAMA3_MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class EncodedDialog(NamedTuple):
    """Token ids and, per id, whether it is assistant output (the tokens SFT trains on)."""

    ids: list[int]
    mask: list[bool]


class _Pieces:
    """Builds an `EncodedDialog` piece by piece."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[bool] = []

    def add(self, ids: Sequence[int], trained: bool) -> None:
        self.ids.extend(ids)
        self.mask.extend([trained] * len(ids))

    def result(self, return_mask: bool) -> list[int] | EncodedDialog:
        return EncodedDialog(self.ids, self.mask) if return_mask else self.ids


# --- Llama 3 ----------------------------------------------------------------------------------


class _Message(NamedTuple):
    role: str
    texts: list[str]
    tool_calls: list[ToolCall]
    end_of_message: bool


def _parse_dialog(messages: Sequence[Mapping[str, Any]]) -> list[_Message]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise DialogError(
            f"messages must be a list of message dicts, not {type(messages).__name__}"
        )
    return [_parse_message(message, i) for i, message in enumerate(messages)]


def _parse_message(message: Any, index: int) -> _Message:
    if not isinstance(message, Mapping):
        raise DialogError(
            f"message {index}: expected a dict with 'role' and 'content', "
            f"not {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise DialogError(
            f"message {index}: unknown role {role!r}; use system, user, assistant or tool (ipython)"
        )
    where = f"message {index} ({role})"
    calls: list[ToolCall] = []
    if message.get("tool_calls") is not None:  # OpenAI clients send null for none
        if role != "assistant":
            raise DialogError(f"{where}: only assistant messages carry tool_calls")
        calls = tool_calls_from_openai(message["tool_calls"], where)
    content = message.get("content")
    if content is None and not calls:
        raise DialogError(f"{where}: no content; give a string (it may be empty) or text parts")
    texts = [] if content is None else text_parts(content, where)
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise DialogError(f"{where}: stop_reason {stop_reason!r} is not one of {STOP_REASONS}")
    # Llama 3.1: a message that calls a tool ends with <|eom_id|> (the model waits for the
    # result); an explicit stop_reason, e.g. from `decode_assistant`, says what the model did.
    eom = role == "assistant" and (
        stop_reason == "end_of_message" if stop_reason is not None else bool(calls)
    )
    return _Message(role, texts, calls, eom)


def _assistant_message(content: str, calls: list[ToolCall], stop_reason: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else content}
    if calls:
        message["tool_calls"] = [call.openai() for call in calls]
    message["stop_reason"] = stop_reason
    return message


class ChatFormat:
    """The Llama 3 / 3.1 dialog format, token for token as `llama_models` encodes it.

    Each message is `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` after one
    `<|begin_of_text|>`, with the tool role written as "ipython". An assistant message writes its
    tool calls after its content; a code_interpreter call starts with <|python_tag|>. The pieces
    (role, "\\n\\n", each text part, each tool call) are tokenized separately, as the reference
    does, so a content that starts with whitespace tokenizes differently from the rendered string.
    """

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in LLAMA3_MARKERS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"not a Llama 3 vocabulary (no {', '.join(missing)}); use TemplateChatFormat "
                "or chat_format(tokenizer)"
            )
        self.tokenizer = tokenizer
        self._headers: dict[str, list[int]] = {}

    def _special(self, text: str) -> int:
        token_id = self.tokenizer.special_tokens.get(text)
        if token_id is None:  # Llama 3.0 vocabularies leave these reserved
            raise DialogError(f"this vocabulary has no {text} token; tool calls need Llama 3.1's")
        return token_id

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n`, the tool role as "ipython"."""
        if role not in self._headers:
            special = self.tokenizer.special_tokens
            self._headers[role] = [
                special["<|start_header_id|>"],
                *self.tokenizer.encode("ipython" if role == "tool" else role),
                special["<|end_header_id|>"],
                *self.tokenizer.encode("\n\n"),
            ]
        return self._headers[role]

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        date: datetime.date | str | None = None,
        return_mask: bool = False,
    ) -> list[int] | EncodedDialog:
        """Token ids of a dialog.

        Args:
            messages: OpenAI-style message dicts (see the module docstring).
            add_generation_prompt: end with an open assistant header for the model to complete.
            tools: OpenAI tool definitions. They become the Llama 3.1 tool system prompt (the
                dialog's system message becomes its instructions) and, for custom functions, a
                user message listing them right after it; see `tools.with_tools`.
            date: "Today Date" of the tool system prompt (default: today).
            return_mask: return an `EncodedDialog` whose mask marks assistant output: content,
                tool calls, <|python_tag|> and the closing <|eot_id|>/<|eom_id|>, not headers.
        """
        dialog = _parse_dialog(messages)  # first, so that errors name the caller's indices
        if tools:
            dialog = _parse_dialog(with_tools(messages, tools, date))
        pieces = _Pieces()
        pieces.add([self.tokenizer.special_tokens["<|begin_of_text|>"]], trained=False)
        for message in dialog:
            self._encode_message(message, pieces)
        if add_generation_prompt:
            pieces.add(self.header("assistant"), trained=False)
        return pieces.result(return_mask)

    def _encode_message(self, message: _Message, pieces: _Pieces) -> None:
        pieces.add(self.header(message.role), trained=False)
        trained = message.role == "assistant"
        if message.tool_calls and message.tool_calls[0].name == CODE_INTERPRETER:
            pieces.add([self._special("<|python_tag|>")], trained)
        for text in [*message.texts, *map(tool_call_text, message.tool_calls)]:
            pieces.add(self.tokenizer.encode(text), trained)
        end = "<|eom_id|>" if message.end_of_message else "<|eot_id|>"
        pieces.add([self._special(end)], trained)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        date: datetime.date | str | None = None,
    ) -> str:
        """The dialog as text, special tokens included."""
        ids = self.encode_dialog(messages, add_generation_prompt, tools=tools, date=date)
        return self.tokenizer.decode(ids)

    def decode_assistant(self, ids: Sequence[int]) -> dict[str, Any]:
        """The assistant message in generated ids (those after the assistant header).

        Returns `{"role": "assistant", "content", "tool_calls" (only when there are calls; then
        content is None), "stop_reason"}`. stop_reason is "end_of_turn" (<|eot_id|> or
        <|end_of_text|>), "end_of_message" (<|eom_id|>: the model waits for a tool result) or
        "out_of_tokens" (no stop token). Ids after the first stop token are ignored.
        """
        special = self.tokenizer.special_tokens
        ids = list(ids)
        header = self.header("assistant")
        if ids[: len(header)] == header:  # the reference accepts a repeated header
            ids = ids[len(header) :]
        ends = {
            special.get("<|eot_id|>"): "end_of_turn",
            special.get("<|end_of_text|>"): "end_of_turn",
        }
        ends[special.get("<|eom_id|>")] = "end_of_message"
        stop_reason = "out_of_tokens"
        for i, token_id in enumerate(ids):
            if token_id in ends:
                ids, stop_reason = ids[:i], ends[token_id]
                break
        python_tag = bool(ids) and ids[0] == special.get("<|python_tag|>")
        content = self.tokenizer.decode(ids[1:] if python_tag else ids).strip(" ")
        return _assistant_message(content, parse_tool_calls(content, python_tag), stop_reason)


# --- checkpoint chat templates -----------------------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it) renders
    its body; herd finds assistant text by its content instead."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(Namespace):
    """`namespace()` without underscore attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_attribute(name)
        Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attribute(name)
        Namespace.__setitem__(self, name, value)


def _check_attribute(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a chat template cannot set the attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own filter escapes HTML characters and sorts keys; templates expect json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def template_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox for untrusted chat templates with what transformers gives them: trim_blocks and
    lstrip_blocks, loop controls, `{% generation %}`, `raise_exception`, `strftime_now` and a
    json.dumps `tojson`."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace
    )
    return environment


class _Skeleton(NamedTuple):
    """A rendering split into template text (content index None) and message contents."""

    pieces: list[tuple[str, int | None]]
    #: per content index: the text and whether it is an assistant message's
    contents: list[tuple[str, bool]]


def _with_sentinels(
    messages: Sequence[Mapping[str, Any]], sentinel: str
) -> tuple[list[dict[str, Any]], list[tuple[str, bool]]]:
    """Copies of the messages with each content text replaced by `sentinel.format(index)`."""
    contents: list[tuple[str, bool]] = []

    def placeholder(text: str, assistant: bool) -> str:
        contents.append((text, assistant))
        return sentinel.format(len(contents) - 1)

    replaced = []
    for message in messages:
        message = dict(message)
        assistant = message.get("role") == "assistant"
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = placeholder(content, assistant)
        elif isinstance(content, list):
            message["content"] = [
                {**part, "text": placeholder(part["text"], assistant)}
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                else part
                for part in content
            ]
        replaced.append(message)
    return replaced, contents


def _strings(value: Any) -> list[str]:
    """Every string inside nested dicts and lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for key, item in value.items() for s in (*_strings(key), *_strings(item))]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


class TemplateChatFormat:
    """A checkpoint's own Jinja chat template (e.g. SmolLM2's ChatML), rendered in a sandbox as
    transformers renders it.

    Encoding matches transformers' `apply_chat_template(tokenize=True)` when no message contains
    special-token text. When one does, the contents are tokenized as text and the template's own
    markup with its special tokens, so a user cannot inject a turn.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        template = template if template is not None else tokenizer.chat_template
        if not template:
            raise ValueError(
                "this tokenizer has no chat template; pass template=<Jinja chat template> or "
                "encode plain text"
            )
        self.tokenizer = tokenizer
        self.template = template
        self._compiled = template_environment().from_string(template)
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._stop_ids = {
            *tokenizer.stop_ids,
            *(() if tokenizer.eos_id is None else [tokenizer.eos_id]),
        }

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.decode([token_id])

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The rendered dialog. `variables` are passed to the template (e.g. a date string)."""
        _check_template_messages(messages)
        return self._render(messages, add_generation_prompt, tools, variables)

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        variables: Mapping[str, Any],
    ) -> str:
        context = {
            "bos_token": self._token_text(self.tokenizer.bos_id),
            "eos_token": self._token_text(self.tokenizer.eos_id),
            **variables,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled.render(context)
        except TemplateError as e:
            raise DialogError(f"the chat template rejected the dialog: {e}") from e

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        return_mask: bool = False,
        **variables: Any,
    ) -> list[int] | EncodedDialog:
        """Token ids of the rendered dialog; with `return_mask`, an `EncodedDialog` whose mask
        marks the assistant messages' content and the stop token the template puts right after
        it (tool calls that the template writes from `tool_calls` are not marked)."""
        rendered = self.render(messages, add_generation_prompt, tools=tools, **variables)
        self._check_other_strings(messages, tools)
        injected = self._has_special_text(messages)
        if not injected and not return_mask:
            return self.tokenizer.encode(rendered, special=True)
        skeleton = self._skeleton(messages, rendered, add_generation_prompt, tools, variables)
        if not injected and self.tokenizer.byte_level:
            ids = self.tokenizer.encode(rendered, special=True)
            mask = self._mask_by_offsets(ids, skeleton)
            if mask is not None:
                return EncodedDialog(ids, mask)
        return self._encode_pieces(skeleton).result(return_mask)

    def _has_special_text(self, messages: Sequence[Mapping[str, Any]]) -> bool:
        if self._special_text is None:
            return False
        _, contents = _with_sentinels(messages, "")
        return any(self._special_text.search(text) for text, _ in contents)

    def _skeleton(
        self,
        messages: Sequence[Mapping[str, Any]],
        rendered: str,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        variables: Mapping[str, Any],
    ) -> _Skeleton:
        """The rendering with each content replaced by a unique placeholder, split there; it must
        give back `rendered` with the contents put back."""
        nonce = uuid.uuid4().hex[:12]
        replaced, contents = _with_sentinels(messages, f"\ue000{nonce}:{{}}\ue001")
        text = self._render(replaced, add_generation_prompt, tools, variables)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        pieces = [(part, None if i % 2 == 0 else int(part)) for i, part in enumerate(parts)]
        pieces = [
            (text, None) if index is None else (contents[index][0], index) for text, index in pieces
        ]
        if "".join(text for text, _ in pieces) != rendered:
            raise DialogError(
                "the chat template changes or inspects message contents (e.g. trims them), so "
                "herd cannot tell template text from content: remove special-token text and "
                "leading/trailing whitespace from the contents, or do not ask for a mask"
            )
        # Empty contents stay: an empty assistant message still trains its stop token.
        return _Skeleton([p for p in pieces if p[0] or p[1] is not None], contents)

    def _check_other_strings(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> None:
        # Only contents are kept as text; special text elsewhere would become special tokens.
        if self._special_text is None:
            return
        replaced, _ = _with_sentinels(messages, "")
        for where, value in (("messages", replaced), ("tools", tools)):
            found = next(filter(self._special_text.search, _strings(value)), None)
            if found is not None:
                raise DialogError(
                    f"special-token text in {where} outside message contents ({found!r:.80}) "
                    "would become special tokens; remove it"
                )

    def _encode_pieces(self, skeleton: _Skeleton) -> _Pieces:
        """Template text with special tokens, contents as text."""
        pieces = _Pieces()
        after_assistant = False
        for text, index in skeleton.pieces:
            if index is None:
                ids = self.tokenizer.encode(text, special=True)
                stop = after_assistant and bool(ids) and ids[0] in self._stop_ids
                pieces.add(ids[:stop], trained=True)
                pieces.add(ids[stop:], trained=False)
                after_assistant = False
            else:
                assistant = skeleton.contents[index][1]
                pieces.add(self.tokenizer.encode(text), trained=assistant)
                after_assistant = assistant
        return pieces

    def _mask_by_offsets(self, ids: list[int], skeleton: _Skeleton) -> list[bool] | None:
        """Mask of `ids` (the whole rendering tokenized at once) from the tokens' byte offsets:
        a token is trained on if it overlaps an assistant content or is a stop token right after
        one. None if the tokens' bytes do not add up to the rendering."""
        spans, position = [], 0
        for text, index in skeleton.pieces:
            size = len(text.encode("utf-8"))
            if index is not None and skeleton.contents[index][1]:
                spans.append((position, position + size))
            position += size
        mask, start = [], 0
        for token_id in ids:
            end = start + len(self.tokenizer.token_bytes(token_id))
            overlaps = any(a < end and start < b for a, b in spans if a < b)
            stop = token_id in self._stop_ids and any(b == start for _, b in spans)
            mask.append(overlaps or stop)
            start = end
        return mask if start == position else None

    def decode_assistant(self, ids: Sequence[int]) -> dict[str, Any]:
        """`{"role": "assistant", "content", "stop_reason"}` of generated ids: "end_of_turn" at
        the first stop token (later ids are ignored), else "out_of_tokens"."""
        ids = list(ids)
        stop_reason = "out_of_tokens"
        for i, token_id in enumerate(ids):
            if token_id in self._stop_ids:
                ids, stop_reason = ids[:i], "end_of_turn"
                break
        return _assistant_message(self.tokenizer.decode(ids), [], stop_reason)


def _check_template_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise DialogError(
            f"messages must be a list of message dicts, not {type(messages).__name__}"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise DialogError(
                f"message {index}: expected a dict with a string 'role' and 'content'"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            text_parts(content, f"message {index} ({message['role']})")


def chat_format(tokenizer: Tokenizer) -> ChatFormat | TemplateChatFormat:
    """The chat format of a tokenizer: Llama 3's when the vocabulary has its header and end-of-turn
    tokens, else the tokenizer's own chat template."""
    if all(token in tokenizer.special_tokens for token in LLAMA3_MARKERS):
        return ChatFormat(tokenizer)
    if tokenizer.chat_template:
        return TemplateChatFormat(tokenizer)
    raise ValueError(
        "this tokenizer has neither the Llama 3 chat tokens nor a chat template; pass "
        "TemplateChatFormat(tokenizer, template=...) a Jinja chat template"
    )
