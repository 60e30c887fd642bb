"""The HTTP API (FastAPI): OpenAI-style completions and chat, classification, adapter management.

Every handler validates its input into a 4xx with a message; only the engine's own failures are
5xx. Bodies are read and size-checked before parsing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .engine import Engine, Request, ServingError

DISCONNECT_POLL_S = 0.05  # how often a waiting handler checks that its client is still there


class ClientGone(ServingError):
    """The client disconnected before its answer was ready (nginx's 499: nobody reads it)."""

    def __init__(self):
        super().__init__("the client closed the connection", 499)


class ClientWatch:
    """Hands out a request's events while watching its client: one that went away cancels the
    requests (the scheduler drops them at its next step) and ends the handler with ClientGone.
    The client is checked at least every DISCONNECT_POLL_S, however often events arrive."""

    def __init__(self, http: HttpRequest, requests: list[Request]):
        self.http, self.requests, self.checked = http, requests, time.monotonic()

    async def _check(self) -> None:
        self.checked = time.monotonic()
        if await self.http.is_disconnected():
            for request in self.requests:
                request.cancel()
            raise ClientGone()

    async def next_event(self, events: asyncio.Queue):
        getter = asyncio.ensure_future(events.get())
        try:
            while True:
                if time.monotonic() - self.checked >= DISCONNECT_POLL_S:
                    await self._check()
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if done:
                    return getter.result()
        finally:
            getter.cancel()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CompletionBody(_Body):
    model: str
    prompt: str | list[str]
    n: int = Field(1, ge=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: int | bool | None = None       # refused (400) when asked for, never silently ignored
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(len(s) > 64 for s in stops):
            raise ValueError("stop takes at most 4 strings of at most 64 characters")
        return stops


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(CompletionBody):
    prompt: str = ""
    messages: list[Message] = Field(min_length=1)


class ClassifyBody(_Body):
    model: str
    input: str | list[str]


class AdapterBody(_Body):
    name: str


class VllmLoraBody(_Body):
    lora_name: str
    lora_path: str | None = None


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``limit`` bytes: a declared length is
    checked before reading, and a chunked body is counted while it streams in (never buffered whole)."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading it
        raise ServingError(f"request body of {declared} bytes exceeds the limit of {limit}", 413)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ServingError(f"request body exceeds the limit of {limit} bytes (read {size} so far)", 413)
        parts.append(part)
    return b"".join(parts)


async def parse(request: HttpRequest, schema: type[BaseModel], limit: int):
    raw = await read_body(request, limit)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ServingError(f"invalid request: {problems}", 400) from None


def documented(schema: type[BaseModel]) -> dict:
    """The request body's JSON schema for /docs: handlers read bodies themselves (size limit first),
    so FastAPI cannot infer it from their signatures."""
    full = schema.model_json_schema()
    definitions = full.pop("$defs", {})

    def inline(node):  # nested models (a chat message) written in place: no refs into another document
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(full)}}}}


