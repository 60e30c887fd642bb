"""Keep the engine's OpenMP threads spinning between operations.

torch's CPU kernels run in the OpenMP team of the thread that calls them, and GNU OpenMP (libgomp,
which torch's Linux wheels ship) lets a team's threads spin for a while after each parallel region,
so that the next one starts without a wake-up. It spins only while the process has no more OpenMP
threads than CPUs: the team the main thread built while it loaded the model counts against that, so
an engine thread's team on 2 cores slept and woke up around each of a forward's ~750 operations.
Measured here (SmolLM2-135M bf16, one 256-token forward, 2 threads): 108 ms on the main thread,
195 ms on another thread, 109 ms on another thread once the main thread's team was freed.

``release_threads()`` frees the calling thread's OpenMP threads (OpenMP 5's
``omp_pause_resource_all``); the next parallel region in that thread builds its team again. It does
nothing where the runtime is not libgomp or lacks the call.
"""

from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomp():
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
            library.omp_pause_resource_all.restype = ctypes.c_int
            return library
        except (OSError, AttributeError):
            continue
    return None


def release_threads() -> bool:
    """Free the calling thread's idle OpenMP threads; True if the runtime did."""
    library = _libgomp()
    return library is not None and library.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
