"""What surrounds ``train.run`` in a trainer process: tracking while it trains, the export when it is done.

    with RunHooks.start(spec) as hooks:              # rank 0: the output proved writable, the MLflow run begins
        metrics = train.run(spec, sinks=hooks.sinks, lock=hooks.lock)  # the run's sink logs every step and
                                                     # evaluation (hooks.failed(exc) if it raises)
        result = hooks.succeeded(metrics)            # rank 0: upload to s3://, COMPLETE last; end the run
                                                     # leaving the block releases the destination lock

Only rank 0 tracks and exports; on other ranks every method does nothing. The result (the output URI once
it is durable, the MLflow run id, a tracking warning) goes into a final progress report; ``__main__`` adds
it to the run's result in the termination message (``sft_trainer.result``), where the operator reads it.

The destination lock (``ownership``) is held from the claim through the export, so that the export is fenced
too. A model that trained but was not exported keeps its marker (``outputs.mark_export_pending``) until the
export succeeds; a rerun of the run then exports it without training (``train.awaiting_export``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sft_contract.exit_codes import ExitCode
from sft_contract.messages import ProgressReport
from sft_contract.spec import TrainingSpec, is_s3

from . import outputs, ownership, paths
from .errors import TrainerError, sigterm_interrupts

log = logging.getLogger("sft_trainer")


@dataclass
class RunResult:
    output_uri: str
    mlflow_run_id: str | None = None
    warning: str | None = None

    def fields(self) -> dict[str, str]:
        """As keys of the run's metrics (``sft_trainer.result.result_from_metrics`` reads them)."""
        doc = {"outputUri": self.output_uri, "mlflowRunId": self.mlflow_run_id, "warning": self.warning}
        return {k: v for k, v in doc.items() if v is not None}


