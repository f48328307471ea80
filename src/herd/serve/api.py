"""The OpenAI-compatible HTTP API over an `Engine`: /v1/models, /v1/completions,
/v1/chat/completions (with streaming as server-sent events), /health and /metrics.

The routes and the request handling; the request and response shapes are herd.serve.schema's,
the metrics herd.serve.metrics'. Model work happens in the engine's thread; handlers only await
its events.
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from pydantic import ValidationError

from herd.infer import Llama
from herd.serve import engine as eng
from herd.serve.metrics import Metrics
from herd.serve.schema import (
    MAX_N,
    ApiError,
    ChatBody,
    CompletionBody,
    RequestBody,
    delta_chunk,
    read_json,
)
from herd.tokenizer.tools import DialogError, ToolCallStream


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
    server = _Server(llama, engine, config, Metrics.create(engine))
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
        body = CompletionBody.model_validate(await read_json(request))
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        server.authorize(request)
        body = ChatBody.model_validate(await read_json(request))
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


@dataclass
class _Choice:
    text: str = ""
    ids: list[int] | None = None
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


class _Server:
    def __init__(self, llama: Llama, engine: eng.Engine, config: ServerConfig, metrics: Metrics):
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
                    yield common | {"choices": [delta_chunk(i, delta, None)]}
                held: dict[int, list[int]] = {i: [] for i in range(body.n)}
                calls: dict[int, ToolCallStream] = {}
                async for _, event in self._stream(request, [job]):
                    if event.token is not None:
                        held[event.index].append(event.token)
                    if tools:
                        for chunk in self._tool_chunks(calls, held, event):
                            yield common | {"choices": [chunk]}
                        continue
                    if not event.text and event.finish_reason is None:
                        continue
                    delta = {"content": event.text} if event.text else {}
                    choice = delta_chunk(event.index, delta, event.finish_reason)
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
        body: RequestBody,
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

    def _tool_chunks(
        self, calls: dict[int, ToolCallStream], held: dict[int, list[int]], event: eng.Event
    ) -> list[dict[str, Any]]:
        """A tools request's choice chunks for one event: content, or tool calls in OpenAI's
        incremental form; the last event's end with the full reply's reading."""
        i = event.index
        tag = self.llama.tokenizer.special_tokens.get("<|python_tag|>")
        opened_by_tag = tag is not None and held[i][:1] == [tag]
        if i not in calls:
            calls[i] = ToolCallStream(python_tag=opened_by_tag)
        tag_itself = opened_by_tag and len(held[i]) == 1 and event.token == tag
        deltas = calls[i].feed("" if tag_itself else event.text or "")
        if event.finish_reason is None:
            return [delta_chunk(i, delta, None) for delta in deltas]
        deltas += calls[i].finish(self._assistant(held[i], None))
        reason = "tool_calls" if calls[i].called else event.finish_reason
        chunks = [delta_chunk(i, delta, None) for delta in deltas[:-1]]
        return [*chunks, delta_chunk(i, deltas[-1] if deltas else {}, reason)]

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

    def __init__(self, request: eng.Request, loop: asyncio.AbstractEventLoop, metrics: Metrics):
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
