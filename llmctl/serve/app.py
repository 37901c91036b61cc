"""The OpenAI-compatible HTTP API over the continuous-batching scheduler (a Starlette ASGI app).

    app = build_app(ServeState(loaded, scheduler, model_id="sft:v0001", api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream, n, stop,
max_tokens / max_completion_tokens, temperature, top_p, seed, logprobs / top_logprobs, usage),
GET /health, GET /metrics. Every error is OpenAI's JSON shape with the right status: 400 for an
invalid field (named in `param`) or a prompt longer than the context, 401 for a missing or wrong
key, 404 for an unknown model or path, 413 for a body over `max_body_bytes`, 429 when `max_queue`
requests already wait, 503 while draining for shutdown. Nothing a client sends yields a 500.

Chat prompts are rendered by the model folder's own chat template through the same
`FolderTokenizer.encode_chat` that `llmctl chat`, sft and grpo use. Each request's tokens go
through the scheduler (one thread) and come back to the event loop through an asyncio queue; a
client that disconnects cancels its request, which frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmctl.errors import InputError
from llmctl.model.engine import SamplingParams
from llmctl.model.scheduler import RowEvent, Scheduler
from llmctl.serve.metrics import Metrics
from llmctl.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)


@dataclass
class ServeState:
    loaded: Any  # llmctl.inference.LoadedModel: engine, tokenizer, config
    scheduler: Scheduler
    model_id: str
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def max_seq_len(self) -> int:
        return self.loaded.config.max_seq_len


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ---- request checks ------------------------------------------------------------------------------


def authorize(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(
            401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
        )


async def read_json(state: ServeState, request: Request) -> dict[str, Any]:
    """The body as a JSON object, refusing one over max_body_bytes before reading it all."""
    limit = state.max_body_bytes
    too_big = ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        data = orjson.loads(b"".join(chunks))  # invalid UTF-8 and nesting over 1024 levels fail here
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def parse(model: type, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def sampling_params(
    state: ServeState, req: Any, prompt_len: int, prompt_field: str, logprobs: bool
) -> SamplingParams:
    """The engine's SamplingParams for a request, after checking it fits the context."""
    room = state.max_seq_len - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; the model's context is {state.max_seq_len}",
            param=prompt_field,
            code="context_length_exceeded",
        )
    limit = req.limit if req.limit is not None else room
    if limit > room:
        raise ApiError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({limit}) exceeds the model's context of "
            f"{state.max_seq_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    seed = None if req.seed is None else req.seed % (1 << 63)
    return SamplingParams(
        max_new_tokens=limit,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        stop_token_ids=state.loaded.stop_token_ids(),
        stop_strings=req.stop_strings(),
        seed=seed,
        logprobs=logprobs,
    )


def check_model(state: ServeState, name: str) -> None:
    if name != state.model_id:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {state.model_id!r}",
            param="model",
            code="model_not_found",
        )


# ---- generation -----------------------------------------------------------------------------------


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: RowEvent) -> None:
        self.texts.append(ev.text)
        if ev.token is not None:
            self.tokens.append(ev.token)
            if ev.logprob is not None:
                self.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
        self.finish_reason = ev.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Generation:
    """Every (prompt, sample) of one HTTP request, submitted to the scheduler; events come back as
    (choice index, RowEvent) through an asyncio queue. Cancel on exit if anything is unfinished."""

    def __init__(self, state: ServeState, prompts: list[list[int]], params: SamplingParams, n: int, top: int):
        self.state, self.prompts, self.n = state, prompts, n
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.handles = []
        if state.scheduler.queue_length >= state.max_queue:
            raise ApiError(
                429, f"the queue is full ({state.max_queue} requests wait); retry later", code="queue_full"
            )
        for j, prompt in enumerate(prompts):
            try:
                self.handles.append(
                    state.scheduler.submit(
                        prompt, params, n=n, top_logprobs=top, on_event=lambda ev, j=j: self._put(j, ev)
                    )
                )
            except InputError as e:
                self.cancel()
                raise ApiError(400, e.message, param="n" if "rows" in e.message else None) from None
        self.left = len(prompts) * n
        state.metrics.prompt_tokens += sum(len(p) for p in prompts)

    def _put(self, j: int, ev: RowEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (j, ev))

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, RowEvent]]:
        metrics, last_at = self.state.metrics, {}
        first = True
        try:
            while self.left:
                j, ev = await self.queue.get()
                if isinstance(ev, BaseException):
                    raise ApiError(500, f"generation failed: {type(ev).__name__}: {ev}", code="engine_error")
                now, index = time.perf_counter(), j * self.n + ev.index
                with metrics.lock:
                    if first:
                        metrics.ttft.observe(now - self.arrived)
                        first = False
                    elif index in last_at:
                        metrics.itl.observe(now - last_at[index])
                last_at[index] = now
                if ev.finish_reason:
                    self.left -= 1
                yield index, ev
        finally:
            if self.left:
                self.cancel()


