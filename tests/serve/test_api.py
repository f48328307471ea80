"""A live `herd serve` (the real CLI, SmolLM2, on 127.0.0.1) driven by the official `openai`
client and raw HTTP: greedy answers equal offline `herd.Llama`, 32 concurrent clients get
what each gets alone, bad input gets a 4xx and costs nothing, disconnects free their blocks,
SIGTERM drains and exits 0. Authentication and back-pressure run in-process on a tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import herd
from herd.infer import Llama

WINDOW = 512
MESSAGES = [{"role": "user", "content": "Name three plays by Shakespeare."}]
LINES = [
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
    "To be, or not to be, that is the question:",
    "All the world's a stage, and all the men and women merely players.",
    "If music be the food of love, play on;",
    "The quality of mercy is not strained;",
    "What's in a name? That which we call a rose by any other name would smell as sweet.",
    "Once more unto the breach, dear friends, once more;",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "herd", "serve", "--port", str(port)]
    cmd += ["--max-seq-len", str(WINDOW), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"herd serve exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("herd serve did not come up in 120 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def live() -> tuple[subprocess.Popen, str]:
    """The module's one `herd serve`; the SIGTERM test, last in the file, stops it."""
    proc, url = start_server("--max-batch", "32", "--kv-cache-mib", "64")
    yield proc, url
    if proc.poll() is None:
        assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def server(live) -> str:
    return live[1]


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {seconds} s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm() -> Llama:
    return Llama.load("smollm2", dtype=torch.float32, max_seq_len=WINDOW)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


# --- the openai client ---------------------------------------------------------------------


def test_openai_client_chat(client, llm):
    expected = llm.chat(MESSAGES, max_new_tokens=32, temperature=0)
    reply = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=32, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_openai_client_completions(client, llm):
    prompt = "The capital of France is"
    [expected] = llm.generate(prompt, max_new_tokens=12, temperature=0)
    reply = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=12, temperature=0, logprobs=1
    )
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    [with_logprobs] = llm.generate(prompt, max_new_tokens=12, temperature=0, logprobs=True)
    ours = reply.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(ours, with_logprobs.logprobs)) < 1e-3
    stream = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected.text


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert metric(server, "herd_kv_blocks_total") > 0
    assert metric(server, "herd_generation_tokens_total") > 0
    text = httpx.get(f"{server}/metrics").text
    for name in ("herd_time_to_first_token_seconds", "herd_inter_token_latency_seconds"):
        assert f"{name}_count" in text
    assert re.search(r'herd_requests_total\{endpoint="/v1/chat/completions",status="200"\}', text)


# --- load -------------------------------------------------------------------------------------


def test_32_concurrent_clients_match_one_at_a_time(client, llm, server):
    jobs = [(LINES[i % 8] * (1 + i % 3), 4 + (7 * i) % 29) for i in range(32)]

    def ask(job):
        prompt, max_tokens = job
        reply = client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage

    steps_before = metric(server, "herd_forward_passes_total")
    batched_before = metric(server, "herd_batched_sequences_total")
    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(ask, jobs))
    passes = metric(server, "herd_forward_passes_total") - steps_before
    batched = metric(server, "herd_batched_sequences_total") - batched_before
    assert batched / passes > 2  # the requests really were decoded together
    # Each alone, offline: greedy continuations of the 24 distinct prompts, computed as one
    # batch (test_generate checks a batch equals its prompts one by one); a request with a
    # budget of k tokens gets the first k, or fewer if the model stops.
    prompts = sorted({prompt for prompt, _ in jobs})
    longest = max(max_tokens for _, max_tokens in jobs)
    alone = dict(zip(prompts, llm.generate(prompts, max_new_tokens=longest, temperature=0)))
    for (prompt, max_tokens), (text, reason, usage) in zip(jobs, served):
        ids = alone[prompt].token_ids[:max_tokens]
        stopped = (
            alone[prompt].finish_reason == "stop" and len(alone[prompt].token_ids) <= max_tokens
        )
        assert text == (alone[prompt].text if stopped else llm.tokenizer.decode(ids))
        assert reason == ("stop" if stopped else "length")
        assert usage.completion_tokens == len(ids)
    # a shared prompt's blocks were reused
    assert metric(server, "herd_prefix_cache_hit_rate") > 0


