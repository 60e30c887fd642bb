"""The HTTP API (FastAPI): OpenAI-style completions and chat (completions.py), classification and
adapter management (endpoints.py), over one engine.

Every handler validates its input into a 4xx with a message; only the engine's own failures are
5xx. Bodies are read and size-checked before parsing (protocol.py).
"""

from __future__ import annotations

from fastapi import FastAPI

from . import completions, endpoints
from .engine import Engine, ServingError
from .protocol import error_response, require_bearer


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="lorakit serve", description="One base model, many LoRA adapters.")
    app.state.engine = engine

    @app.exception_handler(ServingError)
    async def _serving_error(_, exc: ServingError):
        return error_response(app, str(exc), exc.status)

    if api_key:
        require_bearer(app, api_key)
    app.include_router(endpoints.router)
    app.include_router(completions.router)
    return app
