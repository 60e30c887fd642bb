"""The server under faults: adapters given at start, the cap on every load path, unloads racing
requests, clients that disconnect, bodies that never end, and fields it does not implement."""

import socket
import threading
import time

import httpx
import pytest

from lorakit.io.hotswap import Hotswap
from lorakit.serving import BackgroundServer, Limits, ServingError, build_engine
from tests.helpers import complete, offline, submit


def paced_engine(causal_dir, adapters=None, step_s=0.02, **engine_kwargs):
    """An engine whose forwards take ``step_s`` each (a bigger model's pace) and never choose the
    end-of-sequence token, so a request runs to max_tokens unless something stops it. The hooks go
    on before the engine starts, so its slot-cache check sees the same model (continuous batching)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.serving.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(causal_dir)
    eos = model.generation_config.eos_token_id

    def no_eos(module, args, output):
        output.logits[..., eos] = -1e9
        return output
    model.register_forward_pre_hook(lambda module, args: time.sleep(step_s))
    model.register_forward_hook(no_eos)
    engine = Engine(model, AutoTokenizer.from_pretrained(causal_dir), **engine_kwargs)
    for name, path in (adapters or {}).items():
        engine.pool.add_start_adapter(name, path)
    return engine


@pytest.fixture
def endless(causal_dir, adapter_dir):  # noqa: F811
    engine = paced_engine(causal_dir, {"alpha": adapter_dir / "alpha"},
                          limits=Limits(max_new_tokens=100, max_prompt_tokens=16, max_body_bytes=4000))
    with BackgroundServer(engine) as running:
        assert engine.scheduler == "continuous"
        yield running


def generated(engine) -> float:
    return engine.prometheus.generated_tokens._value.get()


def test_a_streaming_client_that_leaves_stops_its_generation(endless):
    """Before: 50 clients that left after their first chunk still had every token generated."""
    engine = endless.engine
    body = {"model": "alpha", "prompt": "the film was", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{endless.url}/v1/completions", json=body, timeout=30) as reply:
        next(reply.iter_lines())  # the first chunk, then the client goes away
    left_at = generated(engine)
    deadline = time.time() + 5
    while engine.stats["cancelled"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # ~15 more decoding steps, were it still running
    assert engine.stats["cancelled"] == 1
    assert generated(engine) - left_at <= 6  # detection within a few steps (0.02 s steps)
    assert engine.pool.in_use.get("alpha", 0) == 0 and engine.prometheus.running._value.get() == 0  # slot freed
    metrics = httpx.get(f"{endless.url}/metrics").text
    assert "lorakit_cancelled_requests_total 1.0" in metrics


@pytest.fixture
def endless_keyed(causal_dir):  # noqa: F811
    """The same behind --api-key: the bearer middleware sits between the handler and uvicorn's receive."""
    engine = paced_engine(causal_dir, limits=Limits(max_new_tokens=100, max_prompt_tokens=16))
    with BackgroundServer(engine, api_key="k") as running:
        yield running


@pytest.mark.parametrize("server", ["endless", "endless_keyed"])
def test_a_waiting_client_that_leaves_stops_its_generation(server, request):
    """The handler waits on the client's disconnect message (no polling); with and without a key."""
    endless = request.getfixturevalue(server)
    engine = endless.engine
    body = {"model": engine.base_name, "prompt": "the plot", "max_tokens": 100, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{endless.url}/v1/completions", json=body, timeout=0.4,
                   headers={"Authorization": "Bearer k"})  # gives up and closes
    deadline = time.time() + 5
    while engine.stats["cancelled"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats["cancelled"] == 1
    time.sleep(0.2)
    assert engine.stats["completion_tokens"] < 50  # not the 100 asked for
    assert engine.prometheus.running._value.get() == 0


def test_a_chunked_body_is_refused_while_it_streams_in(endless):
    """Before: the whole body was buffered first (300 MB sent: +500 MB server memory, then 413).
    Now the 413 arrives while the client is still sending, after about the limit (4,000 bytes)."""
    import select

    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", int(endless.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
        sock.settimeout(5)
        for _ in range(20_000):  # 20 MB, never terminated: only a server that answers early answers at all
            if select.select([sock], [], [], 0.002)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += 1024
        try:
            while b"\r\n\r\n" not in answer:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 1_000_000  # answered while the body was still coming, not after it


def test_logprobs_is_refused_not_ignored(endless):
    for field in ({"logprobs": 2}, {"logprobs": True}, {"top_logprobs": 3}):
        reply = complete(endless.url, "alpha", "the film", **field)
        assert reply.status_code == 400 and "logprobs" in reply.json()["error"]["message"]
    assert complete(endless.url, "alpha", "the film", max_tokens=2, logprobs=None).status_code == 200


def test_start_adapters_come_back_after_eviction_and_every_load_honours_the_cap(causal_dir, adapter_dir):  # noqa: F811
    """Before: a start adapter evicted was gone for good (404), and POST /v1/adapters ignored the cap."""
    engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha"}, adapter_dir=str(adapter_dir),
                          limits=Limits(max_new_tokens=8), max_loaded_adapters=2)
    with BackgroundServer(engine) as running:
        for name in ("beta", "gamma"):  # on demand: gamma evicts alpha, the least recently used
            assert complete(running.url, name, "the plot").status_code == 200
        assert sorted(engine.adapters) == ["beta", "gamma"]
        again = complete(running.url, "alpha", "the film was", max_tokens=6)  # reloaded from its start path
        assert again.status_code == 200
        assert again.json()["choices"][0]["text"] == offline(causal_dir, adapter_dir, "alpha", "the film was", 6)
        for name in ("beta", "gamma"):
            httpx.delete(f"{running.url}/v1/adapters/{name}")
        for name in ("beta", "gamma"):
            assert httpx.post(f"{running.url}/v1/adapters", json={"name": name}).status_code == 200
            assert len(engine.adapters) <= 2
        vllm = httpx.post(f"{running.url}/v1/load_lora_adapter", json={"lora_name": "alpha"})
        assert vllm.status_code == 200 and len(engine.adapters) == 2 and "alpha" in engine.adapters
    with pytest.raises(ValueError, match="max-loaded-adapters"):
        build_engine(causal_dir, {"alpha": adapter_dir / "alpha", "beta": adapter_dir / "beta"},
                     max_loaded_adapters=1)


