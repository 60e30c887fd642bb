"""Prefix caching and batched prefill in the continuous scheduler: shared prompt prefixes are
computed once per adapter and reused, prompts of other lengths and starts are prefilled together,
and every greedy reply still equals offline `generate` with its adapter."""

import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.serving import BackgroundServer, Limits, build_engine
from lorakit.serving.prefill_groups import PADDING, length_groups
from lorakit.serving.prefix_cache import BLOCK, PrefixCache
from lorakit.serving.requests import Request
from lorakit.serving.slot_cache import GROWTH, SlotCache, cache_keyword
from tests.helpers import offline

SHARED = "the film was really good and the plot was very dull but the actor is quite lovely and "
ENDINGS = ["the music", "a movie is very", "the story was bad", "lovely", "the actor is quite dull and the plot"]


def run_all(engine, jobs, max_tokens=8):
    """Submit (adapter, prompt) jobs at once; their replies in order."""
    results, done = [None] * len(jobs), [threading.Event() for _ in jobs]

    def sink_for(i):
        def sink(kind, payload):
            if kind in ("done", "error"):
                results[i] = payload
                done[i].set()
        return sink
    requests = [Request("generate", engine.check_model(engine.base_name if a == "base" else a),
                        engine.tokenizer(p)["input_ids"], sink_for(i), max_new_tokens=max_tokens)
                for i, (a, p) in enumerate(jobs)]
    engine.submit_all(requests)
    assert all(event.wait(120) for event in done)
    assert all(isinstance(r, dict) for r in results), results
    return [r["text"] for r in results]


@pytest.fixture
def make(causal_dir, adapter_dir):
    made = []

    def build(**kw):
        engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha", "gamma": adapter_dir / "gamma"},
                              adapter_dir=str(adapter_dir), limits=Limits(max_new_tokens=16, max_prompt_tokens=100), **kw)
        made.append(engine)
        return engine
    yield build
    for engine in made:
        engine.close()


def test_shared_prefixes_are_reused_per_adapter_and_replies_match_offline(make, causal_dir, adapter_dir):
    engine = make()
    jobs = [(adapter, SHARED + ending) for adapter in ("alpha", "base", "gamma") for ending in ENDINGS]
    first = run_all(engine, jobs[:1])  # one prompt per adapter is cached first ...
    first += run_all(engine, [jobs[5], jobs[10]])
    stats = engine.metrics()["prefix_cache"]
    assert stats["hit_tokens"] == 0  # three adapters: keys and values of one never serve another
    rest = run_all(engine, [j for i, j in enumerate(jobs) if i not in (0, 5, 10)])  # ... then reused
    shared_blocks = len(engine.tokenizer(SHARED)["input_ids"]) // BLOCK
    assert shared_blocks >= 1
    stats = engine.metrics()["prefix_cache"]
    assert stats["hit_tokens"] >= 12 * shared_blocks * BLOCK
    texts = dict(zip([jobs[0], jobs[5], jobs[10]], first))
    texts.update(zip([j for i, j in enumerate(jobs) if i not in (0, 5, 10)], rest))
    for adapter, prompt in jobs:
        assert texts[(adapter, prompt)] == offline(causal_dir, adapter_dir, adapter, prompt), (adapter, prompt)


def test_without_the_cache_replies_are_the_same_and_nothing_hits(make):
    jobs = [(adapter, SHARED + ending) for adapter in ("alpha", "base") for ending in ENDINGS]
    cached = make()
    run_all(cached, jobs[:1])
    with_cache = run_all(cached, jobs)
    plain = make(prefix_cache_mb=0)
    assert run_all(plain, jobs) == with_cache
    assert cached.metrics()["prefix_cache"]["hit_tokens"] > 0
    assert plain.metrics()["prefix_cache"]["hit_tokens"] == 0


def test_a_reloaded_adapter_never_meets_its_old_entries(make, adapter_dir):
    engine = make()
    run_all(engine, [("alpha", SHARED + ENDINGS[0])])
    engine.pool.unload("alpha")
    engine.pool.add_start_adapter("alpha", adapter_dir / "gamma")  # same name, other weights
    before = engine.metrics()["prefix_cache"]["hit_tokens"]
    run_all(engine, [("alpha", SHARED + ENDINGS[1])])
    assert engine.metrics()["prefix_cache"]["hit_tokens"] == before


