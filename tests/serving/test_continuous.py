"""Continuous batching: requests join a running batch, long prompts are prefilled in chunks between
decoding steps, and every greedy reply stays equal to offline `generate` with its adapter."""

import threading
import time

import pytest

from lorakit.serving import engine as engine_module
from lorakit.serving.requests import Request
from tests.helpers import Recorder, make_engine, offline, submit

LONG = "the film was really good and the plot was very dull but the actor is quite lovely " * 3


def record_tokens(engine, events):
    count = engine.prometheus.token  # the hook every generated token passes through

    def token(request):
        events.append((request.sink.name, "token", time.perf_counter()))
        count(request)
    engine.prometheus.token = token


@pytest.fixture
def engine(causal_dir, adapter_dir):  # noqa: F811
    engine = make_engine(causal_dir, adapter_dir, prefill_chunk=4)
    yield engine
    engine.close()


def wait_for_tokens(recorder, count):
    deadline = time.monotonic() + 60
    while len(recorder.times("token")) < count and not recorder.finished.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_newcomers_join_the_running_batch_and_match_offline(engine, causal_dir, adapter_dir):  # noqa: F811
    events = []
    record_tokens(engine, events)
    jobs = {"first": ("alpha", "the film was", 40), "long": ("beta", LONG, 6), "short": ("base", "a movie is very", 3)}
    first = submit(engine, "first", *jobs["first"], events)
    wait_for_tokens(first, 1)
    recorders = [first] + [submit(engine, name, *jobs[name], events) for name in ("long", "short")]
    for recorder in recorders:
        assert recorder.finished.wait(60) and recorder.error is None, recorder.error
        adapter, prompt, max_tokens = jobs[recorder.name]
        assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=max_tokens)
    assert engine.scheduler == "continuous"
    assert first.result["completion_tokens"] == 40, "pick a prompt the tiny model does not end early"
    # the newcomers were answered while the first request was still decoding, not after it
    assert max(recorders[1].times("done") + recorders[2].times("done")) < first.times("done")[0]
    # and the first request kept producing tokens between their arrival and their answers
    arrived = recorders[1].times("token")[0]
    assert sum(arrived < t < recorders[1].times("done")[0] for t in first.times("token")) >= 3


