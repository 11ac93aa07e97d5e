"""The export to s3:// against a real S3 server (moto): what is uploaded, COMPLETE last, nothing twice,
and a kill in the middle of a multipart upload finished by the next attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage_servers import FaultyProxy

ROOT = Path(__file__).resolve().parents[2]
PART = 5 << 20  # S3's smallest part, so a small file goes up in several parts


def outputs(out: Path, weights: int = 12 << 20) -> dict[str, bytes]:
    files = {
        "model/config.json": b'{"model_type": "llama"}',
        "model/tokenizer.json": b'{"version": "1.0"}',
        "model/model.safetensors": os.urandom(weights),
        "metrics.json": b'{"trainLoss": 1.0}',
        "trainer_log.jsonl": b'{"step": 1, "loss": 2.0}\n',
        "loss.png": b"\x89PNG fake",
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "optimizer.pt").write_bytes(b"not exported")
    return files


def export_cmd(out: Path, destination: str, endpoint: str) -> list[str]:
    code = (
        "import sys, logging; logging.basicConfig(level=logging.INFO)\n"
        "from pathlib import Path\n"
        "from sft_contract.spec import S3Spec\n"
        "from sft_trainer.export import export\n"
        f"print(export(Path({str(out)!r}), {destination!r}, S3Spec(endpoint={endpoint!r})))\n"
    )
    return [sys.executable, "-c", code]


def interruptible_export_cmd(out: Path, destination: str, endpoint: str) -> list[str]:
    """The export as rank 0 runs it: SIGTERM stops it (sigterm_interrupts), the exit code is the TrainerError's."""
    code = (
        "import sys, logging; logging.basicConfig(level=logging.INFO)\n"
        "from pathlib import Path\n"
        "from sft_contract.spec import S3Spec\n"
        "from sft_trainer.errors import TrainerError, sigterm_interrupts\n"
        "from sft_trainer.export import export\n"
        "try:\n"
        "    with sigterm_interrupts('the export'):\n"
        f"        export(Path({str(out)!r}), {destination!r}, S3Spec(endpoint={endpoint!r}))\n"
        "except TrainerError as e:\n"
        "    print(e.reason, file=sys.stderr)\n"
        "    sys.exit(e.code)\n"
    )
    return [sys.executable, "-c", code]


