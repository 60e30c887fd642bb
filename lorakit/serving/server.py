"""Build a serving engine from command-line style arguments and run it with uvicorn."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from ..errors import ConfigError
from ..kernels.cpu import native_bf16
from .engine import Engine, Limits


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} given twice")
        adapters[name] = Path(path)
    return adapters


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(dtype: str) -> tuple[str, str]:
    """``auto`` -> bf16 on a CPU with native bf16 matrix units, fp32 elsewhere; with the reason."""
    if dtype != "auto":
        return dtype, "as asked (--dtype)"
    unit = native_bf16()
    if unit:
        return "bf16", f"auto: the CPU has {unit.upper().replace('_', '-')} (--dtype fp32 to serve in fp32)"
    return "fp32", "auto: no native bf16 matrix unit on this CPU (--dtype bf16 to serve in bf16 anyway)"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: str, scheduler: str, max_batch: int) -> tuple[int, str]:
    """``auto`` -> 2 engine workers where there are 2 cores or more (continuous scheduling), else 1;
    with the reason. Chosen on this 2-core machine's anchor workload and checked on the open-loop
    one (BENCHMARKS.md, issue 26); not measured on larger machines."""
    if workers != "auto":
        try:
            count = int(workers)
        except ValueError:
            raise ConfigError(f"--workers must be a whole number or auto, got {workers!r}") from None
        if count < 1:
            raise ConfigError(f"--workers must be at least 1, got {count}")
        if count > 1 and scheduler != "continuous":
            raise ConfigError("--workers above 1 needs --scheduler continuous")
        if count > max_batch:
            raise ConfigError(f"--workers {count} needs --max-batch of at least {count}, got {max_batch}")
        return count, "as asked (--workers)"
    cores = usable_cores()
    if scheduler != "continuous" or cores < 2 or max_batch < 2:
        return 1, f"auto: {cores} core(s), {scheduler} scheduling"
    return 2, f"auto: {cores} cores, each worker {cores // 2} torch thread(s) (--workers 1 for one worker on all)"


def build_engine(model_name: str, adapters: dict[str, Path], adapter_dir: str | None = None,
                 limits: Limits = Limits(), dtype: str = "fp32", max_loaded_adapters: int | None = None,
                 scheduler: str = "continuous", prefill_chunk: int = 256, prefix_cache_mb: float = 256,
                 qlora: bool = False, workers: int = 1, packed_weights: str = "auto",
                 packed_prefill: str = "auto", decode_kernel: str = "auto",
                 lora_kernel: str = "auto") -> Engine:
    """Load the base model once (a classifier when the adapters were trained with task classify;
    4-bit when they were trained with QLoRA, or with ``qlora``) in ``dtype``, and every --adapter
    onto it. A 4-bit base is read straight into 4 bits (hub/low_memory.py)."""
    import torch

    from ..hub.models import load_model
    from ..io.runs import RUN_FILE

    if max_loaded_adapters is not None and max_loaded_adapters < 1:
        raise ConfigError(f"--max-loaded-adapters must be at least 1, got {max_loaded_adapters}")
    if max_loaded_adapters and len(adapters) > max_loaded_adapters:
        raise ConfigError(f"{len(adapters)} --adapter given but --max-loaded-adapters is {max_loaded_adapters}: "
                          "raise the cap, or give fewer and put the rest in --adapter-dir (loaded on demand)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    labels = None
    for path in adapters.values():
        if (path / RUN_FILE).is_file():
            record = json.loads((path / RUN_FILE).read_text())
            if record.get("task") == "classify":
                labels = record["labels"]
            qlora = qlora or bool(record.get("qlora"))
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {adapter_dir} is not a directory")
    torch_dtype = getattr(torch, DTYPES[dtype])
    # adapters trained on the 4-bit base are served on the same base, loaded straight into 4 bits
    model, tokenizer = load_model(model_name, "classify" if labels else "lm", labels, head_from_adapter=bool(labels),
                                  dtype=torch_dtype, quantize=torch_dtype if qlora else None)
    engine = Engine(model, tokenizer, base_name=Path(model_name).name or model_name, adapter_dir=adapter_dir,
                    labels=labels, limits=limits, max_loaded_adapters=max_loaded_adapters, scheduler=scheduler,
                    prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb, workers=workers,
                    packed_weights=packed_weights, packed_prefill=packed_prefill, decode_kernel=decode_kernel,
                    lora_kernel=lora_kernel)
    for name, path in adapters.items():
        engine.pool.add_start_adapter(name, path)
    return engine


class BackgroundServer:
    """uvicorn on a loopback socket in a thread (tests and benchmarks); `.url` once started."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
        import uvicorn

        from .app import create_app

        self.engine = engine
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(engine, api_key), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        import time

        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.01)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()
        self.socket.close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(engine: Engine, host: str, port: int, api_key: str | None = None) -> None:
    import uvicorn

    from .app import create_app

    if host not in LOOPBACK and not api_key:
        print(f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the model "
              "and load adapters. Pass --api-key (or set LORAKIT_API_KEY).")
    try:
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="info")
    finally:
        engine.close()