def test_hit_rate_is_in_metrics(causal_dir, adapter_dir):
    engine = build_engine(causal_dir, {"alpha": adapter_dir / "alpha"}, limits=Limits(max_new_tokens=8))
    with BackgroundServer(engine) as server:
        for ending in ENDINGS[:3]:
            body = {"model": "alpha", "prompt": SHARED + ending, "max_tokens": 2, "temperature": 0}
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        stats = httpx.get(f"{server.url}/v1/stats", timeout=10).json()
    rate = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("lorakit_prefix_cache_hit_rate")))
    hits = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("lorakit_prefix_cache_hits_total")))
    assert 0 < rate < 1 and hits > 0
    assert stats["prefix_cache"]["hit_rate"] == pytest.approx(rate, abs=1e-3)


def test_prefix_cache_evicts_least_recently_used_and_never_caches_the_last_token():
    block = torch.zeros(2, 1, 1, BLOCK, 1)
    size = block.numel() * block.element_size()
    cache = PrefixCache(max_bytes=2 * size)
    prompt = list(range(3 * BLOCK + 1))
    assert cache.missing("a", prompt) == [0, BLOCK, 2 * BLOCK]
    assert cache.missing("a", prompt[:BLOCK]) == []  # the only block holds the last token
    for start in cache.missing("a", prompt):
        cache.add("a", prompt, start, block + start)
    assert cache.bytes == 2 * size  # the first block went
    assert cache.lookup("a", prompt) == []  # a hit needs every block from the start
    cache.add("a", prompt, 0, block)  # evicts the least recently used: the block at BLOCK
    assert [int(b.flatten()[0]) for b in cache.lookup("a", prompt)] == [0]
    cache.add("a", prompt, BLOCK, block + BLOCK)  # now the block at 2 * BLOCK goes: 0 was just used
    assert [int(b.flatten()[0]) for b in cache.lookup("a", prompt)] == [0, BLOCK]
    assert cache.lookup("b", prompt) == []


def test_shared_uncached_finds_each_longest_prefix_shared_by_two_or_more_once():
    cache = PrefixCache(max_bytes=2**20)
    system, other = list(range(2 * BLOCK)), list(range(100, 100 + 2 * BLOCK))
    prompts = [("a", system + [1] * BLOCK + [7]),   # shares 3 blocks with the next one
               ("a", system + [1] * BLOCK + [8, 9]),
               ("a", system + [2] * BLOCK + [7]),   # shares 2 blocks with the two above: contained in theirs
               ("b", system + [1] * BLOCK + [7]),   # another owner: alone
               ("a", other + [5]),                  # alone
               ("a", system[:BLOCK])]               # a single block holds its last token: never cached
    assert cache.shared_uncached(prompts) == [(0, 3 * BLOCK)]
    assert cache.shared_uncached(prompts[2:]) == []
    assert cache.shared_uncached([prompts[2], prompts[0], prompts[3]]) == [(0, 2 * BLOCK)]
    block = torch.zeros(1)
    for start in range(0, 3 * BLOCK, BLOCK):
        cache.add("a", prompts[0][1], start, block)
    assert cache.shared_uncached(prompts) == []  # cached already
    assert cache.lookup("a", prompts[1][1], end=2 * BLOCK, count=False) == [block, block]
    assert cache.queried == cache.hit == 0
    assert cache.missing("a", prompts[3][1], end=2 * BLOCK) == []
    assert PrefixCache(max_bytes=0).shared_uncached(prompts) == []


