"""A real uvicorn server on loopback over a tiny Llama with several adapters."""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import lorakit as lk
from lorakit.serving import BackgroundServer, build_engine
from tests.helpers import complete, offline, randomize_lora

PROMPTS = ["the film was", "a movie is very", "the plot", "the actor is really good", "review :"]


def test_models_health_and_metrics(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]][1:] == ["alpha", "beta"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert {"requests", "queue_length", "latency_s", "completion_tokens"} <= set(httpx.get(f"{server.url}/v1/stats").json())


def test_concurrent_mixed_adapter_requests_equal_offline_generate(server, causal_dir, adapter_dir):
    jobs = [(adapter, prompt) for adapter in ["alpha", "beta", server.engine.base_name] for prompt in PROMPTS[:3]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: complete(server.url, *job), jobs))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for (adapter, prompt), reply in zip(jobs, replies):
        expected = offline(causal_dir, adapter_dir, "base" if adapter == server.engine.base_name else adapter, prompt)
        assert reply.json()["choices"][0]["text"] == expected, (adapter, prompt)
    assert server.engine.metrics()["mean_batch_size"] > 1  # they really shared forward passes


def test_chat_and_streaming(server, causal_dir, adapter_dir):
    body = {"model": "beta", "messages": [{"role": "user", "content": "the film was good"}], "max_tokens": 6,
            "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    text = reply["choices"][0]["message"]["content"]
    assert text == offline(causal_dir, adapter_dir, "beta", "the film was good", max_new_tokens=6, chat=True)
    assert reply["usage"]["completion_tokens"] <= 6
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    streamed = "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == text and json.loads(chunks[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_and_sampling(server):
    full = complete(server.url, "alpha", "the film was", max_tokens=12).json()["choices"][0]["text"]
    words = full.split()
    if len(words) > 2:
        cut = complete(server.url, "alpha", "the film was", max_tokens=12, stop=[words[2]]).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and words[2] not in cut["text"] and full.startswith(cut["text"])
    seeded = [complete(server.url, "alpha", "the plot", temperature=1.5, top_p=0.9, seed=3).json()["choices"][0]["text"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "prompt": "the"}, 404, "unknown model 'nope'"),
    ({"model": "alpha", "prompt": "the", "max_tokens": 999}, 400, "max_tokens must be between 1 and 32"),
    ({"model": "alpha", "prompt": "the " * 60}, 400, "the limit is 40"),
    ({"model": "alpha"}, 400, "prompt"),
    ({"model": "alpha", "prompt": "the", "temperature": -1}, 400, "temperature"),
    ({"model": "alpha", "prompt": "x" * 5000}, 413, "exceeds the limit"),
])
def test_bad_requests_get_4xx_with_a_message(server, body, status, message):
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == status and message in reply.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30).status_code == 400


def test_adapters_load_only_from_the_adapter_dir(server, adapter_dir, tmp_path):
    import shutil

    shutil.copytree(adapter_dir / "gamma", tmp_path / "outside")  # a real adapter, outside the directory
    os.symlink(tmp_path / "outside", adapter_dir / "sneaky")
    for name, status in [("../alpha", 400), ("a/b", 400), ("/etc", 400), ("sneaky", 403), ("missing", 404)]:
        reply = httpx.post(f"{server.url}/v1/adapters", json={"name": name})
        assert reply.status_code == status, (name, reply.text)
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "gamma"}).status_code == 200
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "gamma"}).status_code == 409
    assert complete(server.url, "gamma", "the film").status_code == 200
    assert httpx.delete(f"{server.url}/v1/adapters/gamma").status_code == 200
    assert complete(server.url, "gamma", "the film").status_code == 200  # named again: loaded on demand
    assert httpx.delete(f"{server.url}/v1/adapters/gamma").status_code == 200
    assert httpx.delete(f"{server.url}/v1/adapters/gamma").status_code == 404
    for name in ("missing", "sneaky", "../alpha"):  # not a servable adapter of the directory
        assert complete(server.url, name, "the film").status_code == 404


