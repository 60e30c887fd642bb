"""The endpoints besides generation: health, metrics, models, classification and adapter management
(lorakit's and vLLM's names). Module-level handlers on one router; each finds the engine on
``app.state`` (create_app puts it there). A new endpoint goes here, or beside it in its own module
with its own router included by app.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import PlainTextResponse, Response

from .protocol import parse, results, submit
from .requests import Request, ServingError
from .schemas import AdapterBody, ClassifyBody, VllmLoraBody, documented

router = APIRouter()


def engine_of(http: HttpRequest):
    return http.app.state.engine


async def body_of(http: HttpRequest, schema):
    return await parse(http, schema, engine_of(http).limits.max_body_bytes)


@router.get("/health")
async def health(http: HttpRequest):
    engine = engine_of(http)
    return {"status": "ok" if engine.running else "stopping", "adapters": len(engine.adapters)}


@router.get("/metrics")
async def metrics(http: HttpRequest):
    """Prometheus' text format (the JSON view is /v1/stats)."""
    prometheus = engine_of(http).prometheus
    return Response(prometheus.exposition(), media_type=prometheus.content_type)


@router.get("/v1/stats")
async def stats(http: HttpRequest):
    return engine_of(http).metrics()


@router.get("/v1/models")
async def models(http: HttpRequest):
    engine = engine_of(http)
    ids = [engine.base_name, *engine.adapters]
    return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "lorakit",
                                        "parent": None if i == engine.base_name else engine.base_name} for i in ids]}


@router.post("/v1/classify", openapi_extra=documented(ClassifyBody))
async def classify(http: HttpRequest):
    engine = engine_of(http)
    body = await body_of(http, ClassifyBody)
    if engine.labels is None:
        raise ServingError("this server hosts a generative model; /v1/classify needs a classifier")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > engine.limits.max_batch or any(not t for t in texts):
        raise ServingError(f"input must hold 1 to {engine.limits.max_batch} non-empty texts")
    adapter = engine.check_model(body.model, load=False)  # submit loads it if need be
    queues, requests = [], []
    for text in texts:
        ids = engine.tokenizer(text, truncation=True, max_length=engine.limits.max_prompt_tokens)["input_ids"]
        requests.append(Request(kind="classify", adapter=adapter, prompt_ids=ids, sink=None))
        queues.append(await submit(engine, requests[-1]))
    answers = await results(http, requests, queues)
    return {"object": "list", "model": body.model, "data": [{"index": i, **r} for i, r in enumerate(answers)]}


@router.post("/v1/adapters", openapi_extra=documented(AdapterBody))
async def load_adapter(http: HttpRequest):
    pool = engine_of(http).pool
    body = await body_of(http, AdapterBody)
    await asyncio.to_thread(pool.load, body.name)
    return {"loaded": body.name, "adapters": pool.adapters}


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, http: HttpRequest):
    pool = engine_of(http).pool
    await asyncio.to_thread(pool.unload, name, forget=True)
    return {"unloaded": name, "adapters": pool.adapters}


# vLLM's names for the same two operations (its clients and scripts call these)
@router.post("/v1/load_lora_adapter", openapi_extra=documented(VllmLoraBody))
async def vllm_load(http: HttpRequest):
    pool = engine_of(http).pool
    body = await body_of(http, VllmLoraBody)
    path = pool.resolve_path(body.lora_name)
    if body.lora_path is not None and Path(body.lora_path).resolve() != path:
        raise ServingError(f"lora_path must be {body.lora_name!r} inside the server's --adapter-dir; other paths "
                           "are refused", 403)
    await asyncio.to_thread(pool.load, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", openapi_extra=documented(VllmLoraBody))
async def vllm_unload(http: HttpRequest):
    pool = engine_of(http).pool
    body = await body_of(http, VllmLoraBody)
    await asyncio.to_thread(pool.unload, body.lora_name, forget=True)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
