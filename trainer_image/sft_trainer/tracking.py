"""Experiment tracking in MLflow (rank 0): ``MlflowSink``, one of the training loop's sinks (``sinks.py``).

What a run records: the effective hyperparameters (effective batch, world size, data, model, LoRA, freezing)
as params; ``train_loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_second`` per optimizer step and
``eval_loss`` per evaluation as metrics; at the end the forgetting measurement (``general_loss_before``,
``general_loss_after``, ``forgetting``), best eval loss and throughput, the evaluation gates
(``gate_<metric>_base``, ``gate_<metric>_tuned``, ``evaluation_passed`` 1/0, the tag ``sft.evaluation``), the
tag ``sft.output_uri``, and ``metrics.json`` and ``loss.png`` as artifacts.

Promotion: with ``registeredModel`` set, the exported model becomes a new version of that registered model in
the Model Registry (created if missing), its source the model's location (``s3://.../model``), tagged
``sft.uid`` (the SFTJob's uid, the run id) and one ``sft.gate.<metric>`` per gate; the alias (``candidate``) is
moved to it only when every gate passed. A model the gates rejected (``rejected/model``) is registered without
the alias, so the registry keeps the record.

The run is started when the sink is made (so a run that fails before its first step is recorded as FAILED)
and ended by ``end`` once the output is durable (``run_hooks``: after the export, so the run can name its
URI); the loop's ``close`` leaves it open for that.

A failing tracking server never fails or slows training: calls run on a background thread with short HTTP
timeouts, every error is caught, and the first one becomes ``warning`` (logged, and reported so the
operator can raise a Warning Event). The run id is kept in ``.mlflow-run.json`` in the output folder, so a
restarted pod continues the same run and does not log the steps it redoes twice.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from sft_contract.messages import ProgressReport
from sft_contract.spec import MlflowSpec, TrainingSpec

from .sinks import EvalRecord, Sink, StepRecord

log = logging.getLogger("sft_trainer.tracking")

RUN_FILE = ".mlflow-run.json"
FLUSH_EVERY_S = 2.0
END_TIMEOUT_S = 60.0
STEP_METRICS = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "tokens_per_second": "tokens_per_second"}
END_METRICS = {
    "bestEvalLoss": "best_eval_loss", "generalLossBefore": "general_loss_before", "generalLossAfter": "general_loss_after",
    "forgetting": "forgetting", "tokensPerSecond": "tokens_per_second_mean", "trainSeconds": "train_seconds",
}


def run_params(spec: TrainingSpec, world_size: int) -> dict[str, str]:
    """The hyperparameters that shape the run, as MLflow params (pure)."""
    hp, ds = spec.hyperparameters, spec.dataset
    params: dict[str, Any] = {
        "model": spec.model.source, "model_revision": spec.model.revision,
        "train_data": ds.train.source, "validation_data": ds.validation.source if ds.validation else None,
        "validation_split": ds.effective_validation_split, "format": ds.format, "max_seq_length": ds.max_seq_length,
        "overlong": ds.overlong, "packing": ds.packing,
        "general_data": ds.general.source if ds.general else None,
        "general_mix_ratio": ds.general.mix_ratio if ds.general else 0.0,
        "general_held_out_rows": ds.general.held_out_rows if ds.general else 0,
        "learning_rate": hp.learning_rate, "num_epochs": hp.num_epochs, "max_steps": hp.max_steps,
        "per_device_batch_size": hp.per_device_batch_size, "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "world_size": world_size,
        "effective_batch_size": hp.per_device_batch_size * hp.gradient_accumulation_steps * world_size,
        "warmup_ratio": hp.warmup_ratio, "lr_scheduler": hp.lr_scheduler, "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm, "precision": hp.precision, "seed": hp.seed, "dropout": hp.dropout,
        "gradient_checkpointing": hp.gradient_checkpointing,
        "freeze_layers": spec.freeze_layers, "freeze_embeddings": spec.freeze_embeddings,
        "lora": spec.peft is not None, "output": spec.output.destination,
    }
    if spec.peft is not None:
        params.update({
            "lora_rank": spec.peft.rank, "lora_alpha": spec.peft.alpha, "lora_dropout": spec.peft.dropout,
            "lora_target_modules": ",".join(spec.peft.target_modules), "lora_merge": spec.peft.merge,
        })
    return {k: str(v) for k, v in params.items() if v is not None}


class MlflowSink(Sink):
    """One MLflow run. Every method returns at once and never raises; ``end`` waits (bounded) for the server."""

    def __init__(self, settings: MlflowSpec, out_dir: Path, params: dict[str, str], tags: dict[str, str] | None = None,
                 *, run_name: str | None = None):
        # Fail fast against a dead server instead of MLflow's minutes of retries (the user's env wins).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.settings = settings
        self.uri = settings.tracking_uri
        self.run_file = out_dir / RUN_FILE
        self.run_name = settings.run_name or run_name or os.environ.get("SFT_JOB_NAME") or "sft"
        self.run_id: str | None = None
        self.warning: str | None = None
        self.registered: tuple[str, str, str | None] | None = None  # (registered model, version, alias or None)
        self.last_step = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="sft-mlflow", daemon=True)
        self._client = None
        self._thread.start()
        self._queue.put(("start", params, tags or {}))

    # ------------------------------------------------------------ the sink

    def on_step(self, record: StepRecord, progress: ProgressReport) -> None:
        ts = int(time.time() * 1000)
        self._queue.put(("metrics", [(name, float(getattr(record, k)), record.step, ts) for k, name in STEP_METRICS.items()]))

    def on_eval(self, record: EvalRecord, progress: ProgressReport) -> None:
        self._queue.put(("metrics", [("eval_loss", float(record.eval_loss), record.step, int(time.time() * 1000))]))

    def end(self, metrics: dict[str, Any] | None, output_uri: str | None, *, status: str = "FINISHED",
            artifacts: list[Path] = (), timeout_s: float = END_TIMEOUT_S) -> None:
        """Final metrics, the output URI, artifacts, the run's status; waits up to ``timeout_s`` for the server."""
        self._queue.put(("end", metrics or {}, output_uri, status, list(artifacts)))
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._warn(f"MLflow at {self.uri} did not answer within {timeout_s:.0f} s; the run may be incomplete")

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        pending: list[tuple] = []
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=FLUSH_EVERY_S)
            except queue.Empty:
                item = "flush"
            if item is None:
                return
            if isinstance(item, tuple) and item[0] == "metrics":
                pending += item[1]
                if time.monotonic() - last_flush < FLUSH_EVERY_S and len(pending) < 500:
                    continue
                item = "flush"
            if item == "flush":
                if pending:
                    self._safely("log metrics", self._log_metrics, pending)
                    pending = []
                last_flush = time.monotonic()
                continue
            if pending:
                self._safely("log metrics", self._log_metrics, pending)
                pending = []
            if item[0] == "start":
                self._safely("start the run", self._start, *item[1:])
            elif item[0] == "end":
                self._safely("end the run", self._end, *item[1:])

    def _safely(self, what: str, fn, *args) -> None:
        if what != "start the run" and self.run_id is None:
            return  # no run: the warning was given when starting it
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never fail training
            self._warn(f"MLflow at {self.uri}: could not {what}: {type(e).__name__}: {_short(e)}; training goes on")

    def _warn(self, message: str) -> None:
        if self.warning is None:
            self.warning = message[:1024]
        log.warning("%s", message)

    def _start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        known = self._read_run_file()
        run_id = None
        if known.get("runId"):
            try:
                run = self._client.get_run(known["runId"])
                run_id = run.info.run_id
                self._client.update_run(run_id, status="RUNNING")
                self.last_step = int(known.get("lastStep", 0))
                log.info("MLflow: continuing run %s", run_id)
            except Exception:  # noqa: BLE001 - deleted or another server: start a new run
                run_id = None
        if run_id is None:
            exp_id = self._experiment_id(self.settings.experiment)
            run_id = self._client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
            self._client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
            log.info("MLflow: run %s in experiment %r at %s", run_id, self.settings.experiment, self.uri)
        else:
            self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.run_id = run_id
        self._write_run_file()

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing. Jobs starting together race to create it; the loser's
        RESOURCE_ALREADY_EXISTS means the other one did, so it is read again."""
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        try:
            return self._client.create_experiment(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(name).experiment_id

    def _log_metrics(self, items: list[tuple]) -> None:
        from mlflow.entities import Metric

        fresh = [m for m in items if m[2] > self.last_step or m[0] == "eval_loss"]
        for start in range(0, len(fresh), 1000):  # MLflow's batch limit
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, step, ts in fresh[start : start + 1000]])
        if fresh:
            self.last_step = max(self.last_step, max(m[2] for m in fresh))
            self._write_run_file()

    def _end(self, metrics: dict[str, Any], output_uri: str | None, status: str, artifacts: list[Path]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        step = int(metrics.get("steps") or self.last_step)
        ts = int(time.time() * 1000)
        final = [Metric(name, float(metrics[k]), ts, step) for k, name in END_METRICS.items() if isinstance(metrics.get(k), (int, float))]
        final += [Metric(name, value, ts, step) for name, value in gate_metrics(metrics.get("evaluation")).items()]
        params = [Param(k, str(metrics[src])) for k, src in (("precision_used", "precision"), ("total_steps", "totalSteps")) if metrics.get(src) is not None]
        tags = [RunTag("sft.output_uri", output_uri)] if output_uri else []
        if metrics.get("evaluation"):
            tags.append(RunTag("sft.evaluation", verdict(metrics["evaluation"])))
        self._client.log_batch(self.run_id, metrics=final, params=params, tags=tags)
        if self.settings.registered_model and status == "FINISHED" and metrics.get("outputModel"):
            self._safely_register(metrics)
        for path in artifacts:
            if path.is_file():
                try:
                    self._client.log_artifact(self.run_id, str(path))
                except Exception as e:  # noqa: BLE001 - artifacts are a convenience
                    self._warn(f"MLflow at {self.uri}: could not store {path.name}: {_short(e)}")
        self._client.set_terminated(self.run_id, status=status)

    def _safely_register(self, metrics: dict[str, Any]) -> None:
        try:
            self._register(metrics)
        except Exception as e:  # noqa: BLE001 - the model is trained and stored; say the registry failed
            self._warn(f"MLflow at {self.uri}: could not register the model as {self.settings.registered_model!r}: "
                       f"{type(e).__name__}: {_short(e)}")

    def _register(self, metrics: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        name = self.settings.registered_model
        try:
            self._client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = registry_tags(metrics)
        version = self._client.create_model_version(name, metrics["outputModel"], run_id=self.run_id, tags=tags)
        promoted = promotable(metrics)
        if promoted:
            self._client.set_registered_model_alias(name, self.settings.alias, version.version)
        self.registered = (name, version.version, self.settings.alias if promoted else None)
        log.info("MLflow: registered %s as %s version %s%s", metrics["outputModel"], name, version.version,
                 f", alias {self.settings.alias}" if promoted else " (no alias: an evaluation gate failed)")

    def _read_run_file(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return {}

    def _write_run_file(self) -> None:
        try:
            self.run_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.run_file.with_name(self.run_file.name + ".tmp")
            tmp.write_text(json.dumps({"runId": self.run_id, "trackingUri": self.uri, "lastStep": self.last_step}))
            os.replace(tmp, self.run_file)
        except OSError as e:
            log.debug("cannot write %s: %s", self.run_file, e)


def verdict(evaluation: dict[str, Any] | None) -> str:
    if not evaluation:
        return "none"
    return {True: "passed", False: "failed"}.get(evaluation.get("passed"), "unknown")


def gate_metrics(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """The gates as MLflow metrics (pure): base and tuned value per gate, and 1/0 for the verdict."""
    if not evaluation:
        return {}
    out = {}
    for g in evaluation.get("gates", []):
        for which in ("base", "tuned"):
            if isinstance(g.get(which), (int, float)):
                out[f"gate_{g['metric']}_{which}"] = float(g[which])
    if evaluation.get("passed") is not None:
        out["evaluation_passed"] = 1.0 if evaluation["passed"] else 0.0
    return out


def registry_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """A model version's tags (pure): the SFTJob's uid and each gate's result."""
    tags = {"sft.uid": str(metrics.get("runId", "")), "sft.evaluation": verdict(metrics.get("evaluation"))}
    for g in (metrics.get("evaluation") or {}).get("gates", []):
        tags[f"sft.gate.{g['metric']}"] = (
            f"{'passed' if g.get('passed') else 'failed'}: base {g.get('base')}, tuned {g.get('tuned')}, "
            f"threshold {g.get('threshold')}, minChange {g.get('minChange')}")
    return {k: v for k, v in tags.items() if v}


def promotable(metrics: dict[str, Any]) -> bool:
    """The alias goes to a version only when every gate passed (a run without gates has none that failed)."""
    evaluation = metrics.get("evaluation")
    return not evaluation or evaluation.get("passed") is True


def _short(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