def test_a_burst_sharing_a_prefix_computes_it_once_and_replies_match_offline(make, causal_dir, adapter_dir):
    """Five prompts sharing their first blocks arrive at once: with nothing cached, the shared
    blocks are computed in a forward of their own and every prompt takes them from the cache."""
    engine = make()
    jobs = [(adapter, SHARED + ending) for adapter in ("alpha", "base") for ending in ENDINGS]
    texts = run_all(engine, jobs)
    ids = [engine.tokenizer(prompt)["input_ids"] for _, prompt in jobs]
    common = next(n for n in range(min(map(len, ids)) + 1) if n == min(map(len, ids)) or len({i[n] for i in ids}) > 1)
    assert common >= BLOCK
    assert engine.metrics()["prefix_cache"]["hit_tokens"] == len(jobs) * (common // BLOCK) * BLOCK
    for (adapter, prompt), text in zip(jobs, texts):
        assert text == offline(causal_dir, adapter_dir, adapter, prompt), (adapter, prompt)


def test_rows_with_different_starts_prefill_together(causal_dir):
    """Two prompts, one of them after 4 already-cached tokens, in one forward: each gives the logits
    of its own plain forward."""
    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    prompts = [list(range(3, 12)), list(range(20, 27))]
    with torch.inference_mode():
        cache = SlotCache(model.config, 2, torch.float32, torch.device("cpu"))
        keyword = {cache_keyword(model): cache}
        mask = cache.plan(slice(0, 1), torch.tensor([0]), 4)  # row 0's first 4 tokens, on their own
        model(input_ids=torch.tensor([prompts[0][:4]]), attention_mask=mask, position_ids=torch.arange(4)[None],
              use_cache=True, **keyword)
        fed = [prompts[0][4:], prompts[1]]
        width = max(map(len, fed))
        ids = torch.tensor([f + [f[-1]] * (width - len(f)) for f in fed])
        starts = torch.tensor([4, 0])
        mask = cache.plan(slice(0, 2), starts, width)
        out = model(input_ids=ids, attention_mask=mask, position_ids=starts[:, None] + torch.arange(width),
                    use_cache=True, **keyword).logits
        for row, prompt in enumerate(prompts):
            plain = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(out[row, len(fed[row]) - 1], plain, atol=1e-4, rtol=1e-4)


class _Fake:
    def __init__(self, ids):
        self.request = type("R", (), {"prompt_ids": ids})()


@pytest.mark.parametrize("lengths", [[5, 50, 6, 48, 7, 100, 5], [10] * 7, [1, 200]])
def test_length_groups_bound_padding_and_keep_everyone(lengths):
    newcomers = [_Fake([i % 3] * n) for i, n in enumerate(lengths)]
    groups = length_groups(newcomers)
    assert sorted(map(id, [a for g in groups for a in g])) == sorted(map(id, newcomers))
    for group in groups:
        real = sum(len(a.request.prompt_ids) for a in group)
        assert len(group) * max(len(a.request.prompt_ids) for a in group) <= PADDING * real
    same = [a for a in newcomers if len(a.request.prompt_ids) == 10]
    if len(same) > 1:
        assert len(groups) == 1


def test_the_slot_cache_reserves_what_the_limits_need_within_its_budget(causal_dir):  # noqa: F811
    config = AutoModelForCausalLM.from_pretrained(causal_dir).config
    cache = SlotCache(config, 4, torch.float32, torch.device("cpu"))
    per_column = 4 * cache.kv_heads * cache.head_dim * 2 * cache.num_layers * 4
    assert cache.reserve(10 * GROWTH * per_column, GROWTH + 1) == 2 * GROWTH  # rounded up: fits the budget
    assert all(buffer.shape[2] == 2 * GROWTH for buffer in cache.keys + cache.values)
    small = SlotCache(config, 4, torch.float32, torch.device("cpu"))
    assert small.reserve(GROWTH * per_column + 1, 5 * GROWTH) == GROWTH  # as much as the budget holds
    assert SlotCache(config, 4, torch.float32, torch.device("cpu")).reserve(per_column, 100) == 0  # too small: lazy


def test_a_started_engine_has_its_kv_cache_allocated_before_the_first_request(causal_dir, adapter_dir):  # noqa: F811
    engine = build_engine(causal_dir, {}, limits=Limits(max_new_tokens=8, max_prompt_tokens=300))
    try:
        deadline = time.monotonic() + 60
        while engine.metrics()["kv_cache"]["columns"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        kv = engine.metrics()["kv_cache"]
        assert kv["columns"] >= 308 and kv["slots"] == Limits().max_batch and kv["bytes"] > 0
        assert b"lorakit_kv_cache_bytes " in engine.prometheus.exposition()
    finally:
        engine.close()
