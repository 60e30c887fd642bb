"""`--report-to mlflow,wandb`: each run read back with the tracker's own reader (MLflow's client; the
W&B offline run file's records, parsed with wandb's protobuf schema)."""

import json
import struct
from pathlib import Path

import pytest

from lorakit.errors import ConfigError
from lorakit.training.loop import train
from lorakit.training.options import resolve_options
from lorakit.training.trackers import check_trackers, tracker_names


def steps_logged(output: Path) -> list[dict]:
    entries = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [e for e in entries if "lr" in e]


def sft_run(causal_dir, sft_jsonl, output, **extra):
    options = dict(model=causal_dir, data=sft_jsonl, task="sft", output=str(output), max_steps=4, batch_size=4,
                   seq_len=32, warmup_steps=1, eval_steps=2)
    return train(resolve_options(None, {**options, **extra}), quiet=True)


def test_report_to_takes_commas_spaces_all_and_none():
    assert tracker_names("tensorboard, mlflow wandb") == ("tensorboard", "mlflow", "wandb")
    assert tracker_names(["mlflow", "mlflow"]) == ("mlflow",)
    assert tracker_names("none") == () and tracker_names(None) == ()
    assert tracker_names("all") == ("tensorboard", "mlflow", "wandb")


def test_a_tracker_not_installed_names_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package: pip install 'lorakit\[wandb\]'"):
        check_trackers("mlflow,wandb")


def test_mlflow_run_has_the_options_every_step_and_the_files(causal_dir, sft_jsonl, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    summary = sft_run(causal_dir, sft_jsonl, out, report_to="mlflow")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["task"] == "sft" and run.data.params["max_steps"] == "4" and run.data.params["r"] == "8"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([e["loss"] for e in steps_logged(out)], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    [test_loss] = client.get_metric_history(run.info.run_id, "test/loss")  # at the run's last step
    assert test_loss.step == 4 and test_loss.value == pytest.approx(summary["test"]["loss"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "loss_curve.png", "summary.json"} <= files
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter


def test_mlflow_honours_the_tracking_uri(causal_dir, sft_jsonl, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "elsewhere").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    sft_run(causal_dir, sft_jsonl, tmp_path / "run", report_to="mlflow", max_steps=2)
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store)
    assert len(client.search_runs([client.get_experiment_by_name("mine").experiment_id])) == 1


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): a 7-byte header, then 32 KiB blocks of chunks
    (checksum, length, kind) that join into protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_has_the_options_every_step_and_the_summary(causal_dir, sft_jsonl, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    summary = sft_run(causal_dir, sft_jsonl, out, report_to="wandb")
    [log_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline by default: nothing uploaded
    config, history, final = {}, [], {}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        items = {"run": lambda: record.run.config.update, "config": lambda: record.config.update}.get(kind)
        if items:
            config.update({i.key: json.loads(i.value_json) for i in items()})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            final.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
    assert config["task"] == "sft" and config["max_steps"] == 4
    train_rows = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train_rows] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in train_rows] == pytest.approx([e["loss"] for e in steps_logged(out)], rel=1e-6)
    assert json.loads(final["test/loss"]) == pytest.approx(summary["test"]["loss"])
