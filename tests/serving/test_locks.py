"""The model lock: forwards share it, an adapter change takes it alone and is not starved."""

import threading
import time

import pytest

from lorakit.serving.locks import ModelLock


def test_forwards_share_the_lock():
    lock, both_inside = ModelLock(), threading.Barrier(2)

    def forward():
        with lock.shared():
            both_inside.wait(timeout=10)  # raises if the second forward could not get in

    threads = [threading.Thread(target=forward) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not both_inside.broken


def test_a_change_waits_for_forwards_in_flight_and_stops_new_ones():
    lock, order = ModelLock(), []
    forward_in, release_forward = threading.Event(), threading.Event()

    def forward(name, hold=None):
        with lock.shared():
            order.append(f"{name} in")
            if hold:
                forward_in.set()
                release_forward.wait(10)
            order.append(f"{name} out")

    def change():
        with lock:
            order.append("change")

    first = threading.Thread(target=forward, args=("first", True))
    first.start()
    assert forward_in.wait(10)
    changer = threading.Thread(target=change)
    changer.start()
    time.sleep(0.1)  # the change is waiting now
    second = threading.Thread(target=forward, args=("second",))
    second.start()
    time.sleep(0.1)
    assert order == ["first in"], "neither the change nor a new forward may run while the first forward holds it"
    release_forward.set()
    for thread in (first, changer, second):
        thread.join(10)
    assert order == ["first in", "first out", "change", "second in", "second out"]


def test_acquire_and_release_are_the_exclusive_lock():
    lock = ModelLock()
    lock.acquire()
    got = threading.Event()
    thread = threading.Thread(target=lambda: (lock.shared().__enter__(), got.set()))
    thread.start()
    assert not got.wait(0.2)
    lock.release()
    assert got.wait(10)
    thread.join(10)
    with pytest.raises(RuntimeError, match="not held exclusively"):
        lock.release()
