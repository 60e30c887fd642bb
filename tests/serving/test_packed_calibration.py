"""Packed-weight calibrations kept per machine: measured once, read back at the next start, only
new weight shapes measured, and a broken or unwritable file costing time, never a start."""

import json
import logging

import pytest
import torch
from torch import nn

from lorakit.kernels import packed_linear
from lorakit.serving import packed_calibration
from lorakit.serving.packed_calibration import machine_key, measured_steps

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="torch built without oneDNN")


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """The file in tmp_path, and each call of the real calibrate with the shapes it skipped."""
    monkeypatch.setattr(packed_calibration, "calibration_file", lambda: tmp_path / "packed-weights.json")
    seen, real = [], packed_linear.calibrate

    def recording(model, repeats=5, skip=frozenset()):
        seen.append(set(skip))
        return real(model, repeats=1, skip=skip)
    monkeypatch.setattr(packed_linear, "calibrate", recording)
    return seen


def model(*shapes):
    return nn.Sequential(*(nn.Linear(i, o) for i, o in shapes))  # each over CALIBRATE_MIN elements


def test_a_second_start_reads_what_the_first_measured(calls, tmp_path):
    first, how = measured_steps(model((320, 256)))
    assert how == f"measured now, kept in {tmp_path / 'packed-weights.json'}" and set(first) == {(320, 256)}
    kept = json.loads((tmp_path / "packed-weights.json").read_text())
    assert kept == {machine_key(): {"320x256": sorted(first[(320, 256)])}}
    second, how = measured_steps(model((320, 256)))
    assert second == first and how.startswith("as measured here before") and len(calls) == 2
    assert calls[1] == {(320, 256)}  # nothing measured the second time
    # a model with one shape more: only that one is measured, and both are kept
    third, _ = measured_steps(model((320, 256), (256, 320)))
    assert calls[2] == {(320, 256)} and set(third) == {(320, 256), (256, 320)}
    assert set(json.loads((tmp_path / "packed-weights.json").read_text())[machine_key()]) == {"320x256", "256x320"}


def test_other_threads_measure_again(calls):
    threads = torch.get_num_threads()
    measured_steps(model((320, 256)))
    torch.set_num_threads(threads + 1)
    try:
        measured_steps(model((320, 256)))
    finally:
        torch.set_num_threads(threads)
    assert calls == [set(), set()]


def test_a_broken_file_is_measured_over_and_an_unwritable_one_only_warns(calls, tmp_path, monkeypatch, caplog):
    path = tmp_path / "packed-weights.json"
    path.write_text("{not json")
    steps, how = measured_steps(model((320, 256)))
    assert how.startswith("measured now, kept") and machine_key() in json.loads(path.read_text())
    path.write_text(json.dumps({machine_key(): {"320x256": [3, "x"]}}))  # steps that are no row steps
    measured_steps(model((320, 256)))
    assert calls == [set(), set()]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(packed_calibration, "calibration_file", lambda: blocked / "packed-weights.json")
    with caplog.at_level(logging.WARNING, logger="lorakit.serving"):
        again, how = measured_steps(model((320, 256)))
    assert how == "measured now" and set(again) == {(320, 256)} and "could not keep" in caplog.text
