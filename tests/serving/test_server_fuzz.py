"""Property test: malformed and random bodies never get a 5xx, and the server stays up."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow  # subprocesses / real models: `pytest -m "not slow"` skips them

ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/adapters"]
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
plausible = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["alpha", "beta", "nope", "../x", ""]) | values,
    "prompt": st.text(max_size=40) | values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", ""]) | values,
                                                "content": st.text(max_size=30) | values}), max_size=3) | values,
    "max_tokens": st.integers(-5, 100) | values, "temperature": st.floats(-1, 10) | values,
    "top_p": st.floats(-1, 2) | values, "stop": st.lists(st.text(max_size=70), max_size=6) | values,
    "stream": st.booleans() | values, "seed": st.integers(-1, 2**64) | values, "input": values, "name": values,
})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), body=plausible | values, raw=st.binary(max_size=60) | st.none())
def test_no_5xx_for_any_body(server, endpoint, body, raw):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=60) as client:
        content = raw if raw is not None else json.dumps(body).encode()  # NaN/Infinity included, as sloppy clients send
        reply = client.post(endpoint, content=content, headers={"content-type": "application/json"})
        assert reply.status_code < 500, (endpoint, body, raw, reply.text)
        if isinstance(body, dict) and body.get("stream") is True and reply.status_code == 200:
            assert reply.text.rstrip().endswith("data: [DONE]")
        assert client.get("/health").status_code == 200
