"""OpenAI's /v1/completions and /v1/chat/completions: prompts to generation requests, answered
whole or streamed as server-sent events (the last chunk carries the usage)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from .endpoints import body_of, engine_of
from .protocol import ClientGone, ClientWatch, results, submit
from .requests import Request, ServingError
from .schemas import ChatBody, CompletionBody, documented

router = APIRouter()


@router.post("/v1/completions", openapi_extra=documented(CompletionBody))
async def completions(http: HttpRequest):
    body = await body_of(http, CompletionBody)
    return await respond(http, body, completion_ids(engine_of(http), body), chat=False)


@router.post("/v1/chat/completions", openapi_extra=documented(ChatBody))
async def chat_completions(http: HttpRequest):
    body = await body_of(http, ChatBody)
    return await respond(http, body, [chat_ids(engine_of(http), body)], chat=True)


def completion_ids(engine, body: CompletionBody) -> list[list[int]]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise ServingError("prompt must be a non-empty string or a non-empty list of non-empty strings")
    if len(prompts) > engine.limits.max_batch:
        raise ServingError(f"at most {engine.limits.max_batch} prompts per request")
    if len(prompts) > 1 and body.stream:
        raise ServingError("stream: true takes a single prompt")
    return [engine.tokenizer(p)["input_ids"] for p in prompts]


def chat_ids(engine, body: ChatBody) -> list[int]:
    if not engine.tokenizer.chat_template:
        raise ServingError("this model has no chat template; use /v1/completions")
    text = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                add_generation_prompt=True, tokenize=False)
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_request(body: CompletionBody, prompt_ids: list[int], adapter: str) -> Request:
    return Request(kind="generate", adapter=adapter, prompt_ids=prompt_ids, sink=None,
                   max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                   stop=body.stop or [], seed=body.seed, stream=body.stream)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str | None, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "finish_reason": finish}
    key, content = ("delta", {"content": text} if text is not None else {}) if delta else \
        ("message", {"role": "assistant", "content": text})
    return {"index": 0, key: content, "finish_reason": finish}


async def respond(http: HttpRequest, body, prompts: list[list[int]], chat: bool):
    engine = engine_of(http)
    if engine.labels is not None:
        raise ServingError("this server hosts a classifier; use /v1/classify")
    if body.n > 1:
        raise ServingError("n > 1 is not supported: send n requests (with different seeds when sampling)")
    if body.logprobs not in (None, False) or body.top_logprobs:
        raise ServingError("logprobs / top_logprobs are not supported by lorakit serve; drop them (lorakit "
                           "never returns a reply without what was asked)")
    adapter = engine.check_model(body.model, load=False)  # submit loads it (from --adapter-dir) if need be
    requests = [generation_request(body, ids, adapter) for ids in prompts]
    queues = []
    try:
        for request in requests:
            queues.append(await submit(engine, request))
    except BaseException:
        for request in requests:
            request.cancel()  # those already accepted stop; they were never answered
        raise
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    if not body.stream:
        try:
            answers = await results(http, requests, queues)
        except asyncio.CancelledError:  # the server is stopping this handler
            for request in requests:
                request.cancel()
            raise
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model,
                "choices": [{**choice(chat, r["text"], r["finish_reason"], False), "index": i}
                            for i, r in enumerate(answers)],
                "usage": usage(sum(r["prompt_tokens"] for r in answers), sum(r["completion_tokens"] for r in answers))}
    header = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
              "model": body.model}
    return StreamingResponse(stream(http, requests, queues[0], header, chat), media_type="text/event-stream")


async def stream(http: HttpRequest, requests: list[Request], events: asyncio.Queue, header: dict, chat: bool):
    try:
        async for chunk in chunks(http, requests, events, header, chat):
            yield chunk
    except ClientGone:
        return  # nobody is reading: no error chunk
    finally:  # the client went away (or the server stops): its request stops at the next step
        requests[0].cancel()


async def chunks(http: HttpRequest, requests: list[Request], events: asyncio.Queue, header: dict, chat: bool):
    watch = ClientWatch(http, requests)
    try:
        while True:
            event, value = await watch.next_event(events)
            if event == "error":
                yield f"data: {json.dumps({'error': {'message': str(value), 'code': value.status}})}\n\n"
                break
            text, finish = (value, None) if event == "delta" else (None, value["finish_reason"])
            chunk = {**header, "choices": [choice(chat, text, finish, True)]}
            if event == "done":  # the last chunk carries the usage, as OpenAI's include_usage chunk does
                chunk["usage"] = usage(value["prompt_tokens"], value["completion_tokens"])
            yield f"data: {json.dumps(chunk)}\n\n"
            if event == "done":
                break
    finally:
        watch.close()
    yield "data: [DONE]\n\n"
