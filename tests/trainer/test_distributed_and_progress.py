"""A 2-process DDP run through the launcher, and progress posts to a local HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import train  # noqa: E402
from sft_contract.spec import TrainingSpec  # noqa: E402
from sft_contract.messages import ProgressReport
from sft_trainer.reporter import ProgressReporter  # noqa: E402

from trainer_helpers import free_port, read_log, run_module, trainer_env, write_config  # noqa: E402


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


def test_fsdp_on_cpu_matches_ddp_and_resumes_after_sigterm_to_the_launcher(make_spec, tmp_path):
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    def spec(strategy: str) -> dict:
        return make_spec(hyperparameters={"maxSteps": 10, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2},
                         evaluation={"strategy": "steps", "steps": 5}, checkpointing={"strategy": "steps", "steps": 2},
                         distributed={"strategy": strategy}, output={"destination": str(tmp_path / strategy)})

    def launch(strategy: str) -> list[str]:
        cfg = write_config(spec(strategy), tmp_path / f"{strategy}.json")
        return [sys.executable, "-m", "sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "--config", str(cfg)]

    ddp = subprocess.run(launch("ddp"), env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # FSDP, stopped by SIGTERM to the launcher (what the kubelet sends the pod), then started again.
    proc = subprocess.Popen(launch("fsdp"), env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"event": "progress"' in line and json.loads(line)["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    saved = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir())
    assert saved and int(saved[-1][-8:]) < 10
    resumed = subprocess.run(launch("fsdp"), env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'fsdp' / 'checkpoints' / saved[-1]}" in resumed.stderr

    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["distributed"] == "fsdp" and metrics["worldSize"] == 2 and metrics["steps"] == 10
    # The same losses step by step, before and after the resume (gloo sums in another order: float noise only).
    losses = {s: [r.get("loss", r.get("evalLoss")) for r in read_log(tmp_path / s)] for s in ("ddp", "fsdp")}
    assert len(losses["fsdp"]) == len(losses["ddp"]) == 10 + 2
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-4)
    a, b = (load_file(tmp_path / s / "model" / "model.safetensors") for s in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_fsdp_lora_with_gradient_checkpointing_exports_a_merged_model(make_spec, tmp_path):
    spec = make_spec(hyperparameters={"maxSteps": 4, "perDeviceBatchSize": 4, "gradientCheckpointing": True},
                     peft={"rank": 4, "merge": True}, distributed={"strategy": "fsdp"})
    cfg = write_config(spec, tmp_path / "config.json")
    result = run_module("sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "--config", str(cfg), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "out" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)


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