# --- bad input ------------------------------------------------------------------------------

GOOD = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": MESSAGES, "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/completions", b'{"prompt": "Hi", "max_tokens": ', 400, "not valid JSON"),
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", GOOD | {"max_tokens": "lots"}, 400, "max_tokens"),
        ("/v1/completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", GOOD | {"frobnicate": True}, 400, "frobnicate"),
        ("/v1/completions", GOOD | {"max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", GOOD | {"max_tokens": 10**12}, 400, "context window"),
        ("/v1/completions", GOOD | {"n": 1000}, 400, "n"),
        ("/v1/completions", GOOD | {"prompt": "word " * 600}, 400, "context window"),
        ("/v1/completions", GOOD | {"prompt": [10**9]}, 400, "token ids"),
        ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
        ("/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "user"}]}, 400, "messages"),
        (
            "/v1/chat/completions",
            CHAT | {"messages": [{"role": "user", "content": "hi <|im_end|> there"}]},
            400,
            "special-token",
        ),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 99}, 400, "top_logprobs"),
    ],
)
def test_bad_input_gets_a_clear_400_and_the_server_keeps_serving(server, path, body, status, says):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] or says == error["param"], error
    assert error["type"] == "invalid_request_error"
    assert httpx.post(f"{server}/v1/completions", json=GOOD, timeout=60).status_code == 200


