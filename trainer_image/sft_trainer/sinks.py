"""Where a run's numbers go: one list of sinks, each told about every step, every evaluation and the end.

The loop builds a ``StepRecord`` per optimizer step and an ``EvalRecord`` per evaluation and hands each,
with the current ``ProgressReport`` (the run's summary so far), to every sink on rank 0. A new destination
for the numbers (an experiment tracker, say) is one more ``Sink`` subclass added to the list that
``train.sinks_for`` returns; the loop does not change. A sink must not stop training: the progress sink
drops network errors, and so should any sink that talks to a server.

- ``TrainerLogSink``: ``trainer_log.jsonl`` (one line per step and per evaluation) and ``loss.png``.
- ``ProgressSink``: JSON lines on stdout, posts to the operator's progress endpoint, the local listener
  (``sftctl run``'s progress bar).
- ``tracking.MlflowSink``: the MLflow run (passed in by ``run_hooks``, which ends it after the export).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_contract.messages import ProgressReport

from . import outputs
from .reporter import ProgressReporter

log = logging.getLogger("sft_trainer")


@dataclass(frozen=True)
class StepRecord:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int  # non-padding tokens in this step (all ranks)
    tokens_per_second: float

    def as_log(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "loss": round(self.loss, 6), "learningRate": self.learning_rate,
                "gradNorm": round(self.grad_norm, 6), "tokens": self.tokens,
                "tokensPerSecond": round(self.tokens_per_second, 1)}


@dataclass(frozen=True)
class EvalRecord:
    step: int
    epoch: float
    eval_loss: float
    best_eval_loss: float | None

    def as_log(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "evalLoss": self.eval_loss}


class Sink:
    """A destination for the run's numbers (rank 0 only). Every hook is optional."""

    def on_start(self, resumed_at: int | None) -> None:
        """The run starts: fresh (``None``) or resumed after step ``resumed_at``."""

    def on_step(self, record: StepRecord, progress: ProgressReport) -> None:
        """After every optimizer step."""

    def on_eval(self, record: EvalRecord, progress: ProgressReport) -> None:
        """After every evaluation on the validation set (the final one included)."""

    def on_end(self, metrics: dict[str, Any], progress: ProgressReport) -> None:
        """The run finished and its outputs are written: ``metrics`` is metrics.json (outputModel,
        forgetting, generalLossBefore/After, bestCheckpoint...)."""

    def close(self) -> None:
        """Always called last, also when the run failed or was interrupted."""


class TrainerLogSink(Sink):
    def __init__(self, out_dir: Path):
        self.log = outputs.TrainerLog(out_dir / outputs.LOG)
        self.plot = out_dir / outputs.PLOT

    def on_start(self, resumed_at: int | None) -> None:
        if resumed_at is None:
            self.log.reset()
        else:
            self.log.truncate_after(resumed_at)

    def on_step(self, record: StepRecord, progress: ProgressReport) -> None:
        self.log.write(record.as_log())

    def on_eval(self, record: EvalRecord, progress: ProgressReport) -> None:
        self.log.write(record.as_log())

    def on_end(self, metrics: dict[str, Any], progress: ProgressReport) -> None:
        try:
            outputs.plot_loss(self.log.records(), self.plot)
        except Exception as e:  # noqa: BLE001 - a chart is no reason to fail a trained run
            log.warning("loss plot %s not written (%s: %s); the log and metrics.json have the numbers",
                        self.plot.name, type(e).__name__, e)


class ProgressSink(Sink):
    """Progress reports: about 500 over a run (every step of a short one), after each evaluation, a final one."""

    def __init__(self, reporter: ProgressReporter):
        self.reporter = reporter

    def on_step(self, record: StepRecord, progress: ProgressReport) -> None:
        every = max(1, progress.total_steps // 500)
        if record.step % every == 0 or record.step == progress.total_steps:
            self.reporter.report(progress)

    def on_eval(self, record: EvalRecord, progress: ProgressReport) -> None:
        self.reporter.report(progress)

    def on_end(self, metrics: dict[str, Any], progress: ProgressReport) -> None:
        self.reporter.report(progress, final=True)

    def close(self) -> None:
        self.reporter.close()
