"""The engine frees the OpenMP team of the thread that built it, so its workers' teams spin."""

import os
import time

import pytest
import torch

from lorakit.serving.openmp import _libgomp, release_threads


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_release_frees_the_calling_threads_openmp_team_and_torch_goes_on():
    if _libgomp() is None:
        pytest.skip("torch does not run on libgomp here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.ones(1 << 22)
        x.add_(1)  # a parallel region: the team's second thread exists from here on
        before = os_threads()
        assert release_threads()
        deadline = time.monotonic() + 5
        while os_threads() >= before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os_threads() < before
        x.add_(1)  # the next parallel region builds the team again
        assert float(x[0]) == 3.0 and os_threads() == before
    finally:
        torch.set_num_threads(threads)
