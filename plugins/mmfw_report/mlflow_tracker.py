"""``mlflow``: one MLflow run per mmfw run (named ``run.name``, in ``experiment``): the
resolved recipe as params, every row as metrics at its step, the run's files as artifacts
(recipe.toml, metrics.json, warnings.jsonl, plots/, profile/).

Through ``mlflow.tracking.MlflowClient`` (no global active run, so a user's own
``mlflow.start_run`` is left alone). MLflow's metric names allow letters, digits and
``_-./ :``; ``@`` becomes ``_at_`` (``eval/test/i2t_R_at_1``), other characters ``_``, and a
``/`` inside a row's key ``.`` (``train/loss.infonce``, ``train/time.data_s``: a metric
cannot be both a name and a folder of the file store). On ``--resume`` the
same MLflow run continues (its id is checkpointed); its params are those of the first start.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import attrs

from mmfw.spi import RunContext, option

from .tracker import Tracker, flatten, needs, run_files

_BAD = re.compile(r"[^\w\-./ :]")


def metric_name(key: str) -> str:
    return _BAD.sub("_", key.replace("@", "_at_"))


@attrs.frozen
class MLflowOptions:
    """``[report.mlflow]``."""

    tracking_uri: str = option("", doc="where runs are stored: '' = MLflow's own default "
                               "(MLFLOW_TRACKING_URI, else its local default); e.g. "
                               "'file:runs/mlruns' (a folder), 'sqlite:///mlflow.db', "
                               "'http://host:5000' (a tracking server)")
    experiment: str = option("mmfw", doc="experiment name (made when missing)")


class MLflow(Tracker):
    key_sep = "."  # train/loss and train/loss.infonce: a file store holds both

    def __init__(self, options: MLflowOptions) -> None:
        super().__init__(options)
        self.client: Any = None

    def open(self, ctx: RunContext, resumed: bool) -> None:
        uri = self.options.tracking_uri or None
        if uri and uri.startswith(("file:", "/", ".", "~")):
            # asked for a folder: MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if resumed:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "mmfw.resumed_at_step", str(ctx.step))
            return
        name = self.options.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # made meanwhile by another run
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=ctx.recipe.run.name,
                                     tags={"mmfw.run_dir": str(ctx.run_dir)})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(metric_name(k), str(v)[:6000])
                  for k, v in flatten(ctx.recipe.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float], row: dict[str, Any]) -> None:
        if not values:
            return
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(metric_name(k), v, ms, step) for k, v in values.items()])

    def close(self, ctx: RunContext | None, status: str) -> None:
        if ctx is not None:
            for path, folder in run_files(ctx):
                self.client.log_artifact(self.run_id, str(path), folder or None)
        self.client.set_terminated(self.run_id, status=status)


def mlflow_tracker(options: MLflowOptions) -> MLflow:
    """Logs the run to MLflow (``run.report_to = ["mlflow"]``)."""
    return MLflow(options)


mlflow_tracker.Options = MLflowOptions  # type: ignore[attr-defined]
mlflow_tracker.section = "report.mlflow"  # type: ignore[attr-defined]
mlflow_tracker.why_unavailable = needs("mlflow", "mlflow", "mlflow")  # type: ignore[attr-defined]