def test_a_long_prompt_is_prefilled_in_chunks_between_decoding_steps(engine):
    events = []
    record_tokens(engine, events)
    running = submit(engine, "running", "alpha", "the film was", 40, events)
    wait_for_tokens(running, 2)
    arrived = time.perf_counter()
    newcomer = submit(engine, "newcomer", "beta", LONG, 2, events)
    assert newcomer.finished.wait(60) and running.finished.wait(60)
    chunks = -(-len(engine.tokenizer(LONG)["input_ids"]) // engine.prefill_chunk)
    first_token = newcomer.times("token")[0]
    assert first_token < running.times("done")[0], "the newcomer waited for the running request to end"
    during_prefill = sum(arrived < t < first_token for t in running.times("token"))
    # one decoding step per prompt chunk (the first chunk may start before the step it precedes)
    assert during_prefill >= chunks - 1 >= 10


def test_a_long_prompt_alone_is_prefilled_in_one_forward(engine, causal_dir, adapter_dir):  # noqa: F811
    """Chunks only make room for other requests: with none running, waiting or queued, the whole
    prompt goes in one forward, and the reply is the same."""
    widths = []
    hook = engine.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        events = []
        alone = submit(engine, "alone", "beta", LONG, 3, events)
        assert alone.finished.wait(60) and alone.error is None, alone.error
    finally:
        hook.remove()
    prompt_tokens = len(engine.tokenizer(LONG)["input_ids"])
    assert prompt_tokens > 10 * engine.prefill_chunk
    assert widths[0] == prompt_tokens and sorted(set(widths[1:])) == [1], widths
    assert alone.result["text"] == offline(causal_dir, adapter_dir, "beta", LONG, max_new_tokens=3)


def test_short_prompts_start_while_a_long_one_is_prefilled_and_long_ones_reuse_prefixes(engine, causal_dir,
                                                                                          adapter_dir):  # noqa: F811
    """A short prompt arriving during a long prompt's chunks is answered first (the long one is
    parked, not restarted); a second long prompt with the same start takes its first blocks from the
    prefix cache; every reply equals offline generate."""
    events = []
    record_tokens(engine, events)
    long_one, short = Recorder("long", events), Recorder("short", events)
    engine.submit_all([Request("generate", "beta", engine.tokenizer(LONG)["input_ids"], long_one, max_new_tokens=3),
                       Request("generate", "alpha", engine.tokenizer("a movie is very")["input_ids"], short,
                               max_new_tokens=3)])  # the long one is first in line
    assert short.finished.wait(60) and long_one.finished.wait(60)
    assert short.error is None and long_one.error is None
    chunks = -(-len(engine.tokenizer(LONG)["input_ids"]) // engine.prefill_chunk)
    assert chunks >= 10 and short.times("token")[0] < long_one.times("token")[0]
    again = submit(engine, "again", "beta", LONG + "and the music", 3, events)
    assert again.finished.wait(60) and again.error is None
    assert engine.metrics()["prefix_cache"]["hit_tokens"] >= 16
    for recorder, (adapter, prompt) in ((long_one, ("beta", LONG)), (short, ("alpha", "a movie is very")),
                                        (again, ("beta", LONG + "and the music"))):
        assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=3)


def test_short_prompts_behind_long_ones_are_not_held_up(engine, causal_dir, adapter_dir):  # noqa: F811
    """Two long prompts first in line, a short one behind them: the short one starts at once (the long
    ones keep their order for their chunks), not after the first long prompt's last chunk."""
    events = []
    record_tokens(engine, events)
    first, second, short = (Recorder(name, events) for name in ("first", "second", "short"))
    engine.submit_all([Request("generate", "beta", engine.tokenizer(LONG)["input_ids"], first, max_new_tokens=3),
                       Request("generate", "alpha", engine.tokenizer(LONG + "and so")["input_ids"], second,
                               max_new_tokens=3),
                       Request("generate", "alpha", engine.tokenizer("a movie is very")["input_ids"], short,
                               max_new_tokens=3)])
    assert all(r.finished.wait(60) and r.error is None for r in (first, second, short))
    assert short.times("token")[0] < first.times("token")[0] < second.times("token")[0]
    for recorder, (adapter, prompt) in ((first, ("beta", LONG)), (second, ("alpha", LONG + "and so")),
                                        (short, ("alpha", "a movie is very"))):
        assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=3)


def test_static_scheduler_gives_the_same_replies(causal_dir, adapter_dir):  # noqa: F811
    replies = {}
    for scheduler in ("static", "continuous"):
        engine = make_engine(causal_dir, adapter_dir, scheduler=scheduler)
        try:
            events = []
            recorders = [submit(engine, f"r{i}", adapter, prompt, 8, events) for i, (adapter, prompt) in
                         enumerate([("alpha", "the plot"), ("beta", LONG), ("base", "review :"), ("alpha", "a movie is")])]
            for recorder in recorders:
                assert recorder.finished.wait(60) and recorder.error is None
            replies[scheduler] = [r.result for r in recorders]
            assert engine.scheduler == scheduler
        finally:
            engine.close()
    assert replies["static"] == replies["continuous"]


def test_models_the_slot_cache_does_not_fit_are_served_statically(causal_dir, adapter_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_module, "slot_cache_fits", lambda model, max_length: False)
    engine = make_engine(causal_dir, adapter_dir)
    try:
        recorder = submit(engine, "r", "alpha", "the plot", 4, [])
        assert recorder.finished.wait(60) and recorder.error is None
        assert engine.scheduler == "static"
    finally:
        engine.close()


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(engine, causal_dir, adapter_dir):  # noqa: F811
    forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the middle of the first request's decoding
            raise RuntimeError("simulated device error")
        return forward(*args, **kwargs)
    engine.model.forward = flaky
    broken = submit(engine, "broken", "alpha", "the plot", 10, [])
    assert broken.finished.wait(60)
    assert broken.error is not None and broken.error.status == 500 and "simulated device error" in str(broken.error)
    fine = submit(engine, "fine", "beta", "the film was", 5, [])
    assert fine.finished.wait(60) and fine.error is None
    assert fine.result["text"] == offline(causal_dir, adapter_dir, "beta", "the film was", max_new_tokens=5)
    assert engine.metrics()["failed"] == 1