async def watch_disconnect(request: Request, generation: Generation) -> None:
    """For a non-streamed answer: a client that goes away cancels its generation."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


async def collect(request: Request, generation: Generation, count: int) -> list[ChoiceState]:
    choices = [ChoiceState(i) for i in range(count)]
    watcher = asyncio.create_task(watch_disconnect(request, generation))
    try:
        async for index, ev in generation.events():
            choices[index].add(ev)
    finally:
        watcher.cancel()
    return choices


def usage(prompts: list[list[int]], choices: list[ChoiceState]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


# ---- the app --------------------------------------------------------------------------------------


class Api:
    def __init__(self, state: ServeState):
        self.state = state
        tokenizer = state.loaded.tokenizer
        self._token_text = lambda t: tokenizer.decode([t], skip_special_tokens=False)

    def endpoint(self, path: str, handler: Callable[[Request], Awaitable[Response]], *, guarded: bool = True):
        """A route whose ApiErrors become JSON answers, counted in /metrics by status."""

        async def run(request: Request) -> Response:
            try:
                if self.state.draining:
                    raise ApiError(503, "the server is shutting down", code="shutting_down")
                if guarded:
                    authorize(self.state, request)
                response = await handler(request)
            except ApiError as err:
                response = error_response(err)
            self.state.metrics.request_done(path, response.status_code)
            return response

        return run

    # -- simple endpoints --

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        s = self.state.scheduler
        text = self.state.metrics.render(s.queue_length, s.stats.running_rows, s.stats.generated_tokens)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.state.model_id,
            "object": "model",
            "created": self.state.created,
            "owned_by": "llmctl",
            "max_model_len": self.state.max_seq_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    # -- logprobs in the two formats --

    def chat_logprobs(self, c: ChoiceState) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in c.logprobs
            ]
        }

    def completion_logprobs(self, c: ChoiceState, offset: int = 0) -> dict[str, Any]:
        tokens = [self._token_text(t) for t, _, _ in c.logprobs]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [max(lp, -9999.0) for _, lp, _ in c.logprobs],
            "top_logprobs": [
                {self._token_text(i): max(v, -9999.0) for i, v in top} for _, _, top in c.logprobs
            ],
            "text_offset": offsets,
        }

    # -- chat --

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(self.state, request))
        check_model(self.state, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = list(self.state.loaded.tok.encode_chat(messages))
        except InputError as e:
            raise ApiError(400, e.message, param="messages") from None
        params = sampling_params(self.state, req, len(prompt), "messages", req.logprobs)
        generation = Generation(self.state, [prompt], params, req.n, req.top_logprobs or 0)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": req.model}
        if req.stream:
            return self._stream(self._chat_chunks(req, generation, head, prompt))
        choices = await collect(request, generation, req.n)
        body = {
            **head,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.chat_logprobs(c) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                    **({"token_ids": c.tokens} if req.return_token_ids else {}),
                }
                for c in choices
            ],
            "usage": usage([prompt], choices),
            **({"prompt_token_ids": prompt} if req.return_token_ids else {}),
        }
        return JSONResponse(body)

    async def _chat_chunks(
        self, req: ChatCompletionRequest, generation: Generation, head: dict, prompt: list[int]
    ) -> AsyncIterator[bytes]:
        head = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if req.include_usage else {}
        choices = [ChoiceState(i) for i in range(req.n)]
        for c in choices:
            delta = {"role": "assistant", "content": ""}
            first = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
            head_ids = {"prompt_token_ids": prompt} if req.return_token_ids and c.index == 0 else {}
            yield sse({**head, "choices": [first], **extra, **head_ids})
        async for index, ev in generation.events():
            c = choices[index]
            seen = len(c.logprobs)
            c.add(ev)
            if not ev.text and not ev.finish_reason and len(c.logprobs) == seen:
                continue  # text held back (a partial character or a possible stop string)
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": ev.text} if ev.text else {},
                "logprobs": self.chat_logprobs(ChoiceState(index, logprobs=c.logprobs[seen:]))
                if req.logprobs
                else None,
                "finish_reason": ev.finish_reason,
            }
            if req.return_token_ids and ev.token is not None:
                choice["token_ids"] = [ev.token]
            yield sse({**head, "choices": [choice], **extra})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage([prompt], choices)})

    # -- completions --

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await read_json(self.state, request))
        check_model(self.state, req.model)
        prompts = [self._prompt_ids(p) for p in req.prompts()]
        if not prompts:
            raise ApiError(400, "prompt: at least one prompt", param="prompt", code="invalid_value")
        want = req.logprobs is not None
        params = sampling_params(self.state, req, max(len(p) for p in prompts), "prompt", want)
        generation = Generation(self.state, prompts, params, req.n, req.logprobs or 0)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        count = len(prompts) * req.n
        if req.stream:
            return self._stream(self._completion_chunks(req, generation, head, prompts, count))
        choices = await collect(request, generation, count)
        body = {
            **head,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": self.completion_logprobs(c) if want else None,
                    "finish_reason": c.finish_reason,
                    **(
                        {"token_ids": c.tokens, "prompt_token_ids": prompts[c.index // req.n]}
                        if req.return_token_ids
                        else {}
                    ),
                }
                for c in choices
            ],
            "usage": usage(prompts, choices),
        }
        return JSONResponse(body)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.state.loaded.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.state.loaded.config.vocab_size
            if any(t >= vocab for t in ids):
                raise ApiError(
                    400, f"prompt: token ids must be below the vocabulary size {vocab}", param="prompt"
                )
        if not ids:
            raise ApiError(400, "prompt: empty", param="prompt", code="invalid_value")
        return ids

    async def _completion_chunks(
        self, req: CompletionRequest, generation: Generation, head: dict, prompts: list[list[int]], count: int
    ) -> AsyncIterator[bytes]:
        extra = {"usage": None} if req.include_usage else {}
        choices = [ChoiceState(i) for i in range(count)]
        offsets = [0] * count
        async for index, ev in generation.events():
            c = choices[index]
            seen = len(c.logprobs)
            c.add(ev)
            if not ev.text and not ev.finish_reason and len(c.logprobs) == seen:
                continue
            logprobs = None
            if req.logprobs is not None:
                part = ChoiceState(index, logprobs=c.logprobs[seen:])
                logprobs = self.completion_logprobs(part, offsets[index])
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
            choice = {
                "index": index,
                "text": ev.text,
                "logprobs": logprobs,
                "finish_reason": ev.finish_reason,
            }
            yield sse({**head, "choices": [choice], **extra})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompts, choices)})

    @staticmethod
    def _stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except ApiError as err:  # the stream has started: the error goes in an event
                yield sse(err.body())
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def build_app(state: ServeState) -> Starlette:
    api = Api(state)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        err = ApiError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code="not_found" if exc.status_code == 404 else None,
        )
        return error_response(err)

    routes = [
        Route("/health", api.endpoint("/health", api.health, guarded=False), methods=["GET"]),
        Route("/metrics", api.endpoint("/metrics", api.metrics, guarded=False), methods=["GET"]),
        Route("/v1/models", api.endpoint("/v1/models", api.models), methods=["GET"]),
        Route("/v1/completions", api.endpoint("/v1/completions", api.completions), methods=["POST"]),
        Route("/v1/chat/completions", api.endpoint("/v1/chat/completions", api.chat), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
