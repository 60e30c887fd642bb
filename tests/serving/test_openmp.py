"""The engine frees the OpenMP team of the thread that built it, and a worker frees its own when it goes
idle, so the teams that work spin."""

import os
import subprocess
import sys
import threading
import time

import pytest

from lorakit.serving import continuous
from tests.helpers import make_engine, submit


# Run in a fresh interpreter: in the test session other tests' threads (servers, tokenizers) may
# start or end between two counts, so the process's thread count would not be the team's alone.
_RELEASE_SCRIPT = """
import os, time, torch
from lorakit.serving.openmp import _libgomp, release_threads

def os_threads():
    return len(os.listdir("/proc/self/task"))

if _libgomp() is None:
    print("no-libgomp")
    raise SystemExit(0)
torch.set_num_threads(2)
x = torch.ones(1 << 22)
x.add_(1)  # a parallel region: the team's second thread exists from here on
before = os_threads()
assert release_threads()
deadline = time.monotonic() + 5
while os_threads() >= before and time.monotonic() < deadline:
    time.sleep(0.01)
released = os_threads()
x.add_(1)  # the next parallel region builds the team again
print(before, released, os_threads(), float(x[0]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_release_frees_the_calling_threads_openmp_team_and_torch_goes_on():
    done = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "no-libgomp":
        pytest.skip("torch does not run on libgomp here")
    before, released, rebuilt, value = done.stdout.split()
    assert int(released) < int(before)
    assert int(rebuilt) == int(before) and float(value) == 3.0


def test_a_worker_that_goes_idle_frees_its_openmp_team(causal_dir, adapter_dir, monkeypatch):  # noqa: F811
    """Otherwise its idle threads count against the team of the worker that next runs alone on
    every core, whose threads then sleep between operations (a lone 400-token prefill on SmolLM2
    ran 1.26-1.34x slower, BENCHMARKS.md)."""
    freed_by = []
    monkeypatch.setattr(continuous, "release_threads", lambda: freed_by.append(threading.current_thread().name))
    engine = make_engine(causal_dir, adapter_dir, workers=2)
    try:
        recorder = submit(engine, "lone", "base", "a movie is very", 2, [])
        assert recorder.finished.wait(60) and recorder.error is None
        deadline = time.monotonic() + 5
        while not any(name.startswith("lorakit-engine") for name in freed_by) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(name.startswith("lorakit-engine") for name in freed_by)
    finally:
        engine.close()
