"""The loss chart is a convenience: when matplotlib fails (seen once: another thread's half-done IPython
import), the trained run still finishes with its log and metrics, and says the chart is missing."""

import logging

import pytest

pytest.importorskip("torch")

from sft_trainer import outputs  # noqa: E402
from sft_trainer.sinks import StepRecord, TrainerLogSink  # noqa: E402


def test_a_failing_loss_plot_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    sink = TrainerLogSink(tmp_path)
    sink.on_start(None)
    sink.on_step(StepRecord(1, 0, 2.5, 1e-4, 1.0, 100, 50.0), None)

    def broken(records, path):
        raise AttributeError("partially initialized module 'IPython' has no attribute 'version_info'")

    monkeypatch.setattr(outputs, "plot_loss", broken)
    with caplog.at_level(logging.WARNING, logger="sft_trainer"):
        sink.on_end({}, None)
    assert f"loss plot {outputs.PLOT} not written" in caplog.text
    assert not (tmp_path / outputs.PLOT).exists()
    assert outputs.TrainerLog(tmp_path / outputs.LOG).records()[0]["loss"] == 2.5


def test_the_loss_plot_is_written_when_matplotlib_works(tmp_path):
    sink = TrainerLogSink(tmp_path)
    sink.on_start(None)
    sink.on_step(StepRecord(1, 0, 2.5, 1e-4, 1.0, 100, 50.0), None)
    sink.on_end({}, None)
    assert (tmp_path / outputs.PLOT).stat().st_size > 0
