"""Prometheus metrics, the API key, vLLM's adapter endpoints and the OpenAI details (n, prompt lists)."""

import contextlib
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorakit.serving import BackgroundServer, Limits, build_engine
from tests.helpers import complete, offline, submit


@pytest.fixture(scope="module")
def keyed(causal_dir, adapter_dir):  # noqa: F811
    engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha"}, adapter_dir=str(adapter_dir),
                          limits=Limits(max_new_tokens=16, max_prompt_tokens=40))
    with BackgroundServer(engine, api_key="s3cret") as running:
        yield running


AUTH = {"Authorization": "Bearer s3cret"}


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
                                 if sample.labels else "")
            values[key] = sample.value
    return values


def test_every_endpoint_but_health_and_docs_needs_the_key(keyed):
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    for method, path in (("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/completions"),
                         ("post", "/v1/load_lora_adapter")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            answer = getattr(httpx, method)(f"{keyed.url}{path}", headers=headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", (path, headers)
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        assert httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200


def test_docs_page_loads_its_schema_and_offers_the_key(keyed):
    # a browser cannot send a header to load /docs: the page and its schema are public, and the
    # schema declares bearer auth so the page's Authorize button sends the key with each call
    assert httpx.get(f"{keyed.url}/docs").status_code == 200
    schema = httpx.get(f"{keyed.url}/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema.json()["security"] == [{"bearer": []}]


def test_prometheus_metrics_count_requests_tokens_and_latencies(keyed):
    before = metric_values(httpx.get(f"{keyed.url}/metrics", headers=AUTH).text)
    answer = httpx.post(f"{keyed.url}/v1/completions", headers=AUTH, timeout=60,
                        json={"model": "alpha", "prompt": ["the film was", "the plot"], "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200
    bad = httpx.post(f"{keyed.url}/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404
    after = metric_values(httpx.get(f"{keyed.url}/metrics", headers=AUTH).text)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    usage = answer.json()["usage"]
    assert delta("lorakit_requests_total{kind=generate}") == 2
    assert delta("lorakit_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("lorakit_generated_tokens_total") >= usage["completion_tokens"]
    assert delta("lorakit_time_to_first_token_seconds_count") == 2
    assert delta("lorakit_queue_time_seconds_count") == 2
    assert delta("lorakit_request_errors_total{status=404}") == 1
    assert after["lorakit_loaded_adapters"] == 1 and after["lorakit_waiting_requests"] == 0


def test_prompt_lists_and_n(keyed, causal_dir, adapter_dir):  # noqa: F811
    prompts = ["the film was", "a movie is very"]
    answer = httpx.post(f"{keyed.url}/v1/completions", headers=AUTH, timeout=60,
                        json={"model": "alpha", "prompt": prompts, "max_tokens": 6, "temperature": 0}).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for choice, prompt in zip(answer["choices"], prompts):
        assert choice["text"] == offline(causal_dir, adapter_dir, "alpha", prompt, max_new_tokens=6)
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    refused = httpx.post(f"{keyed.url}/v1/completions", headers=AUTH,
                         json={"model": "alpha", "prompt": "the film", "n": 2})
    assert refused.status_code == 400 and "n > 1 is not supported" in refused.json()["error"]["message"]


def test_vllm_adapter_endpoints(keyed, adapter_dir):  # noqa: F811
    url = keyed.url
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "gamma"})
    assert loaded.status_code == 200 and "gamma" in loaded.text
    assert "gamma" in [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
    outside = httpx.post(f"{url}/v1/load_lora_adapter", headers=AUTH,
                         json={"lora_name": "beta", "lora_path": "/tmp/elsewhere/beta"})
    assert outside.status_code == 403
    assert httpx.post(f"{url}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "gamma"}).status_code == 200
    assert "gamma" not in [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]


def test_dtype_and_a_qlora_run_served_on_its_4bit_base(causal_dir, adapter_dir, tmp_path):  # noqa: F811
    import json
    import shutil

    import torch

    import lorakit as lk

    engine = build_engine(causal_dir, {}, dtype="bf16")
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
    finally:
        engine.close()
    qlora = tmp_path / "alpha-qlora"
    shutil.copytree(adapter_dir / "alpha", qlora)
    (qlora / "lorakit_run.json").write_text(json.dumps({"task": "sft", "qlora": True, "labels": None}))
    engine = build_engine(causal_dir, {"alpha": qlora})
    try:
        assert any(isinstance(m, lk.Linear4bit) for m in engine.model.modules())
    finally:
        engine.close()


def test_adapters_load_on_demand_with_lru_eviction(causal_dir, adapter_dir):  # noqa: F811
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), limits=Limits(max_new_tokens=8, adapter_wait_s=0.3),
                          max_loaded_adapters=2)
    with BackgroundServer(engine) as running:
        for name in ("gamma", "alpha"):
            reply = complete(running.url, name, "the film was", max_tokens=6)
            assert reply.status_code == 200
            assert reply.json()["choices"][0]["text"] == offline(causal_dir, adapter_dir, name, "the film was", 6)
        assert sorted(engine.adapters) == ["alpha", "gamma"]
        assert complete(running.url, "alpha", "the plot").status_code == 200  # alpha is now the most recent
        assert complete(running.url, "beta", "the plot").status_code == 200   # evicts gamma, the least recent
        assert sorted(engine.adapters) == ["alpha", "beta"]
        while engine.pool.in_use.get("alpha", 0) or engine.pool.in_use.get("beta", 0):  # the worker releases after replying
            time.sleep(0.01)
        engine.pool.in_use.update({"alpha": 1, "beta": 1})  # both busy: nothing can be evicted
        finished = {}

        def ask(name):
            finished[name] = (complete(running.url, name, "the plot"), time.monotonic())
        waiting = threading.Thread(target=ask, args=("gamma",))  # waits 0.3 s for an idle one, then gives up
        waiting.start()
        time.sleep(0.05)
        ask("alpha")  # a resident adapter is served while gamma waits for room
        waiting.join()
        busy = finished["gamma"][0]
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        assert finished["alpha"][0].status_code == 200 and finished["alpha"][1] < finished["gamma"][1]
        engine.pool.in_use.update({"alpha": 1})

        def finish_alpha():
            time.sleep(0.1)
            finish_requests(engine, "alpha")
        threading.Thread(target=finish_alpha).start()
        waited = complete(running.url, "gamma", "the plot")  # alpha's request ends meanwhile: it is evicted
        assert waited.status_code == 200 and sorted(engine.adapters) == ["beta", "gamma"]
        engine.pool.in_use.update({"beta": 0})


@contextlib.contextmanager
def one_busy_slot(causal_dir, adapter_dir, wait_s: float):
    """An engine with room for one adapter, held by "alpha" with a request in flight."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), limits=Limits(adapter_wait_s=wait_s),
                          max_loaded_adapters=1)
    try:
        engine.check_model("alpha")
        engine.pool.in_use["alpha"] = 1
        yield engine
    finally:
        engine.close()


def finish_requests(engine, name: str) -> None:
    """As the worker does when the last request of ``name`` ends: it is idle, waiters are woken."""
    with engine.pool.idle:
        engine.pool.in_use[name] = 0
        engine.pool.idle.notify_all()


def test_requests_waiting_for_room_queue_first_come_first_served(causal_dir, adapter_dir):  # noqa: F811
    from lorakit.serving import ServingError

    with one_busy_slot(causal_dir, adapter_dir, wait_s=1.0) as engine:
        loads, outcome = [], {}
        loaded = engine.pool._loaded  # every load ends here, a hot-swap into an evicted adapter's tensors too
        engine.pool._loaded = lambda name: (loads.append(name), loaded(name))

        def ask(name):
            try:
                outcome[name] = engine.check_model(name)
            except ServingError as exc:
                outcome[name] = exc.status
        first, second = threading.Thread(target=ask, args=("beta",)), threading.Thread(target=ask, args=("gamma",))
        first.start()
        time.sleep(0.2)
        second.start()
        time.sleep(0.1)
        assert engine.waiting() == 2  # both count against --max-queue while they wait
        time.sleep(1.2)  # beta, first in line, gives up after 1 s; gamma's wait starts only then
        finish_requests(engine, "alpha")
        first.join()
        second.join()
        assert outcome == {"beta": 503, "gamma": "gamma"} and loads == ["gamma"]
        assert engine.waiting() == 0


def test_an_adapter_loaded_for_a_request_is_its_own_until_it_ends(causal_dir, adapter_dir):  # noqa: F811
    """Loading a request's adapter and counting the request against it are one step: the next
    request in line cannot evict it in between (before: 79 loads for 32 requests of 100 adapters
    with 8 resident, as each load was evicted and reloaded)."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), limits=Limits(adapter_wait_s=5.0),
                          max_loaded_adapters=1)
    pool = engine.pool
    try:
        second = threading.Thread(target=pool.acquire, args=("gamma",))
        attach = pool._attach

        def attach_then_let_another_in(name, path):
            attach(name, path)
            if name == "beta":  # beta is loaded, its request not counted yet: gamma's request comes
                second.start()
                second.join(0.5)
        pool._attach = attach_then_let_another_in
        pool.acquire("beta")
        assert pool.in_use["beta"] == 1 and pool.adapters == ["beta"] and second.is_alive()  # gamma waits
        finish_requests(engine, "beta")
        second.join(5)
        assert not second.is_alive() and pool.adapters == ["gamma"] and pool.in_use["gamma"] == 1
        assert pool.loads == {"beta": 1, "gamma": 1}
        finish_requests(engine, "gamma")
    finally:
        engine.close()


def test_a_request_whose_adapter_was_evicted_waits_in_line_without_stopping_it(causal_dir, adapter_dir):  # noqa: F811
    from lorakit.serving.requests import Request

    with one_busy_slot(causal_dir, adapter_dir, wait_s=5.0) as engine:
        first = threading.Thread(target=engine.check_model, args=("beta",))  # first in line for room
        first.start()
        time.sleep(0.2)
        replies = []
        request = Request(kind="generate", adapter="gamma", prompt_ids=[1, 2, 3], max_new_tokens=1,
                          sink=lambda kind, value: replies.append(kind))
        submitting = threading.Thread(target=engine.submit, args=(request,))  # gamma was evicted: reload it
        submitting.start()
        time.sleep(0.2)
        finish_requests(engine, "alpha")
        first.join(timeout=3)
        submitting.join(timeout=3)
        assert not first.is_alive() and not submitting.is_alive()  # the line moved: beta, then gamma
        deadline = time.monotonic() + 10
        while "done" not in replies and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "done" in replies and engine.adapters == ["gamma"]


def test_request_bodies_are_in_the_openapi_schema(keyed):
    spec = httpx.get(f"{keyed.url}/openapi.json", headers=AUTH).json()
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "prompt", "max_tokens", "n", "stream"} <= set(body["properties"])
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in chat["properties"]
    assert "$ref" not in json.dumps(chat) and chat["properties"]["messages"]["items"]["properties"]["role"]


def test_streams_end_with_usage(keyed):
    with httpx.stream("POST", f"{keyed.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "alpha", "prompt": "the film was", "max_tokens": 5, "temperature": 0,
                            "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] >= 1
    assert "".join(c["choices"][0]["text"] for c in chunks) and all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", ("amx_bf16", "bf16")),
                                             ("fpu avx2 avx512f avx512_bf16", ("avx512_bf16", "bf16")),
                                             ("fpu avx2 avx512f", (None, "fp32"))])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_matrix_units(tmp_path, monkeypatch, flags, expected):
    from lorakit.serving import server as server_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert server_module.native_bf16(str(cpuinfo)) == expected[0]
    assert server_module.native_bf16(str(tmp_path / "missing")) is None
    monkeypatch.setattr(server_module, "native_bf16", lambda: expected[0])
    dtype, why = server_module.resolve_dtype("auto")
    assert dtype == expected[1] and why.startswith("auto")
    assert server_module.resolve_dtype("fp32") == ("fp32", "as asked (--dtype)")  # --dtype wins


def test_serve_qlora_serves_the_base_in_4bit_equal_to_offline_on_the_same_base(causal_dir):  # noqa: F811
    """`lorakit serve --qlora`: the base read straight into 4 bits; a greedy reply equals offline
    generate on `from_pretrained` + `lk.quantize` (the same NF4 weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit as lk

    engine = build_engine(causal_dir, {}, qlora=True)
    try:
        assert sum(isinstance(m, lk.Linear4bit) for m in engine.model.modules()) == 14
        with BackgroundServer(engine) as server:
            served = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": engine.base_name, "prompt": "the film was", "max_tokens": 6, "temperature": 0}).json()
    finally:
        engine.close()
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    model = lk.quantize(AutoModelForCausalLM.from_pretrained(causal_dir).eval())
    enc = tokenizer("the film was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert served["choices"][0]["text"] == tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_an_evicted_adapter_of_the_same_shape_lends_its_tensors_to_the_next_and_replies_stay_exact(
        causal_dir, adapter_dir):  # noqa: F811
    """alpha and gamma are plain LoRA adapters of one shape: gamma is hot-swapped into alpha's
    tensors; beta (DoRA) does not fit them and is evicted and loaded. Every reply equals offline
    generate with its adapter."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), max_loaded_adapters=1)
    pool = engine.pool
    try:
        built = []
        attach = pool._attach
        pool._attach = lambda name, path: (built.append(name), attach(name, path))
        for adapter in ("alpha", "gamma", "beta", "alpha"):
            if adapter == "gamma":
                before = {id(p) for p in engine.model.parameters()}
            recorder = submit(engine, adapter, adapter, "a movie is very", 6, [])
            assert recorder.finished.wait(60) and recorder.error is None
            assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, "a movie is very", 6)
            if adapter == "gamma":
                assert {id(p) for p in engine.model.parameters()} == before  # no tensor built for gamma
        assert built == ["alpha", "beta", "alpha"]  # gamma was swapped in; beta and alpha built
        assert pool.loads == {"alpha": 2, "gamma": 1, "beta": 1} and pool.adapters == ["alpha"]
    finally:
        engine.close()


def test_a_hot_swap_runs_beside_forwards_in_flight_and_names_stay_apart(causal_dir, adapter_dir):  # noqa: F811
    """Lending idle alpha's tensors to gamma writes values no forward in flight reads, so it does not
    wait for the forwards (a turn of the model lock would: it stops every worker meanwhile). The
    model keeps holding gamma under alpha's name; alpha loaded afresh then gets a name of its own.
    Every reply equals offline generate with its adapter."""
    engine = build_engine(causal_dir, {}, adapter_dir=str(adapter_dir), max_loaded_adapters=2)
    pool = engine.pool

    def answers(adapter):
        recorder = submit(engine, adapter, adapter, "a movie is very", 6, [])
        assert recorder.finished.wait(60) and recorder.error is None
        assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, "a movie is very", 6)
        while pool.in_use.get(adapter, 0):  # the worker releases after replying
            time.sleep(0.01)

    try:
        answers("alpha")
        answers("beta")  # DoRA: it does not fit alpha's tensors, and alpha is now the one to go
        with engine.model_lock.shared():  # a forward in flight
            swap = threading.Thread(target=pool.acquire, args=("gamma",), daemon=True)
            swap.start()
            swap.join(30)
            assert not swap.is_alive()  # done without waiting for the forward
        pool.release("gamma")
        assert pool.in_model["gamma"] == "alpha" and sorted(pool.adapters) == ["beta", "gamma"]
        answers("gamma")
        answers("alpha")  # beta goes (it does not fit alpha's file): alpha is built under another name
        assert pool.in_model == {"gamma": "alpha", "alpha": "alpha_"} and sorted(pool.adapters) == ["alpha", "gamma"]
        answers("gamma")
    finally:
        engine.close()
