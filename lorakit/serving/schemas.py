"""The HTTP API's request bodies (pydantic), OpenAI's and vLLM's field names; unknown fields are
ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
