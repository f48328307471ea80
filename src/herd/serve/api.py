"""The OpenAI-compatible HTTP API over an `Engine`: /v1/models, /v1/completions,
/v1/chat/completions (with streaming as server-sent events), /health and /metrics.

Request bodies are parsed by hand (strict UTF-8, then JSON, then a strict pydantic schema with
no unknown fields) so that every bad request gets a 400 in OpenAI's error shape that says what
to fix. Model work happens in the engine's thread; handlers only await its events.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from herd.infer import Llama
from herd.infer.sampling import SamplingParams
from herd.serve import engine as eng
from herd.tokenizer.tools import DialogError

MAX_N = 16
MAX_STOPS = 8


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param}}
        body["error"]["code"] = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(
            self.status
        )
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------------- request schemas


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: only max_tokens ends a choice (benchmarks)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop sequences are supported", "stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None


# ---------------------------------------------------------------------------- metrics


class _EngineCollector:
    """Engine counters and gauges, read at scrape time."""

    def __init__(self, engine: eng.Engine):
        self.engine = engine

    def collect(self):
        e, stats = self.engine, self.engine.stats
        counters = {
            "herd_prompt_tokens": ("Prompt tokens submitted.", stats.prompt_tokens),
            "herd_generation_tokens": ("Tokens generated.", stats.generated_tokens),
            "herd_prefix_cached_tokens": (
                "Prompt tokens served from the prefix cache.",
                stats.cached_prompt_tokens,
            ),
            "herd_preemptions": ("Sequences preempted for KV cache space.", stats.preemptions),
            "herd_forward_passes": ("Model forward passes.", stats.steps),
            "herd_batched_sequences": (
                "Sequences summed over forward passes (/ passes = mean batch size).",
                stats.batched_sequences,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        queried = stats.prefix_blocks_queried
        hit_rate = stats.prefix_blocks_hit / queried if queried else 0.0
        gauges = {
            "herd_queue_depth": ("Sequences waiting to start.", e.queue_depth),
            "herd_running_sequences": ("Sequences in the running batch.", e.num_running),
            "herd_batch_size": ("Sequences in the latest forward pass.", stats.last_batch),
            "herd_kv_blocks_free": ("Free KV cache blocks.", e.free_blocks),
            "herd_kv_blocks_total": ("KV cache blocks.", e.total_blocks),
            "herd_prefix_cache_hit_rate": ("Prefix-cache block hits / lookups.", hit_rate),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)


@dataclass
class _Metrics:
    registry: CollectorRegistry
    requests: Counter
    ttft: Histogram
    itl: Histogram
    latency: Histogram

    @classmethod
    def create(cls, engine: eng.Engine) -> _Metrics:
        registry = CollectorRegistry()
        registry.register(_EngineCollector(engine))
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        return cls(
            registry,
            Counter("herd_requests", "HTTP requests.", ["endpoint", "status"], registry=registry),
            Histogram(
                "herd_time_to_first_token_seconds",
                "Arrival to first token.",
                registry=registry,
                buckets=buckets,
            ),
            Histogram(
                "herd_inter_token_latency_seconds",
                "Time between tokens of a choice.",
                registry=registry,
                buckets=buckets,
            ),
            Histogram(
                "herd_request_latency_seconds",
                "Arrival to last token.",
                registry=registry,
                buckets=buckets,
            ),
        )


# ---------------------------------------------------------------------------- the app


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    # LoRA adapters attached to the engine's model: a request's `model` picks one by name
    adapters: dict[str, int] = field(default_factory=dict)

    def adapter_for(self, model: str | None) -> int | None:
        """The adapter a request's `model` names; the base model for its own name or none."""
        if model is None or model == self.model_name:
            return None
        if model in self.adapters:
            return self.adapters[model]
        served = ", ".join([self.model_name, *self.adapters])
        raise ApiError(404, f"model {model!r} is not served here; models: {served}", "model")