def _document_bearer_auth(app: FastAPI) -> None:
    """Tell the schema (and so the /docs page's Authorize button) that calls need a bearer key."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="lorakit serve", description="One base model, many LoRA adapters.")
    limit = engine.limits.max_body_bytes

    def error(message: str, status: int) -> JSONResponse:
        engine.prometheus.errors.labels(status=str(status)).inc()
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)

    @app.exception_handler(ServingError)
    async def _serving_error(_, exc: ServingError):
        return error(str(exc), exc.status)

    if api_key:
        expected = api_key.encode()
        # the docs page and its schema hold no data; the browser cannot send a header to load them, so
        # they are public and the page's "Authorize" button sends the key with every call it makes
        public = {"/health", app.docs_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
        _document_bearer_auth(app)

        @app.middleware("http")
        async def _authorize(request: HttpRequest, call_next):
            scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""  # RFC 7235: any case
            if request.url.path not in public and not hmac.compare_digest(given, expected):
                response = error("missing or wrong API key: send 'Authorization: Bearer <key>'", 401)
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.running else "stopping", "adapters": len(engine.adapters)}

    @app.get("/metrics")
    async def metrics():
        """Prometheus' text format (the JSON view is /v1/stats)."""
        return Response(engine.prometheus.exposition(), media_type=engine.prometheus.content_type)

    @app.get("/v1/stats")
    async def stats():
        return engine.metrics()

    @app.get("/v1/models")
    async def models():
        ids = [engine.base_name, *engine.adapters]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "lorakit",
                                            "parent": None if i == engine.base_name else engine.base_name} for i in ids]}

    async def run(request: Request) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request.sink = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        await asyncio.to_thread(engine.submit, request)  # it may wait for room to reload an evicted adapter
        return events

    async def final(watch: "ClientWatch", events: asyncio.Queue):
        while True:
            kind, value = await watch.next_event(events)
            if kind == "done":
                return value
            if kind == "error":
                raise value

    def generation_request(body: CompletionBody, prompt_ids: list[int], adapter: str) -> Request:
        return Request(kind="generate", adapter=adapter, prompt_ids=prompt_ids, sink=None,
                       max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                       stop=body.stop or [], seed=body.seed)

    def completion_ids(body: CompletionBody) -> list[list[int]]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise ServingError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        if len(prompts) > engine.limits.max_batch:
            raise ServingError(f"at most {engine.limits.max_batch} prompts per request")
        if len(prompts) > 1 and body.stream:
            raise ServingError("stream: true takes a single prompt")
        return [engine.tokenizer(p)["input_ids"] for p in prompts]

    def chat_ids(body: ChatBody) -> list[int]:
        if not engine.tokenizer.chat_template:
            raise ServingError("this model has no chat template; use /v1/completions")
        text = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                    add_generation_prompt=True, tokenize=False)
        return engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def respond(http: HttpRequest, body, prompts: list[list[int]], chat: bool):
        if engine.labels is not None:
            raise ServingError("this server hosts a classifier; use /v1/classify")
        if body.n > 1:
            raise ServingError("n > 1 is not supported: send n requests (with different seeds when sampling)")
        if body.logprobs not in (None, False) or body.top_logprobs:
            raise ServingError("logprobs / top_logprobs are not supported by lorakit serve; drop them (lorakit "
                               "never returns a reply without what was asked)")
        adapter = await asyncio.to_thread(engine.check_model, body.model)  # may load it from --adapter-dir
        requests = [generation_request(body, ids, adapter) for ids in prompts]
        queues = []
        try:
            for request in requests:
                queues.append(await run(request))
        except BaseException:
            for request in requests:
                request.cancel()  # those already accepted stop; they were never answered
            raise
        events = queues[0]
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, delta: bool):
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            key, content = ("delta", {"content": text} if text is not None else {}) if delta else \
                ("message", {"role": "assistant", "content": text})
            return {"index": 0, key: content, "finish_reason": finish}

        if not body.stream:
            try:
                watch = ClientWatch(http, requests)
                results = [await final(watch, q) for q in queues]
            except asyncio.CancelledError:  # the server is stopping this handler
                for request in requests:
                    request.cancel()
                raise
            prompt_tokens = sum(r["prompt_tokens"] for r in results)
            completion_tokens = sum(r["completion_tokens"] for r in results)
            return {"id": ident, "object": kind, "created": created, "model": body.model,
                    "choices": [{**choice(r["text"], r["finish_reason"], False), "index": i} for i, r in enumerate(results)],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        async def stream():
            try:
                async for chunk in chunks():
                    yield chunk
            except ClientGone:
                return  # nobody is reading: no error chunk
            finally:  # the client went away (or the server stops): its request stops at the next step
                requests[0].cancel()

        async def chunks():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            watch = ClientWatch(http, requests)
            while True:
                event, value = await watch.next_event(events)
                if event == "error":
                    yield f"data: {json.dumps({'error': {'message': str(value), 'code': value.status}})}\n\n"
                    break
                text, finish = (value, None) if event == "delta" else (None, value["finish_reason"])
                chunk = {"id": ident, "object": chunk_kind, "created": created, "model": body.model,
                         "choices": [choice(text, finish, True)]}
                if event == "done":  # the last chunk carries the usage, as OpenAI's include_usage chunk does
                    chunk["usage"] = {"prompt_tokens": value["prompt_tokens"],
                                      "completion_tokens": value["completion_tokens"],
                                      "total_tokens": value["prompt_tokens"] + value["completion_tokens"]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if event == "done":
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions", openapi_extra=documented(CompletionBody))
    async def completions(request: HttpRequest):
        body = await parse(request, CompletionBody, limit)
        return await respond(request, body, completion_ids(body), chat=False)

    @app.post("/v1/chat/completions", openapi_extra=documented(ChatBody))
    async def chat_completions(request: HttpRequest):
        body = await parse(request, ChatBody, limit)
        return await respond(request, body, [chat_ids(body)], chat=True)

    @app.post("/v1/classify", openapi_extra=documented(ClassifyBody))
    async def classify(request: HttpRequest):
        body = await parse(request, ClassifyBody, limit)
        if engine.labels is None:
            raise ServingError("this server hosts a generative model; /v1/classify needs a classifier")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > engine.limits.max_batch or any(not t for t in texts):
            raise ServingError(f"input must hold 1 to {engine.limits.max_batch} non-empty texts")
        adapter = await asyncio.to_thread(engine.check_model, body.model)
        queues, requests = [], []
        for text in texts:
            ids = engine.tokenizer(text, truncation=True, max_length=engine.limits.max_prompt_tokens)["input_ids"]
            requests.append(Request(kind="classify", adapter=adapter, prompt_ids=ids, sink=None))
            queues.append(await run(requests[-1]))
        watch = ClientWatch(request, requests)
        results = [await final(watch, q) for q in queues]
        return {"object": "list", "model": body.model,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/adapters", openapi_extra=documented(AdapterBody))
    async def load_adapter(request: HttpRequest):
        body = await parse(request, AdapterBody, limit)
        await asyncio.to_thread(engine.load_adapter, body.name)
        return {"loaded": body.name, "adapters": engine.adapters}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await asyncio.to_thread(engine.unload_adapter, name, forget=True)
        return {"unloaded": name, "adapters": engine.adapters}

    # vLLM's names for the same two operations (its clients and scripts call these)
    @app.post("/v1/load_lora_adapter", openapi_extra=documented(VllmLoraBody))
    async def vllm_load(request: HttpRequest):
        body = await parse(request, VllmLoraBody, limit)
        path = engine.resolve_adapter_path(body.lora_name)
        if body.lora_path is not None and Path(body.lora_path).resolve() != path:
            raise ServingError(f"lora_path must be {body.lora_name!r} inside the server's --adapter-dir; other paths "
                               "are refused", 403)
        await asyncio.to_thread(engine.load_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", openapi_extra=documented(VllmLoraBody))
    async def vllm_unload(request: HttpRequest):
        body = await parse(request, VllmLoraBody, limit)
        await asyncio.to_thread(engine.unload_adapter, body.lora_name, forget=True)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app
