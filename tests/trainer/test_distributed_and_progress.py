"""A 2-process DDP run through the launcher, and progress posts to a local HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import train  # noqa: E402
from sft_trainer.config import ProgressReport, TrainingSpec  # noqa: E402
from sft_trainer.progress import ProgressReporter  # noqa: E402

from trainer_helpers import free_port, run_module, trainer_env, write_config  # noqa: E402


def test_two_process_ddp_run_completes_through_the_launcher(make_spec, tmp_path):
    spec = make_spec(hyperparameters={"maxSteps": 12, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2},
                     evaluation={"strategy": "steps", "steps": 6})
    cfg = write_config(spec, tmp_path / "config.json")
    # Cost 0: every distinct length is its own sub-batch, so the ranks run different numbers of forwards
    # per step; their collectives must still line up.
    result = run_module("sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "--config", str(cfg), env=trainer_env(SFT_SPLIT_COST="0"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["worldSize"] == 2 and metrics["steps"] == 12
    assert metrics["effectiveBatchSize"] == 4 * 2 * 2
    # Rank 0 alone reports: one final progress line, not two.
    finals = [line for line in result.stdout.splitlines() if '"message": "done"' in line]
    assert len(finals) == 1
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_ddp_failure_propagates_the_ranks_exit_code(make_spec, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    cfg = write_config(make_spec(dataset={"train": {"source": str(bad)}}), tmp_path / "config.json")
    result = run_module("sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "--config", str(cfg), timeout=240)
    assert result.returncode == 65  # plain torchrun would exit 1


class Recorder(BaseHTTPRequestHandler):
    posts: list[tuple[str, dict]] = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        if cls.fail_first > 0:
            cls.fail_first -= 1
            self.send_response(503)
        else:
            cls.posts.append((self.headers.get("Authorization"), body))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Recorder.posts, Recorder.fail_first = [], 1
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", Recorder
    srv.shutdown()


def test_progress_reaches_the_endpoint_with_the_current_bearer_token(make_spec, tmp_path, monkeypatch, server):
    url, rec = server
    token = tmp_path / "token"
    token.write_text("token-one\n")
    monkeypatch.setenv("SFT_PROGRESS_URL", url)
    monkeypatch.setenv("SFT_JOB_NAMESPACE", "team-a")
    monkeypatch.setenv("SFT_JOB_NAME", "tiny")
    monkeypatch.setenv("SFT_PROGRESS_TOKEN_FILE", str(token))
    monkeypatch.setenv("SFT_PROGRESS_INTERVAL", "0.2")

    def rotate(report):
        if report.step == 20:
            token.write_text("token-two\n")  # projected tokens rotate: the next post must use the new one

    metrics = train.run(TrainingSpec.model_validate(make_spec(hyperparameters={"maxSteps": 40})), stdout=None, listener=rotate)
    tokens = [auth for auth, _ in rec.posts]
    assert tokens[0] == "Bearer token-one" and tokens[-1] == "Bearer token-two"
    final = rec.posts[-1][1]
    ProgressReport.model_validate(final)  # camelCase, valid for the operator
    assert final["step"] == final["totalSteps"] == 40
    assert final["outputModel"] == metrics["outputModel"] and final["bestCheckpoint"] == metrics["bestCheckpoint"]
    assert final["effectiveBatchSize"] == 8 and "trainLoss" in final and "tokensPerSecond" in final


def test_an_unreachable_endpoint_never_stops_training(make_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_PROGRESS_URL", f"http://127.0.0.1:{free_port()}/progress")
    monkeypatch.setenv("SFT_PROGRESS_INTERVAL", "0")
    metrics = train.run(TrainingSpec.model_validate(make_spec(hyperparameters={"maxSteps": 5})), stdout=None)
    assert metrics["steps"] == 5


def test_reporter_posts_at_most_every_interval_and_never_blocks():
    import time

    got = []

    class Slow(Recorder):
        def do_POST(self):  # noqa: N802
            time.sleep(0.3)
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    r = ProgressReporter(f"http://127.0.0.1:{srv.server_address[1]}/p", interval_s=0.5, stdout=None)
    t0 = time.monotonic()
    for step in range(200):
        r.report(ProgressReport(step=step, total_steps=200, epoch=0.0))
        time.sleep(0.005)
    assert time.monotonic() - t0 < 2.5  # reporting cost nothing noticeable
    r.report(ProgressReport(step=200, total_steps=200, epoch=1.0), final=True)
    r.close()
    srv.shutdown()
    assert 2 <= len(got) <= 6 and got[-1]["step"] == 200