class RunHooks:
    def __init__(self, spec: TrainingSpec, rank: int, tracker=None):
        self.spec = spec
        self.rank = rank
        self.out_dir = paths.resolve(spec.output.destination)
        self.tracker = tracker  # tracking.MlflowSink on rank 0 when the spec tracks the run
        self.run_id = ownership.run_id(spec)
        # Rank 0: the destination's lock, taken by train.run and held through the export (a fence).
        self.lock = ownership.DestinationLock(self.out_dir, self.run_id, spec.output.destination.rstrip("/")) \
            if rank == 0 else None

    def __enter__(self) -> RunHooks:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def sinks(self) -> list:
        """For ``train.run``: the tracker, which the loop feeds every step and evaluation."""
        return [self.tracker] if self.tracker is not None else []

    @classmethod
    def start(cls, spec: TrainingSpec, *, run_name: str | None = None) -> RunHooks:
        rank = int(os.environ.get("RANK", "0"))
        hooks = cls(spec, rank)
        if rank == 0:  # hours of training must not end in an unwritable output
            from .fetch import check_output_writable

            check_output_writable(spec)
        mlflow = spec.tracking.mlflow if spec.tracking else None
        if rank != 0 or mlflow is None:
            return hooks
        from .tracking import MlflowSink, run_params

        hooks.out_dir.mkdir(parents=True, exist_ok=True)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tags = {"sft.job": os.environ.get("SFT_JOB_NAME", run_name or ""), "sft.namespace": os.environ.get("SFT_JOB_NAMESPACE", "")}
        hooks.tracker = MlflowSink(mlflow, hooks.out_dir, run_params(spec, world), {k: v for k, v in tags.items() if v},
                                   run_name=run_name)
        return hooks

    def succeeded(self, metrics: dict[str, Any], *, reporter=None) -> RunResult | None:
        """Rank 0: export to s3:// (COMPLETE last), end the MLflow run, report the result in a final progress
        report. Export errors raise."""
        if self.rank != 0:
            return None
        from .reporter import ProgressReporter

        own = reporter is None
        reporter = ProgressReporter.from_env() if own else reporter
        try:
            result = self._finish(metrics, reporter)
        finally:
            if own:
                reporter.close()
        return result

    def _finish(self, metrics: dict[str, Any], reporter) -> RunResult:
        uri = self.spec.output.destination
        if is_s3(uri):
            try:
                with sigterm_interrupts(f"the export to {uri}"):
                    uri = self._export(reporter, metrics)
            except BaseException as e:
                superseded = isinstance(e, TrainerError) and e.code == ExitCode.SUPERSEDED  # the new owner exports
                if isinstance(e, TrainerError) and not superseded and outputs.export_pending_marker(self.run_id).exists():
                    e.reason += (f"; the trained model stays in {self.out_dir} and a rerun of this run exports it "
                                 f"without training ({outputs.export_pending_marker(self.run_id)})")
                self.failed(e)
                raise
            outputs.clear_export_pending(self.run_id)
        self._end_tracking(metrics, uri, "FINISHED")
        result = RunResult(uri, self.tracker.run_id if self.tracker else None, self.tracker.warning if self.tracker else None)
        if is_s3(uri) or self.tracker is not None:  # the training loop's own final report said the rest
            message = f"exported to {uri}" if is_s3(uri) else "tracked"
            reporter.report(self._report(metrics, message, output_uri=result.output_uri,
                                         mlflow_run_id=result.mlflow_run_id, warning=result.warning), final=True)
        return result

    def failed(self, error: BaseException) -> None:
        """Rank 0: end the MLflow run as KILLED (interrupted: a retry continues it) or FAILED."""
        if self.rank != 0 or self.tracker is None:
            return
        interrupted = isinstance(error, (KeyboardInterrupt,)) or (
            isinstance(error, TrainerError) and error.code == ExitCode.INTERRUPTED
        )
        self._end_tracking(None, None, "KILLED" if interrupted else "FAILED")

    def _export(self, reporter, metrics: dict[str, Any]) -> str:
        from .export import export

        settings = self.spec.storage.s3 if self.spec.storage else None
        last = [0.0]

        def on_progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 or done == total:
                last[0] = now
                reporter.report(self._report(metrics, f"exporting to {self.spec.output.destination}",
                                             stage="exporting", bytes_done=done, bytes_total=total))

        fence = self.lock.check if self.lock is not None else (lambda: None)
        return export(self.out_dir, self.spec.output.destination, settings, on_progress=on_progress, fence=fence)

    def _end_tracking(self, metrics: dict[str, Any] | None, uri: str | None, status: str) -> None:
        if self.tracker is None:
            return
        artifacts = [self.out_dir / outputs.METRICS, self.out_dir / outputs.PLOT] if metrics else []
        self.tracker.end(metrics, uri, status=status, artifacts=artifacts)

    @staticmethod
    def _report(metrics: dict[str, Any], message: str, **fields: Any) -> ProgressReport:
        return ProgressReport(
            step=metrics.get("steps", 0), total_steps=metrics.get("totalSteps", 0), epoch=metrics.get("epochs", 0.0),
            message=message[:1024], evaluation=metrics.get("evaluation"), **fields,  # the latest report wins: keep it
        )


def train_under_hooks(spec: TrainingSpec, train_fn: Callable[[RunHooks], dict[str, Any]], *,
                      run_name: str | None = None, reporter=None) -> dict[str, Any]:
    """A run's order, written once for the pod (``__main__``) and ``sftctl run`` (``local``): the hooks start
    (rank 0: the output proved writable, MLflow tracking, the destination lock), ``train_fn(hooks)`` trains,
    then the hooks finish (export to s3:// with COMPLETE last, the tracking run ended) or record the failure.

    Returns the run's metrics with the export's fields (``outputUri``, ``mlflowRunId``, ``warning``). The
    caller judges the gates: a rejected model is exported (under rejected/) and tracked before the job fails.
    """
    with RunHooks.start(spec, run_name=run_name) as hooks:
        try:
            metrics = train_fn(hooks)
        except BaseException as e:
            hooks.failed(e)
            raise
        done = hooks.succeeded(metrics, reporter=reporter)
    return metrics | (done.fields() if done else {})