def test_a_request_for_an_adapter_being_unloaded_waits_and_evicts_nothing(causal_dir, adapter_dir):  # noqa: F811
    """Before: it got 422 "already exists" after evicting another adapter."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), limits=Limits(adapter_wait_s=5),
                          max_loaded_adapters=2)
    try:
        engine.check_model("alpha")
        engine.check_model("beta")
        engine.pool.in_use["alpha"] = 1  # a request of alpha in flight: its unload waits for it
        unloading = threading.Thread(target=engine.pool.unload, args=("alpha",))
        unloading.start()
        while "alpha" not in engine.pool.draining:
            time.sleep(0.01)
        outcome = {}
        asking = threading.Thread(target=lambda: outcome.update(name=engine.check_model("alpha")))
        asking.start()
        time.sleep(0.3)
        assert "name" not in outcome and "beta" in engine.adapters  # waiting, and beta untouched
        with engine.pool.idle:
            engine.pool.in_use["alpha"] = 0
            engine.pool.idle.notify_all()
        unloading.join(10)
        asking.join(10)
        assert outcome == {"name": "alpha"} and sorted(engine.adapters) == ["alpha", "beta"]
    finally:
        engine.close()


@pytest.mark.slow
def test_unload_reload_loop_never_fails_a_request(causal_dir, adapter_dir):  # noqa: F811
    """Before: 26 of 60 requests failed with 422 during a load/unload loop."""
    from concurrent.futures import ThreadPoolExecutor

    # paced: requests last long enough for unloads to wait on them
    engine = paced_engine(causal_dir, step_s=0.01, adapter_dir=str(adapter_dir), limits=Limits(max_new_tokens=4),
                          max_loaded_adapters=2)
    with BackgroundServer(engine) as running:
        stop = threading.Event()

        def churn():
            while not stop.is_set():
                httpx.post(f"{running.url}/v1/adapters", json={"name": "gamma"}, timeout=60)
                httpx.delete(f"{running.url}/v1/adapters/gamma", timeout=60)
        churner = threading.Thread(target=churn)
        churner.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda i: complete(running.url, "gamma" if i % 3 else "alpha", "the plot",
                                                           max_tokens=3), range(40)))
        finally:
            stop.set()
            churner.join(60)
        assert [r.status_code for r in replies] == [200] * 40, [r.text for r in replies if r.status_code != 200][:3]
        assert len(engine.adapters) <= 2


def test_a_swap_that_fails_halfway_leaves_no_half_written_adapter(causal_dir, adapter_dir, monkeypatch):  # noqa: F811
    """gamma is hot-swapped into idle alpha's tensors; when the copy fails after changing some of
    them, the request gets the reason and alpha is dropped, so that it comes back whole from its
    file: every later reply equals offline generate."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), max_loaded_adapters=1)
    try:
        first = submit(engine, "alpha", "alpha", "a movie is very", 6, [])
        assert first.finished.wait(60) and first.error is None

        def halfway(swap):
            layer = next(iter(swap.held.values()))
            layer.lora_pair(swap.adapter_name)[1].data.add_(1.0)  # one of alpha's tensors changed...
            raise RuntimeError("out of memory")  # ...then the copy fails
        monkeypatch.setattr(Hotswap, "apply", halfway)
        with pytest.raises(ServingError, match="adapter 'gamma' cannot be loaded: out of memory"):
            submit(engine, "gamma", "gamma", "a movie is very", 6, [])
        assert engine.pool.resident() == []
        monkeypatch.undo()
        for adapter in ("alpha", "gamma", "alpha"):
            recorder = submit(engine, adapter, adapter, "a movie is very", 6, [])
            assert recorder.finished.wait(60) and recorder.error is None, recorder.error
            assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, "a movie is very", 6)
    finally:
        engine.close()
