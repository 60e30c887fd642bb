"""`lorakit serve`: one base model, many adapters, mixed-adapter batches over HTTP."""

from .engine import Engine, Limits, ServingError
from .server import BackgroundServer, build_engine

__all__ = ["Engine", "Limits", "ServingError", "BackgroundServer", "build_engine"]