def create_app(llama: Llama, engine: eng.Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app. The engine is started on startup and stopped on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="herd", lifespan=lifespan)
    server = _Server(llama, engine, config, _Metrics.create(engine))
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        server.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.get("/health")
    async def health() -> Response:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(
            generate_latest(server.metrics.registry).decode(),
            media_type="text/plain; version=0.0.4",
        )

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server.authorize(request)
        cards = [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "herd"}]
        cards += [
            {"id": name, "object": "model", "created": 0, "owned_by": "herd",
             "parent": config.model_name}
            for name in config.adapters
        ]  # fmt: skip
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.authorize(request)
        body = CompletionBody.model_validate(await _json(request))
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        server.authorize(request)
        body = ChatBody.model_validate(await _json(request))
        return await server.chat(request, body)

    @app.exception_handler(ValidationError)
    async def invalid(request: Request, exc: ValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return await api_error(request, ApiError(400, f"invalid request: {problems}", where))

    return app


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@dataclass
class _Choice:
    text: str = ""
    ids: list[int] | None = None
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


class _Server:
    def __init__(self, llama: Llama, engine: eng.Engine, config: ServerConfig, metrics: _Metrics):
        self.llama, self.engine, self.config, self.metrics = llama, engine, config, metrics
        specials = sorted(llama.tokenizer.special_tokens, key=len, reverse=True)
        self.special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                kind="authentication_error",
            )

    # ------------------------------------------------------------------ endpoints

    async def completions(self, request: Request, body: CompletionBody) -> Response:
        prompts = self._completion_prompts(body.prompt)
        if len(prompts) * body.n > MAX_N:
            raise ApiError(400, f"at most {MAX_N} choices per request (prompts x n)", "n")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        for ids in prompts:
            self._check_length(ids, max_tokens, "max_tokens")
        created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        jobs = [
            self._request(
                f"{rid}-{i}", ids, max_tokens, body, body.logprobs is not None, body.logprobs or 0
            )
            for i, ids in enumerate(prompts)
        ]
        common = {"id": rid, "object": "text_completion", "created": created}
        common["model"] = body.model or self.config.model_name

        def choice_index(job: int, index: int) -> int:
            return job * body.n + index

        if body.stream:

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                async for job, event in self._stream(request, jobs):
                    if not event.text and event.finish_reason is None:
                        continue
                    choice = {
                        "index": choice_index(job, event.index),
                        "text": event.text,
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                    yield common | {"choices": [choice]}
                if body.include_usage():
                    yield common | {"choices": [], "usage": self._usage(jobs)}

            return self._sse(chunks(), "/v1/completions")

        results = await self._collect(jobs)
        choices = []
        for j, result in enumerate(results):
            for i, choice in enumerate(result):
                entry = {"index": choice_index(j, i), "text": choice.text}
                entry["logprobs"] = self._completion_logprobs(choice) if body.logprobs else None
                entry["finish_reason"] = choice.finish_reason
                choices.append(entry)
        self.metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse(common | {"choices": choices, "usage": self._usage(jobs)})

    async def chat(self, request: Request, body: ChatBody) -> Response:
        self._check_messages(body.messages)
        tools = body.tools if body.tool_choice != "none" else None
        try:
            ids = self.llama.chat_format.encode_dialog(
                body.messages, add_generation_prompt=True, tools=tools
            )
        except (DialogError, ValueError, TypeError) as e:
            raise ApiError(400, f"invalid messages: {e}", "messages") from None
        limit = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        if limit is None:
            limit = self.llama.max_seq_len - len(ids)
            param = "messages"
        self._check_length(ids, limit, param)
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        job = self._request(rid, ids, limit, body, body.logprobs, body.top_logprobs)
        common = {"id": rid, "object": "chat.completion", "created": created}
        common["model"] = body.model or self.config.model_name

        if body.stream:
            common["object"] = "chat.completion.chunk"

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for i in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield common | {"choices": [_chunk(i, delta, None)]}
                held: dict[int, list[int]] = {i: [] for i in range(body.n)}
                async for _, event in self._stream(request, [job]):
                    if event.token is not None:
                        held[event.index].append(event.token)
                    if tools:  # tool calls are parsed once the whole reply is known
                        if event.finish_reason is None:
                            continue
                        message = self._assistant(held[event.index], None)
                        delta = {"content": message.get("content")}
                        if "tool_calls" in message:
                            delta = {"tool_calls": _indexed(message["tool_calls"])}
                        reason = "tool_calls" if "tool_calls" in message else event.finish_reason
                        yield common | {"choices": [_chunk(event.index, delta, reason)]}
                        continue
                    if not event.text and event.finish_reason is None:
                        continue
                    delta = {"content": event.text} if event.text else {}
                    choice = _chunk(event.index, delta, event.finish_reason)
                    if body.logprobs and event.token is not None:
                        choice["logprobs"] = {
                            "content": [
                                self._token_logprob(event.token, event.logprob, event.top_logprobs)
                            ]
                        }
                    yield common | {"choices": [choice]}
                if body.include_usage():
                    yield common | {"choices": [], "usage": self._usage([job])}

            return self._sse(chunks(), "/v1/chat/completions")

        [result] = await self._collect([job])
        choices = []
        for i, choice in enumerate(result):
            message = self._assistant(choice.ids or [], choice.text if tools is None else None)
            reason = "tool_calls" if "tool_calls" in message else choice.finish_reason
            entry: dict[str, Any] = {"index": i, "message": message, "finish_reason": reason}
            entry["logprobs"] = self._chat_logprobs(choice) if body.logprobs else None
            choices.append(entry)
        self.metrics.requests.labels("/v1/chat/completions", "200").inc()
        return JSONResponse(common | {"choices": choices, "usage": self._usage([job])})

    # ------------------------------------------------------------------ checks

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.llama.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.llama.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings or token ids", "prompt")
        vocab = self.llama.model.config.vocab_size
        for ids in prompts:
            if not ids:
                raise ApiError(400, "a prompt must have at least one token", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompts

    def _check_messages(self, messages: list[dict[str, Any]]) -> None:
        if self.special_text is None:
            return
        for i, message in enumerate(messages):
            content = message.get("content")
            parts = [content] if isinstance(content, str) else []
            if isinstance(content, list):
                parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
            for part in parts:
                if isinstance(part, str) and (found := self.special_text.search(part)):
                    raise ApiError(
                        400,
                        f"messages[{i}].content contains the special-token text "
                        f"{found.group()!r}, which would let it forge chat structure: remove "
                        "it or escape it",
                        f"messages.{i}.content",
                    )

    def _check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        window = self.llama.max_seq_len
        if len(ids) + max_tokens > window or len(ids) >= window:
            raise ApiError(
                400,
                f"this model's context window is {window} tokens, but {len(ids) + max_tokens} "
                f"were requested ({len(ids)} in the prompt, {max_tokens} to generate): shorten "
                f"the prompt or lower {param}",
                param,
            )

    # ------------------------------------------------------------------ running requests

    def _request(
        self,
        rid: str,
        ids: list[int],
        max_tokens: int,
        body: _Body,
        logprobs: bool,
        top_logprobs: int = 0,
    ) -> _Job:
        adapter = self.config.adapter_for(body.model)
        try:
            params = body.sampling()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        request = eng.Request(
            adapter=adapter,
            id=rid,
            prompt=ids,
            max_tokens=max_tokens,
            params=params,
            n=body.n,
            seed=body.seed,
            stop=body.stops(),
            stop_ids=frozenset() if body.ignore_eos else None,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        return _Job(request, asyncio.get_running_loop(), self.metrics)

    def _submit(self, jobs: list[_Job]) -> None:
        if self.engine.error is not None:
            raise ApiError(503, f"the engine has stopped: {self.engine.error!r}")
        if self.engine.queue_depth + len(jobs) > self.config.max_queue:
            raise ApiError(
                429,
                f"the server is busy ({self.engine.queue_depth} requests waiting, limit "
                f"{self.config.max_queue}): retry later",
                kind="rate_limit_error",
            )
        for job in jobs:
            self.engine.submit(job.request)

    async def _collect(self, jobs: list[_Job]) -> list[list[_Choice]]:
        self._submit(jobs)
        try:
            return [await job.result() for job in jobs]
        except asyncio.CancelledError:
            for job in jobs:
                self.engine.cancel(job.request.id)
            raise

    async def _stream(
        self, request: Request, jobs: list[_Job]
    ) -> AsyncIterator[tuple[int, eng.Event]]:
        self._submit(jobs)
        finished = [False] * len(jobs)
        try:
            for j, job in enumerate(jobs):
                async for event in job.events():
                    yield j, event
                finished[j] = True
        finally:
            for job, done in zip(jobs, finished):
                if not done:  # the client went away: free its blocks now
                    self.engine.cancel(job.request.id)

    def _sse(self, chunks: AsyncIterator[dict[str, Any]], endpoint: str) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
            self.metrics.requests.labels(endpoint, "200").inc()

        return StreamingResponse(body(), media_type="text/event-stream")

    # ------------------------------------------------------------------ response pieces

    def _assistant(self, ids: list[int], text: str | None) -> dict[str, Any]:
        """The reply message: tool calls parsed by the chat format; a stop string's cut text
        wins over the chat format's reading."""
        parsed = self.llama.chat_format.decode_assistant(ids)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.get("content")}
        if parsed.get("tool_calls"):
            message["tool_calls"] = parsed["tool_calls"]
            message["content"] = None
        elif text is not None:
            message["content"] = text
        return message

    def _usage(self, jobs: list[_Job]) -> dict[str, int]:
        prompt = sum(len(job.request.prompt) for job in jobs)
        completion = sum(job.generated for job in jobs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _token_text(self, token: int) -> str:
        return self.llama.tokenizer.decode([token])

    def _token_logprob(
        self, token: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> dict[str, Any]:
        def entry(token: int, logprob: float | None) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return entry(token, logprob) | {"top_logprobs": [entry(t, lp) for t, lp in top or []]}

    def _chat_logprobs(self, choice: _Choice) -> dict[str, Any]:
        rows = zip(choice.ids or [], choice.logprobs or [], choice.top or [])
        return {"content": [self._token_logprob(*row) for row in rows]}

    def _completion_logprobs(self, choice: _Choice) -> dict[str, Any]:
        tokens = [self._token_text(t) for t in choice.ids or []]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": choice.logprobs,
            "top_logprobs": [{self._token_text(t): lp for t, lp in top} for top in choice.top or []]
            or None,
            "text_offset": offsets,
        }


class _Job:
    """One engine request seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, request: eng.Request, loop: asyncio.AbstractEventLoop, metrics: _Metrics):
        self.request, self.metrics = request, metrics
        self.queue: asyncio.Queue[eng.Event] = asyncio.Queue()
        self.generated = 0
        self._last: dict[int, float] = {}
        request.on_event = lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[eng.Event]:
        """Every choice's events, interleaved, until all choices have finished."""
        open_choices = self.request.n
        while open_choices:
            event = await self.queue.get()
            now = time.monotonic()
            if event.token is not None:
                self.generated += 1
                last = self._last.get(event.index)
                if last is None:
                    self.metrics.ttft.observe(now - self.request.arrival)
                else:
                    self.metrics.itl.observe(now - last)
                self._last[event.index] = now
            if event.finish_reason == "error":
                raise ApiError(500, "the engine failed while generating; see the server log")
            if event.finish_reason is not None:
                open_choices -= 1
                self.metrics.latency.observe(now - self.request.arrival)
            yield event

    async def result(self) -> list[_Choice]:
        choices = [_Choice(ids=[], logprobs=[], top=[]) for _ in range(self.request.n)]
        async for event in self.events():
            choice = choices[event.index]
            choice.text += event.text
            if event.token is not None:
                choice.ids.append(event.token)
                if event.logprob is not None:
                    choice.logprobs.append(event.logprob)
                    choice.top.append(event.top_logprobs or [])
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
        return choices


def _chunk(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _indexed(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": i} | call for i, call in enumerate(calls)]