def test_a_request_that_does_not_stream_gets_only_its_answer(engine, causal_dir, adapter_dir):  # noqa: F811
    """Non-streaming requests get no delta events (no per-token work for text nobody reads), the
    same text, and still stop at their stop strings."""
    expected = offline(causal_dir, adapter_dir, "alpha", "the film was", max_new_tokens=12)
    for stop in ([], [expected[3:6]]):
        events = []
        recorder = Recorder("quiet", events)
        engine.submit(Request("generate", "alpha", engine.tokenizer("the film was")["input_ids"], recorder,
                              max_new_tokens=12, stop=stop, stream=False))
        assert recorder.finished.wait(60) and recorder.error is None
        assert [kind for _, kind, _ in events] == ["done"]
        assert recorder.result["text"] == (expected[:expected.find(stop[0])] if stop else expected)


def test_a_request_naming_the_base_by_its_public_name_is_refused_not_spun_on(engine):
    """Engine.submit takes resolved names (check_model maps the base's name to BASE); given the
    public name it answers at once with what to do instead of looping."""
    from lorakit.serving.requests import ServingError

    ids = engine.tokenizer("the film was")["input_ids"]
    with pytest.raises(ServingError, match="check_model"):
        engine.submit(Request("generate", engine.base_name, ids, lambda kind, value: None, max_new_tokens=2))
    assert engine.waiting() == 0


def test_two_workers_decode_at_once_and_every_reply_matches_offline(causal_dir, adapter_dir):  # noqa: F811
    """Each worker its own batches over the one model (DoRA and plain LoRA rows, base rows); an
    adapter loaded while both decode joins without a wrong token anywhere."""
    engine = make_engine(causal_dir, adapter_dir, workers=2)
    workers_seen = set()
    count = engine.prometheus.token

    def token(request):
        workers_seen.add(threading.current_thread().name)
        count(request)
    engine.prometheus.token = token
    prompts = ["the film was", "a movie is very", "the actor is", "the plot was very dull and"]
    jobs = [(f"job{i}", adapter, prompt, 12) for i, (adapter, prompt) in
            enumerate((a, p) for a in ("alpha", "beta", "base") for p in prompts)]
    try:
        events = []
        recorders = [submit(engine, *job, events) for job in jobs]
        wait_for_tokens(recorders[0], 2)
        engine.pool.add_start_adapter("gamma", adapter_dir / "gamma")  # takes the model lock alone
        late = [(f"late{i}", "gamma", prompt, 12) for i, prompt in enumerate(prompts)]
        recorders += [submit(engine, *job, events) for job in late]
        for recorder, (name, adapter, prompt, max_tokens) in zip(recorders, jobs + late):
            assert recorder.finished.wait(60) and recorder.error is None, recorder.error
            assert recorder.result["text"] == offline(causal_dir, adapter_dir, adapter, prompt, max_new_tokens=max_tokens), name
        assert workers_seen == {"lorakit-engine", "lorakit-engine-1"}
        assert engine.metrics()["kv_cache"]["slots"] == engine.limits.max_batch  # 8 + 8
    finally:
        engine.close()


def test_workers_are_checked():
    from lorakit.errors import ConfigError
    from lorakit.serving.server import resolve_workers

    assert resolve_workers("3", "continuous", 16)[0] == 3
    assert resolve_workers("auto", "static", 16)[0] == 1
    for value, scheduler, message in (("0", "continuous", "at least 1"), ("two", "continuous", "whole number"),
                                      ("2", "static", "continuous"), ("20", "continuous", "max-batch")):
        with pytest.raises(ConfigError, match=message):
            resolve_workers(value, scheduler, 16)
