"""The output is proved writable before any GPU time is spent: the fetch stage puts and deletes a probe
object under an s3:// destination, and a missing bucket or missing write permission fails it in seconds
with the destination named (before, it surfaced at the export, after the whole training)."""

from __future__ import annotations

import json

from test_fetch import fetch, object_gets


def spec(bucket: str, endpoint: str, output: str) -> dict:
    return {"model": {"source": "/models/local"}, "dataset": {"train": {"source": f"s3://{bucket}/data/train.jsonl"}},
            "output": {"destination": output}, "storage": {"s3": {"endpoint": endpoint}}}


def test_an_s3_output_in_a_missing_bucket_fails_the_fetch_stage_before_the_download(s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"instruction": "a", "output": "b"}\n')
    mark = s3_server.mark()
    result = fetch(spec(bucket, s3_server.endpoint, "s3://no-such-output-bucket/runs/r1"), tmp_path, s3_server.env())
    assert result.returncode == 68, result.stderr  # NotFound: fails the job at once
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("s3://no-such-output-bucket/runs/r1 (output.destination, probed with")
    assert "the bucket does not exist" in message
    assert object_gets(s3_server.requests(mark), bucket) == []  # nothing downloaded


def test_an_s3_output_the_credentials_cannot_write_is_access_denied_and_the_probe_leaves_nothing(s3_auth_server, tmp_path):
    server = s3_auth_server
    admin = server.client()
    for name in ("team-data", "team-models"):
        admin.create_bucket(Bucket=name)
    admin.put_object(Bucket="team-data", Key="data/train.jsonl", Body=b"{}\n")
    iam = server.client("iam")
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [  # may read everything, write only team-models
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": ["arn:aws:s3:::*"]},
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"], "Resource": ["arn:aws:s3:::team-models/*"]}]}
    iam.put_user_policy(UserName="trainer", PolicyName="trainer", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    creds = server.env(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])

    result = fetch(spec("team-data", server.endpoint, "s3://team-data/runs/r2"), tmp_path, creds)
    assert result.returncode == 77, result.stderr  # AccessDenied: fails the job at once
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("s3://team-data/runs/r2 (output.destination, probed with s3://team-data/runs/r2/.sft-write-probe-")
    assert "access denied" in message
    assert not (tmp_path / "cache" / "s3" / "team-data" / "data" / "train.jsonl").exists()  # nothing downloaded

    result = fetch(spec("team-data", server.endpoint, "s3://team-models/runs/r2"), tmp_path, creds)
    assert result.returncode == 0, result.stderr
    assert admin.list_objects_v2(Bucket="team-models").get("KeyCount", 0) == 0  # the probe object was deleted
