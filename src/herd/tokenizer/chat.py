"""Chat formats: dialogs of OpenAI-style messages <-> token ids.

`ChatFormat` is the Llama 3 / 3.1 format (headers, <|eot_id|>/<|eom_id|>, tool calls), token for
token as `llama_models` encodes it. `TemplateChatFormat` renders a checkpoint's own Jinja chat
template (ChatML and the like). `chat_format` picks one for a tokenizer.
"""

from __future__ import annotations

# Written for herd (not Meta's template). It renders the same text as `ChatFormat` for string or
# text-part content: roles system, user, assistant, and tool/ipython as "ipython"; an assistant
# message with tool calls, or with stop_reason "end_of_message", ends with <|eom_id|>. Tool calls
# follow the reference: brave_search/wolfram_alpha/photogen as `name.call(query="...")`,
# code_interpreter as <|python_tag|> + code, other functions as a JSON object. Builtin-call
# arguments must be a mapping here (Jinja cannot parse a JSON string); a custom call's JSON-string
# arguments are inserted as they are. It does not add a tool system prompt: pass the messages
# that `with_tools` returns for that.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- set role = message['role'] -%}\n"
    "{%- if role not in ['system', 'user', 'assistant', 'tool', 'ipython'] -%}\n"
    "{{- raise_exception('unknown role ' ~ role ~ '; use system, user, assistant or tool') -}}\n"
    "{%- endif -%}\n"
    "{%- set calls = message['tool_calls'] if role == 'assistant' and message['tool_calls'] is "
    "defined and message['tool_calls'] else [] -%}\n"
    "{{- '<|start_header_id|>' ~ ('ipython' if role in ['tool', 'ipython'] else role) "
    "~ '<|end_header_id|>\\n\\n' -}}\n"
    "{%- if calls -%}\n"
    "{%- set first = calls[0]['function'] if calls[0]['function'] is defined else calls[0] -%}\n"
    "{%- if first['name'] == 'code_interpreter' -%}{{- '<|python_tag|>' -}}{%- endif -%}\n"
    "{%- endif -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] is iterable -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- for call in calls -%}\n"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}\n"
    "{%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}\n"
    "{%- if fn['name'] in ['brave_search', 'wolfram_alpha', 'photogen', 'code_interpreter'] "
    "and args is not mapping -%}\n"
    "{{- raise_exception('pass the arguments of a ' ~ fn['name'] ~ ' call as a mapping') -}}\n"
    "{%- elif fn['name'] in ['brave_search', 'wolfram_alpha', 'photogen'] -%}\n"
    "{{- fn['name'] ~ '.call(query=\"' ~ args['query'] ~ '\")' -}}\n"
    "{%- elif fn['name'] == 'code_interpreter' -%}\n"
    "{{- args['code'] -}}\n"
    "{%- else -%}\n"
    "{{- '{\"type\": \"function\", \"name\": ' ~ (fn['name'] | tojson) ~ ', \"parameters\": ' "
    "~ (args if args is string else args | tojson) ~ '}' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if role == 'assistant' and (message['stop_reason'] == 'end_of_message' "
    "or (calls and not message['stop_reason'])) -%}\n"
    "{{- '<|eom_id|>' -}}\n"
    "{%- else -%}\n"
    "{{- '<|eot_id|>' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "{%- endif -%}\n"
)
