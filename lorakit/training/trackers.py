"""Experiment trackers for `--report-to`: TensorBoard, MLflow and Weights & Biases.

Each tracker is imported only when a run asks for it (they are optional extras). A run gives every
tracker the same four calls: `start` (the resolved options as parameters), `scalars` (per step),
`finish` (the test metrics at the last step, and the run's files: adapter, loss curve, summary)
and `close`."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

from ..errors import ConfigError

# name -> (module that must be importable, the lorakit extra that installs it)
KNOWN = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def tracker_names(report_to) -> tuple[str, ...]:
    """`--report-to`'s trackers: a list, or one string separated by commas or spaces ("none": none,
    "all": every known tracker, as transformers' report_to)."""
    if report_to is None:
        return ()
    items = report_to if isinstance(report_to, (list, tuple)) else re.split(r"[,\s]+", str(report_to))
    names = [item.strip().lower() for item in items if item and item.strip()]
    if names == ["none"]:
        return ()
    if names == ["all"]:
        return tuple(KNOWN)
    return tuple(dict.fromkeys(names))  # in order, once each


def check_trackers(report_to) -> tuple[str, ...]:
    """The trackers, each known and installed, or a ConfigError naming what to change."""
    names = tracker_names(report_to)
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"unknown --report-to tracker {name!r}; known: {', '.join(KNOWN)} (or none), "
                              "separated by commas or spaces")
        module, extra = KNOWN[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install 'lorakit[{extra}]' "
                              f"(or pip install {module})")
    return names


def flat_params(options: dict) -> dict[str, str]:
    """Options as tracker parameters: strings, None as "None", lists joined."""
    return {key: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in options.items()}


def numeric_metrics(values: dict, prefix: str) -> dict[str, float]:
    """The plain numbers in a metrics dict (nested dicts flattened with '/'), for a tracker's summary."""
    out = {}
    for key, value in (values or {}).items():
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Scalars as TensorBoard event files under OUTPUT/tensorboard."""

    def __init__(self, output: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))

    def start(self, params: dict) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def finish(self, step: int, metrics: dict[str, float], files: list[Path]) -> None:
        self.scalars(step, metrics)

    def close(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run: MLFLOW_TRACKING_URI when set, else a local store in OUTPUT/mlruns
    (`mlflow ui --backend-store-uri OUTPUT/mlruns` shows it); experiment MLFLOW_EXPERIMENT_NAME or
    "lorakit"; the run named after the output directory."""

    def __init__(self, output: Path):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store only on request; a directory store needs no database
            # package and is what `mlflow ui` reads as it is
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=output.resolve().name).info.run_id

    def start(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow caps a parameter value's length; a long template is cut rather than failing the run
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat_params(params).items()])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, step: int, metrics: dict[str, float], files: list[Path]) -> None:
        if metrics:
            self.scalars(step, metrics)
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker:
    """A Weights & Biases run in OUTPUT/wandb, offline unless WANDB_MODE says otherwise (`wandb sync
    OUTPUT/wandb/offline-run-*` uploads it later); project WANDB_PROJECT or "lorakit"."""

    def __init__(self, output: Path):
        import wandb  # noqa: F401 - a missing package fails here, before training starts

        self.output, self.run = output, None

    def start(self, params: dict) -> None:
        import wandb

        # the options go in with the run itself: the run record is written when it starts, where a
        # config update made after init once went missing from an offline run's log (a CI run)
        output = self.output.resolve()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), dir=str(output), name=output.name,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new", config=params)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def finish(self, step: int, metrics: dict[str, float], files: list[Path]) -> None:
        import wandb

        self.run.summary.update(metrics)
        artifact = wandb.Artifact(f"{self.run.name}-files", type="model")
        for path in files:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            elif path.is_file():
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, ok: bool) -> None:
        if self.run is not None:  # None: the run failed before it started
            self.run.finish(exit_code=0 if ok else 1)


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def open_trackers(output: Path, report_to) -> list:
    return [TRACKERS[name](Path(output)) for name in check_trackers(report_to)]