def test_disconnect_mid_stream_frees_blocks(server):
    total = metric(server, "herd_kv_blocks_total")
    body = {"prompt": LINES[0], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(server, "herd_kv_blocks_free") < total  # it holds blocks now
    wait_until(lambda: metric(server, "herd_kv_blocks_free") == total, 30, "the blocks")
    assert metric(server, "herd_running_sequences") == 0


# --- in-process: authentication and back-pressure --------------------------------------------


@pytest.fixture
def tiny_app(tmp_path):
    from tests.conftest import hf_llama

    hf_llama(vocab_size=49152).save_pretrained(tmp_path / "tiny")
    model = herd.load_model(tmp_path / "tiny")
    return Llama(model, herd.load_tokenizer("smollm2"), max_seq_len=128)


def test_api_key_is_required_when_set(tiny_app):
    from fastapi.testclient import TestClient

    from herd.serve.api import ServerConfig, create_app
    from herd.serve.engine import Engine

    engine = Engine(tiny_app.model, tiny_app.tokenizer, max_seq_len=128)
    app = create_app(tiny_app, engine, ServerConfig("tiny", api_key="sesame"))
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        wrong = http.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        ok = http.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert http.get("/health").status_code == 200


def test_full_queue_answers_429_at_once(tiny_app):
    from fastapi.testclient import TestClient

    from herd.serve.api import ServerConfig, create_app
    from herd.serve.engine import Engine, Request

    engine = Engine(tiny_app.model, tiny_app.tokenizer, max_seq_len=128)
    app = create_app(tiny_app, engine, ServerConfig("tiny", max_queue=2))
    with TestClient(app) as http:
        engine._stop.set()  # the loop takes nothing more: queued requests stay queued
        engine._inbox.put(None)
        engine._thread.join()
        for rid in ("a", "b"):
            engine.submit(Request(rid, [1, 2], 4))
        start = time.monotonic()
        busy = http.post("/v1/completions", json=GOOD)
        assert busy.status_code == 429 and time.monotonic() - start < 5
        assert busy.json()["error"]["type"] == "rate_limit_error"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
# The custom-tools user message for WEATHER_TOOL, laid out as llama_models/llama3_1/
# prompt_format.md shows JSON tool calling (each parameter listed as an "object").
WEATHER_TOOL_MESSAGE = """Answer the user's question by making use of the following functions if needed.
If none of the function can be used, please say so.
Here is a list of functions in JSON format:
{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": [
                {
                    "city": {
                        "type": "object",
                        "description": "The city's name"
                    }
                }
            ],
            "required": ["city"]
        }
    }
}

Return function calls in JSON format."""


def test_tools_become_llama31_tool_calling(tmp_path, monkeypatch):
    """With the Llama 3 tokenizer, `tools` are written into the prompt as Llama 3.1's JSON tool
    calling: the prompt the server submits is, id for id, what llama-models' ChatFormat encodes
    for prompt_format.md's layout. A tool call the model generates (scripted here: a random
    model would not write one) comes back through the HTTP API as an OpenAI `tool_calls` entry
    equal to llama-models' own parse of those tokens."""
    import datetime

    from fastapi.testclient import TestClient
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat as ReferenceChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as ReferenceTokenizer

    from herd.serve import engine as engine_module
    from herd.serve.api import ServerConfig, create_app
    from herd.serve.engine import Engine
    from herd.tokenizer import llama3
    from tests.conftest import hf_llama

    hf_llama(vocab_size=128256).save_pretrained(tmp_path / "tiny")
    tokenizer = llama3()
    llama = Llama(herd.load_model(tmp_path / "tiny"), tokenizer, max_seq_len=1024)
    reference = ReferenceChatFormat(ReferenceTokenizer.get_instance())
    system = (
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {datetime.date.today():%d %B %Y}\n\nYou are a helpful assistant.\n"
    )
    expected_prompt = reference.encode_dialog_prompt(
        [
            RawMessage(role="system", content=system),
            RawMessage(role="user", content=WEATHER_TOOL_MESSAGE),
            RawMessage(role="user", content="Weather in Paris?"),
        ]
    ).tokens
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    script = reference.tokenizer.encode(call, bos=False, eos=False)
    script.append(reference.tokenizer.special_tokens["<|eot_id|>"])
    parsed = reference.decode_assistant_message(script, StopReason.end_of_turn)

    submitted: list[list[int]] = []
    submit = Engine.submit

    def spy(self, request):
        submitted.append(list(request.prompt))
        submit(self, request)

    generated: list[int] = []

    def scripted(logits, params, generator=None, seen=None, counts=None):
        generated.append(script[len(generated)])
        return torch.tensor(generated[-1:])

    monkeypatch.setattr(Engine, "submit", spy)
    monkeypatch.setattr(engine_module, "sample", scripted)
    engine = Engine(llama.model, tokenizer, max_seq_len=1024, cache_bytes=2**24)
    app = create_app(llama, engine, ServerConfig("tiny"))
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    with TestClient(app) as http:
        body = {"messages": messages, "tools": [WEATHER_TOOL], "max_tokens": 64}
        reply = http.post("/v1/chat/completions", json=body)
        generated.clear()
        streamed = http.post("/v1/chat/completions", json=body | {"stream": True})
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    assert submitted == [expected_prompt, expected_prompt]
    assert reply["usage"]["prompt_tokens"] == len(expected_prompt)
    assert reply["usage"]["completion_tokens"] == len(script)
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    [reference_call] = parsed.tool_calls
    assert tool_call["type"] == "function"
    assert tool_call["function"]["name"] == reference_call.tool_name == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == reference_call.arguments

    # Streamed: OpenAI's incremental form, the id and name first, then argument fragments.
    assert streamed.status_code == 200, streamed.text
    lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    parts = [c["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["delta"]]
    head, fragments = parts[0], parts[1:]
    assert head["index"] == 0 and head["id"] and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert len(fragments) > 2 and all(set(f) == {"index", "function"} for f in fragments)
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert json.loads(arguments) == reference_call.arguments
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["tool_calls"]
    assert not any(c["delta"].get("content") for c in chunks)


# --- last: SIGTERM stops the module's server ---------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_exits_0(live):
    """Runs last: it stops the module's server."""
    proc, url = live
    body = {"prompt": LINES[2], "max_tokens": 48, "temperature": 0, "stream": True}
    chunks: list[str] = []

    def read():
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            chunks.extend(line for line in response.iter_lines() if line)

    reader = threading.Thread(target=read)
    before = metric(url, "herd_generation_tokens_total")
    reader.start()
    wait_until(lambda: metric(url, "herd_generation_tokens_total") > before, 60, "a token")
    assert stop_server(proc) == 0
    reader.join(30)
    assert not reader.is_alive()
    assert chunks[-1] == "data: [DONE]"
    finals = [json.loads(c[6:]) for c in chunks[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
