"""The fetch stage against a real S3 server (moto) and a hub-like server: what is fetched, that it happens
once, resumes, retries, and fails terminally with the object named."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storage_servers import FaultyProxy, HubServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def env_for(cache: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator"), env.get("PYTHONPATH", "")])
    env.update({"SFT_CACHE_DIR": str(cache), "SFT_TERMINATION_LOG": str(cache.parent / "termination-log"),
                "SFT_STORAGE_BACKOFF": "0.1", **extra})
    return env


# The sources here are bytes, not a model and rows: the stage's data check (tests/trainer/test_datacheck.py) is off.
FETCH = [sys.executable, "-m", "sft_trainer.fetch", "--no-data-check"]


def fetch(spec: dict, tmp_path: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    return subprocess.run([*FETCH, "--config", str(config)],
                          env=env_for(tmp_path / "cache", env), capture_output=True, text=True, timeout=timeout)


def s3_spec(model: str, train: str, endpoint: str, output: str | None = None) -> dict:
    """By default the output goes to the sources' bucket: the fetch stage proves an s3:// output writable
    before it downloads."""
    bucket = next(s for s in (train, model) if s.startswith("s3://"))[len("s3://"):].split("/")[0]
    return {"model": {"source": model}, "dataset": {"train": {"source": train}},
            "output": {"destination": output or f"s3://{bucket}/out"}, "storage": {"s3": {"endpoint": endpoint}}}


def put_model(client, bucket: str, prefix: str, big: int = 3 << 20) -> dict[str, bytes]:
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}" * 100,
             "model.safetensors": os.urandom(big)}
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return files


def object_gets(requests, bucket: str) -> list[str]:
    return [r.path for r in requests if r.method == "GET" and r.path.startswith(f"/{bucket}/") and r.path != f"/{bucket}/"]


def test_s3_sources_are_fetched_once_and_a_rerun_downloads_nothing(s3_server, bucket, tmp_path):
    client = s3_server.client()
    model = put_model(client, bucket, "models/tiny")
    rows = b'{"instruction": "a", "output": "b"}\n' * 50
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=rows)
    spec = s3_spec(f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/train.jsonl", s3_server.endpoint)

    first = fetch(spec, tmp_path, s3_server.env())
    assert first.returncode == 0, first.stderr
    cache = tmp_path / "cache"
    for name, data in model.items():
        assert (cache / "s3" / bucket / "models/tiny" / name).read_bytes() == data
    assert (cache / "s3" / bucket / "data/train.jsonl").read_bytes() == rows
    total = sum(map(len, model.values())) + len(rows)
    progress = json.loads((cache / ".sft" / "fetch-progress.json").read_text())
    assert (progress["bytesDone"], progress["bytesTotal"]) == (total, total)
    reports = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert reports and all(r["stage"] == "fetching" for r in reports)
    assert reports[-1]["bytesDone"] == reports[-1]["bytesTotal"] == total

    mark = s3_server.mark()
    again = fetch(spec, tmp_path, s3_server.env())
    assert again.returncode == 0, again.stderr
    assert object_gets(s3_server.requests(mark), bucket) == []  # only metadata requests: nothing downloaded
    assert "in the cache" in again.stderr


def test_an_interrupted_download_resumes_where_it_stopped(s3_server, bucket, tmp_path):
    data = os.urandom(8 << 20)
    s3_server.client().put_object(Bucket=bucket, Key="data/big.jsonl", Body=data)
    proxy = FaultyProxy(s3_server.port)
    proxy.rate = 2 << 20  # 2 MiB/s: the download takes ~4 s
    spec = s3_spec("/models/local", f"s3://{bucket}/data/big.jsonl", proxy.endpoint)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    part = tmp_path / "cache" / "s3" / bucket / "data" / "big.jsonl.part"
    proc = subprocess.Popen([*FETCH, "--config", str(config)],
                            env=env_for(tmp_path / "cache", s3_server.env()), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 2 << 20):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode() if proc.poll() is not None else "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    assert 0 < kept < len(data)

    proxy.rate = None
    before = proxy.bytes_down
    result = fetch(spec, tmp_path, s3_server.env())
    assert result.returncode == 0, result.stderr
    assert f"resuming at byte {kept}" in result.stderr
    got = (tmp_path / "cache" / "s3" / bucket / "data" / "big.jsonl").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert proxy.bytes_down - before < len(data) - kept + (256 << 10)  # only the rest crossed the wire
    proxy.close()


def test_network_errors_are_retried_and_the_download_completes(s3_server, bucket, tmp_path):
    data = os.urandom(1 << 20)
    s3_server.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=data)
    proxy = FaultyProxy(s3_server.port)
    # A local output: no write probe takes the connections the faults below are meant for.
    spec = s3_spec("/models/local", f"s3://{bucket}/data/train.jsonl", proxy.endpoint, output=str(tmp_path / "out"))
    proxy.refuse(2)  # the first connections are dropped at once
    proxy.cut_after(400_000, times=2)  # the next two (the HEAD, the first GET) are cut after 400 kB
    proxy.cut_after(700_000, times=1)  # and the GET after that too
    result = fetch(spec, tmp_path, s3_server.env())
    assert result.returncode == 0, result.stderr
    assert "resuming at byte" in result.stderr  # a cut GET continued from the bytes on disk
    assert (tmp_path / "cache" / "s3" / bucket / "data" / "train.jsonl").read_bytes() == data
    assert proxy.connections >= 5
    proxy.close()


def test_unreachable_storage_exits_retriable_after_backoff(tmp_path):
    spec = s3_spec("/models/local", "s3://some-bucket/data/train.jsonl", f"http://127.0.0.1:{free_port()}")
    result = fetch(spec, tmp_path, {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
                                    "SFT_STORAGE_RETRIES": "3"})
    assert result.returncode == 69, result.stderr  # StorageUnavailable: not in NON_RETRIABLE, the Job retries
    assert result.stderr.count("retrying in") == 2
    message = (tmp_path / "termination-log").read_text()
    assert "s3://some-bucket/data/train.jsonl" in message and "gave up after 3 attempts" in message


def test_a_missing_key_or_bucket_is_not_found_and_names_it(s3_server, bucket, tmp_path):
    spec = s3_spec("/models/local", f"s3://{bucket}/data/missing.jsonl", s3_server.endpoint)
    result = fetch(spec, tmp_path, s3_server.env())
    assert result.returncode == 68, result.stderr
    assert f"s3://{bucket}/data/missing.jsonl: not found" in (tmp_path / "termination-log").read_text()
    assert "retrying" not in result.stderr  # terminal: no retries spent

    spec = s3_spec("s3://no-such-bucket-here/models/x", "/data/local.jsonl", s3_server.endpoint)
    result = fetch(spec, tmp_path, s3_server.env())
    assert result.returncode == 68, result.stderr
    message = (tmp_path / "termination-log").read_text()
    assert "s3://no-such-bucket-here/models/x" in message and "the bucket does not exist" in message


def test_an_object_key_with_dot_dot_segments_never_writes_outside_the_source_folder(s3_server, bucket, tmp_path):
    # A bucket is not ours: a listed key like "models/tiny/../../../.sft/done/x.json" must not become a path
    # that leaves the source's folder (it could overwrite another source's files or a done-marker).
    client = s3_server.client()
    put_model(client, bucket, "models/tiny", big=1024)
    client.put_object(Bucket=bucket, Key="models/tiny/../../../../.sft/done/escape.json", Body=b'{"path": "/"}')
    spec = s3_spec(f"s3://{bucket}/models/tiny", "/data/local.jsonl", s3_server.endpoint)
    result = fetch(spec, tmp_path, s3_server.env())
    assert result.returncode == 64, result.stderr  # INVALID_CONFIG: terminal, nothing retried
    message = (tmp_path / "termination-log").read_text()
    assert f"s3://{bucket}/models/tiny/../../../../.sft/done/escape.json" in message and ".. segments" in message
    assert not list(tmp_path.rglob("escape.json"))


def test_wrong_or_insufficient_credentials_are_access_denied_naming_the_bucket(s3_auth_server, tmp_path):
    server = s3_auth_server
    bucket = "team-data"
    server.client().create_bucket(Bucket=bucket)
    server.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=b"{}\n")
    spec = s3_spec("/models/local", f"s3://{bucket}/data/train.jsonl", server.endpoint)
    result = fetch(spec, tmp_path, server.env(AWS_SECRET_ACCESS_KEY="not-the-secret"))
    assert result.returncode == 77, result.stderr
    message = (tmp_path / "termination-log").read_text()
    assert f"s3://{bucket}/data/train.jsonl" in message and "access denied" in message
    assert "retrying" not in result.stderr  # terminal: no retries spent

    # A real user whose policy covers another bucket only.
    iam = server.client("iam")
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::other-team", "arn:aws:s3:::other-team/*"]}]}
    iam.put_user_policy(UserName="reader", PolicyName="other-team", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    result = fetch(spec, tmp_path, server.env(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"]))
    assert result.returncode == 77, result.stderr
    assert f"s3://{bucket}/data/train.jsonl: access denied" in (tmp_path / "termination-log").read_text()


@pytest.fixture
def hub(tmp_path):
    """A hub-like server with one model repo and one dataset repo."""
    root = tmp_path / "hub"
    model = root / "models" / "org" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(os.urandom(1 << 20))
    data = root / "datasets" / "org" / "rows" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 20)
    server = HubServer(root).start()
    yield server
    server.stop()


def test_hub_snapshots_are_pinned_to_a_commit_fetched_once_and_reused(hub, tmp_path):
    spec = {"model": {"source": "org/tiny"}, "dataset": {"train": {"source": "org/rows"}},
            "output": {"destination": str(tmp_path / "out")}}
    result = fetch(spec, tmp_path, {"HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "cache"
    snapshot = cache / "hub" / "models" / "org" / "tiny" / "main"
    assert (snapshot / "model.safetensors").read_bytes() == (hub.root / "models/org/tiny/model.safetensors").read_bytes()
    assert (cache / "hub" / "datasets" / "org" / "rows" / "main" / "data" / "train.jsonl").exists()
    commit = hub.commit("models", "org/tiny")
    assert all(f"/resolve/{commit}/" in p for p in hub.file_gets() if p.startswith("/org/tiny/"))  # pinned
    markers = [json.loads(p.read_text()) for p in (cache / ".sft" / "done").glob("*.json")]
    assert {m["commit"] for m in markers if m["source"] == "org/tiny"} == {commit}

    gets = len(hub.file_gets())
    again = fetch(spec, tmp_path, {"HF_ENDPOINT": hub.endpoint})
    assert again.returncode == 0, again.stderr
    assert len(hub.file_gets()) == gets  # no file downloaded twice

    # The trainer reads the snapshot, never the hub.
    sys.path.insert(0, str(ROOT / "trainer_image"))
    from sft_trainer import paths

    os.environ["SFT_CACHE_DIR"] = str(cache)
    try:
        assert paths.hub_location("org/tiny") == str(snapshot)
    finally:
        del os.environ["SFT_CACHE_DIR"]


def test_a_missing_hub_repo_or_revision_is_not_found_and_names_it(hub, tmp_path):
    spec = {"model": {"source": "org/nope"}, "dataset": {"train": {"source": "/data/x.jsonl"}},
            "output": {"destination": str(tmp_path / "out")}}
    result = fetch(spec, tmp_path, {"HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 68, result.stderr
    assert "org/nope" in (tmp_path / "termination-log").read_text()

    spec["model"] = {"source": "org/tiny", "revision": "v9"}
    result = fetch(spec, tmp_path, {"HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 68, result.stderr
    assert "org/tiny (revision v9): no such revision" in (tmp_path / "termination-log").read_text()