def env(server, **extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator"), e.get("PYTHONPATH", "")])
    e.update(server.env(SFT_S3_PART_SIZE=str(PART), SFT_STORAGE_BACKOFF="0.1", **extra))
    return e


def stored(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_export_uploads_the_outputs_and_writes_complete_last(s3_server, bucket, tmp_path):
    files = outputs(tmp_path / "out")
    mark = s3_server.mark()
    result = subprocess.run(export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r1", s3_server.endpoint),
                            env=env(s3_server), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"s3://{bucket}/runs/r1"
    objects = stored(s3_server.client(), bucket, "runs/r1")
    assert {k: v for k, v in objects.items() if k != "COMPLETE"} == files  # checkpoints stay behind
    marker = json.loads(objects["COMPLETE"])
    assert set(marker["files"]) == set(files)
    writes = [r for r in s3_server.requests(mark) if r.method in ("PUT", "POST")]
    assert writes[-1].path == f"/{bucket}/runs/r1/COMPLETE"
    assert any("partNumber=" in r.query for r in writes)  # the weights went up in parts

    mark = s3_server.mark()
    again = subprocess.run(export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r1", s3_server.endpoint),
                           env=env(s3_server), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert [r for r in s3_server.requests(mark) if r.method in ("PUT", "POST")] == []  # nothing uploaded twice


def test_an_export_killed_mid_upload_is_finished_by_the_next_attempt(s3_server, bucket, tmp_path):
    files = outputs(tmp_path / "out", weights=30 << 20)  # 6 parts
    proxy = FaultyProxy(s3_server.port)
    proxy.rate = 2 << 20  # slow enough to be caught in the middle even when the machine is busy
    mark = s3_server.mark()
    proc = subprocess.Popen(export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r2", proxy.endpoint),
                            env=env(s3_server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len([r for r in s3_server.requests(mark) if "partNumber=" in r.query and r.status == 200]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the upload ended or stalled before the kill"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # as a pod killed during the upload
    proc.wait()
    first = s3_server.requests(mark)
    parts_before = {r.query for r in first if "partNumber=" in r.query and r.status == 200}
    assert not any(r.path.endswith("/COMPLETE") and r.method == "PUT" for r in first)
    proxy.close()

    mark = s3_server.mark()
    result = subprocess.run(export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r2", s3_server.endpoint),
                            env=env(s3_server), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resuming upload" in result.stderr
    second = s3_server.requests(mark)
    assert not any(r.method == "POST" and r.query.startswith("uploads") for r in second)  # the same multipart upload
    parts_after = [r.query for r in second if "partNumber=" in r.query and r.method == "PUT"]
    assert parts_after and not set(parts_after) & parts_before  # only the parts still missing
    assert len(parts_before) + len(parts_after) == 6
    objects = stored(s3_server.client(), bucket, "runs/r2")
    assert objects["model/model.safetensors"] == files["model/model.safetensors"]
    assert "COMPLETE" in objects


def test_sigterm_during_the_export_stops_it_at_once_as_interrupted(s3_server, bucket, tmp_path):
    """A pod deleted mid-upload: the trainer exits 75 (the Job retries it uncounted) instead of finishing the
    upload in its grace period or being killed with an unknown code. botocore catches exceptions around its
    I/O and retries, so the signal must not arrive as one of those."""
    outputs(tmp_path / "out", weights=4 << 20)  # below the part size: one PUT, in the main thread
    proxy = FaultyProxy(s3_server.port)
    proxy.rate = 200_000  # bytes/s: the weights take ~20 s
    proc = subprocess.Popen(interruptible_export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r5", proxy.endpoint),
                            env=env(s3_server), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "model/config.json" not in stored(s3_server.client(), bucket, "runs/r5"):  # the weights are on their way
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended or stalled before the signal"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    proxy.close()
    assert proc.returncode == 75, err
    assert "SIGTERM during the export; a retry resumes it" in err
    left = stored(s3_server.client(), bucket, "runs/r5")
    assert "COMPLETE" not in left and "model/model.safetensors" not in left  # it stopped mid-upload


def test_a_changed_output_replaces_the_marker_only_after_the_new_files(s3_server, bucket, tmp_path):
    outputs(tmp_path / "out", weights=1 << 20)
    cmd = export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r3", s3_server.endpoint)
    assert subprocess.run(cmd, env=env(s3_server), capture_output=True, timeout=120).returncode == 0
    (tmp_path / "out" / "metrics.json").write_text('{"trainLoss": 0.5}')
    mark = s3_server.mark()
    result = subprocess.run(cmd, env=env(s3_server), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    changes = [(r.method, r.path.rsplit("/", 1)[-1]) for r in s3_server.requests(mark) if r.method in ("PUT", "DELETE")]
    assert changes == [("DELETE", "COMPLETE"), ("PUT", "metrics.json"), ("PUT", "COMPLETE")]
    objects = stored(s3_server.client(), bucket, "runs/r3")
    assert objects["metrics.json"] == b'{"trainLoss": 0.5}'


def test_an_export_to_a_missing_bucket_is_not_found_naming_it(s3_server, tmp_path):
    outputs(tmp_path / "out", weights=1 << 10)
    result = subprocess.run(export_cmd(tmp_path / "out", "s3://no-such-output-bucket/runs/r4", s3_server.endpoint),
                            env=env(s3_server), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "NotFound: s3://no-such-output-bucket/runs/r4/" in result.stderr
    assert "the bucket does not exist" in result.stderr


def test_a_storage_outage_during_the_export_is_ridden_out_and_sigterm_still_exits_75(s3_server, bucket, tmp_path):
    """S3 down mid-export: the trainer waits it out with backoff inside the pod (no Job retry spent) for up to
    SFT_STORAGE_RETRY_SECONDS, default 10 min; before, it gave up after 6 attempts (~30 s) and exited 69."""
    files = outputs(tmp_path / "out", weights=1 << 20)
    proxy = FaultyProxy(s3_server.port)
    proxy.refuse(10**9)  # the server is unreachable

    def export_during_outage(retries: int) -> subprocess.Popen:
        proc = subprocess.Popen(interruptible_export_cmd(tmp_path / "out", f"s3://{bucket}/runs/r6", proxy.endpoint),
                                env={**env(s3_server), "SFT_STORAGE_BACKOFF": "0.05"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = 0
        for line in proc.stderr:
            seen += "retrying in" in line
            if seen == retries:
                return proc
        raise AssertionError(f"the export ended after {seen} retries (exit {proc.wait()})")

    proc = export_during_outage(2)
    proc.send_signal(signal.SIGTERM)  # the pod deleted while it waits: stop at once, uncounted
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err

    proc = export_during_outage(6)  # the 6th attempt used to end the export (exit 69)
    proxy.stop_refusing()  # the outage ends
    _, err = proc.communicate(timeout=120)
    proxy.close()
    assert proc.returncode == 0, err
    objects = stored(s3_server.client(), bucket, "runs/r6")
    assert {k: v for k, v in objects.items() if k != "COMPLETE"} == files and "COMPLETE" in objects