def test_unloading_waits_for_running_requests(server):
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "gamma"}).status_code == 200
    engine = server.engine
    engine.model_lock.acquire()  # hold the worker so the request is surely in flight
    results = {}
    worker = threading.Thread(target=lambda: results.update(reply=complete(server.url, "gamma", "the plot", max_tokens=4)))
    worker.start()
    while engine.pool.in_use.get("gamma", 0) == 0:
        time.sleep(0.01)
    deleting = threading.Thread(target=lambda: results.update(deleted=httpx.delete(f"{server.url}/v1/adapters/gamma", timeout=60)))
    deleting.start()
    time.sleep(0.3)
    assert "deleted" not in results  # still waiting for the request
    engine.model_lock.release()
    worker.join(30)
    deleting.join(30)
    assert results["reply"].status_code == 200 and results["deleted"].status_code == 200
    assert "gamma" not in engine.adapters


@pytest.mark.slow
def test_queue_full_answers_429(server):
    engine = server.engine
    engine.model_lock.acquire()  # the worker stalls: requests pile up in the queue (limit 64)
    with ThreadPoolExecutor(100) as pool:
        futures = [pool.submit(complete, server.url, "alpha", "the", max_tokens=1) for _ in range(100)]
        deadline = time.time() + 30
        while sum(f.done() for f in futures) < 100 - 64 - engine.limits.max_batch and time.time() < deadline:
            time.sleep(0.05)
        engine.model_lock.release()
        replies = [f.result() for f in futures]
    codes = [r.status_code for r in replies]
    assert 429 in codes and set(codes) <= {200, 429}
    assert "queue is full" in next(r for r in replies if r.status_code == 429).json()["error"]["message"]


def test_classifier_server(classifier_dir, tmp_path):
    model = lk.inject(AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=2),
                      lk.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_lora(model)
    lk.save_adapter(model, tmp_path / "senti")
    (tmp_path / "senti" / "lorakit_run.json").write_text(json.dumps({"task": "classify", "labels": ["neg", "pos"]}))
    engine = build_engine(classifier_dir, {"senti": tmp_path / "senti"})
    with BackgroundServer(engine) as running:
        reply = httpx.post(f"{running.url}/v1/classify", json={"model": "senti", "input": ["good film", "bad"]}).json()
        assert [set(d["probabilities"]) for d in reply["data"]] == [{"neg", "pos"}] * 2
        assert httpx.post(f"{running.url}/v1/completions", json={"model": "senti", "prompt": "x"}).status_code == 400



def test_trainable_token_adapters_share_batches_and_equal_offline(causal_dir, adapter_dir, tmp_path):
    """An adapter that trains embedding rows (trainable tokens, tied or not: this base is untied) is
    served in the same batches as plain LoRA adapters and the base, each row with its own rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    ids = tokenizer.convert_tokens_to_ids(["film", "good", "the", "<|im_end|>"])
    model = AutoModelForCausalLM.from_pretrained(causal_dir)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj"],
                                   trainable_token_indices={"embed_tokens": ids, "lm_head": ids}))
    randomize_lora(model, scale=0.8, seed=11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_(0, 2.0)
    lk.save_adapter(model, tmp_path / "tokens")
    (tmp_path / "alpha").symlink_to(adapter_dir / "alpha")
    big = AutoModelForCausalLM.from_pretrained(causal_dir)  # an adapter for a larger vocabulary
    big.resize_token_embeddings(big.config.vocab_size + 4)
    lk.inject(big, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[big.config.vocab_size - 1]))
    lk.save_adapter(big, tmp_path / "grown")
    engine = build_engine(causal_dir, {"tokens": tmp_path / "tokens", "alpha": tmp_path / "alpha"},
                          adapter_dir=str(tmp_path))
    with BackgroundServer(engine) as running:
        jobs = [(adapter, prompt) for adapter in ["tokens", "alpha", engine.base_name] for prompt in PROMPTS[:3]]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: complete(running.url, *job), jobs))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        texts = {}
        for (adapter, prompt), reply in zip(jobs, replies):
            name = "base" if adapter == engine.base_name else adapter
            texts[adapter, prompt] = reply.json()["choices"][0]["text"]
            assert texts[adapter, prompt] == offline(causal_dir, tmp_path, name, prompt), (adapter, prompt)
        assert any(texts["tokens", p] != texts[engine.base_name, p] for p in PROMPTS[:3])
        refused = complete(running.url, "grown", "the film was")
        assert refused.status_code == 422 and "outside" in refused.json()["error"]["message"]
