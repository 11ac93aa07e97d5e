"""S3 for the fetch stage and the export: one boto3 client, resumable transfers, errors as exit codes.

Why boto3 (docs/storage.md): its errors carry S3's own codes (NoSuchKey, NoSuchBucket, AccessDenied,
InvalidAccessKeyId...), so a failure names the object and maps to a terminal exit code; its multipart API
lets an interrupted upload continue at the next part (ListParts); and its credential chain covers
workload identity (IRSA web identity, EKS Pod Identity, instance roles) when no Secret is referenced.

Resumption is ours, because neither boto3 nor s3transfer resumes across processes:
- download: bytes go to ``<file>.part`` beside a ``<file>.part.json`` holding the object's ETag; a later
  attempt continues with a ranged GET (``If-Match`` the same ETag) from the part's length;
- upload: a multipart upload's id is kept in a state file; a later attempt lists the parts already stored
  and sends only the rest. Every uploaded object carries its sha256 as metadata, so a file already stored
  is recognised and skipped.

Network errors, 5xx and throttling are retried inside the pod, on top of botocore's own standard retries, so
that a storage outage of a few minutes costs no Job retry: exponential backoff from ``SFT_STORAGE_BACKOFF``
seconds (default 1, doubling, at most 30) for up to ``SFT_STORAGE_RETRY_SECONDS`` (default 600) since the
operation last made progress; ``SFT_STORAGE_RETRIES`` caps the attempts as well (unset: no cap). A download
resumes where the broken stream stopped. Then: ``StorageUnavailable`` (exit 69, retried by the Job). SIGTERM
while waiting ends the wait at once (the caller's ``sigterm_interrupts``: exit 75).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from sft_contract.spec import S3Spec

from .errors import AccessDenied, NotFound, StorageUnavailable, TrainerError

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20  # streaming read size
DEFAULT_PART = 64 << 20  # files larger than one part go up in parts (SFT_S3_PART_SIZE overrides)
MIN_PART = 5 << 20  # S3's smallest part
MAX_PARTS = 9_000  # S3 allows 10,000; the rest is headroom
PART_WORKERS = 4
SHA256_META = "sha256"  # x-amz-meta-sha256 on every uploaded object

NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
DENIED_CODES = {
    "AccessDenied", "Forbidden", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "AccountProblem", "InvalidClientTokenId",
}
NETWORK_ERRORS = (
    bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError, bx.ReadTimeoutError,
    bx.ResponseStreamingError, bx.IncompleteReadError, ConnectionError, TimeoutError,
)


class Transient(Exception):
    """A failure worth retrying (network, 5xx, throttling); ``retrying`` gives up after its attempts."""


@dataclass(frozen=True)
class Location:
    bucket: str
    key: str  # no leading or trailing slash; "" is the bucket root

    @classmethod
    def parse(cls, uri: str) -> Location:
        bucket, _, key = uri[len("s3://") :].partition("/")
        return cls(bucket, key.strip("/"))

    def join(self, rel: str) -> Location:
        return Location(self.bucket, f"{self.key}/{rel}".strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


@dataclass(frozen=True)
class Obj:
    key: str
    size: int
    etag: str


def client(settings: S3Spec | None = None):
    """A client from the spec's endpoint/region/path style; credentials from the environment (the Secret's
    AWS_* variables) or the SDK's default chain (workload identity)."""
    settings = settings or S3Spec()
    path_style = settings.path_style if settings.path_style is not None else settings.endpoint is not None
    config = Config(
        retries={"mode": "standard", "max_attempts": 2},  # one quick retry; Backoff rides out longer outages
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=2 * PART_WORKERS,
        s3={"addressing_style": "path" if path_style else "auto"},
        # MinIO, Ceph and R2 reject or ignore the CRC trailers newer botocore sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint, region_name=settings.region, config=config)


def classify(err: Exception, what: str) -> Exception:
    """An SDK error as a terminal ``TrainerError`` naming ``what`` (an s3:// URI), or ``Transient``."""
    if isinstance(err, bx.NoCredentialsError):
        return AccessDenied(
            f"{what}: no S3 credentials: reference a Secret in spec.storage.s3.credentialsSecretRef or give the "
            "pods a workload identity"
        )
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = err.response.get("Error", {}).get("Message") or ""
        if code in NOT_FOUND_CODES or status == 404:
            detail = "the bucket does not exist" if code == "NoSuchBucket" else "no such object"
            return NotFound(f"{what}: not found ({code or status}: {detail})")
        if code in DENIED_CODES or status in (401, 403):
            return AccessDenied(
                f"{what}: access denied ({code or status}{': ' + message if message else ''}); check the "
                "credentials in spec.storage.s3.credentialsSecretRef and their permissions on the bucket"
            )
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling", "ServiceUnavailable"):
            return Transient(f"{what}: {code or status} {message}".strip())
        return StorageUnavailable(f"{what}: {code or status} {message}".strip())
    if isinstance(err, NETWORK_ERRORS):
        return Transient(f"{what}: {type(err).__name__}: {err}")
    return err


DEFAULT_RETRY_SECONDS = 600.0  # several minutes of outage ridden out inside the pod
MAX_DELAY = 30.0


@dataclass
class Backoff:
    """The waits of one operation's retries: doubling from ``SFT_STORAGE_BACKOFF`` to 30 s, until
    ``SFT_STORAGE_RETRY_SECONDS`` have passed since the first failure (or ``SFT_STORAGE_RETRIES`` attempts).
    ``cancelled`` ends a wait at once (upload threads, when the main thread was interrupted)."""

    cancelled: threading.Event | None = None
    first_delay: float = field(default_factory=lambda: float(os.environ.get("SFT_STORAGE_BACKOFF", "1")))
    budget: float = field(default_factory=lambda: float(os.environ.get("SFT_STORAGE_RETRY_SECONDS",
                                                                       DEFAULT_RETRY_SECONDS)))
    cap: int | None = field(default_factory=lambda: int(os.environ["SFT_STORAGE_RETRIES"])
                            if os.environ.get("SFT_STORAGE_RETRIES") else None)
    failures: int = 0
    since: float = 0.0

    def reset(self) -> None:
        """Progress was made: the next failure starts a fresh budget."""
        self.failures = 0

    def wait(self, err: Exception, detail: str = "") -> None:
        """After a transient failure: wait before the next attempt, or raise StorageUnavailable when spent."""
        now = time.monotonic()
        if self.failures == 0:
            self.since = now
        self.failures += 1
        delay = min(self.first_delay * 2 ** (self.failures - 1), MAX_DELAY)
        spent = now - self.since
        if (self.cap is not None and self.failures >= self.cap) or spent + delay > self.budget:
            raise StorageUnavailable(f"{err} (gave up after {self.failures} attempts in {spent:.0f} s{detail})") from None
        log.warning("%s; retrying in %.1f s (attempt %d, %.0f of %.0f s spent)", err, delay, self.failures, spent,
                    self.budget)
        if self.cancelled is None:
            time.sleep(delay)  # SIGTERM interrupts it (sigterm_interrupts raises in the main thread)
        elif self.cancelled.wait(delay):
            raise StorageUnavailable(f"{err} (cancelled)")


def retrying(fn: Callable[[], T], what: str, cancelled: threading.Event | None = None) -> T:
    """Run ``fn``; terminal errors raise at once, transient ones are retried with backoff (``Backoff``)."""
    backoff = Backoff(cancelled)
    while True:
        try:
            return fn()
        except TrainerError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below; anything unknown propagates
            err = classify(e, what) if not isinstance(e, Transient) else e
            if not isinstance(err, Transient):
                raise err from None
            backoff.wait(err)


# ---------------------------------------------------------------- listing


def list_source(s3, loc: Location) -> list[Obj]:
    """The objects of ``s3://bucket/key``: the object itself, or every object under the ``key/`` prefix."""
    if loc.key:
        try:
            head = retrying(lambda: s3.head_object(Bucket=loc.bucket, Key=loc.key), loc.uri)
            return [Obj(loc.key, int(head["ContentLength"]), head["ETag"])]
        except NotFound:
            pass  # not an object: a prefix, or nothing
    prefix = f"{loc.key}/" if loc.key else ""
    out: list[Obj] = []
    token: str | None = None
    while True:
        kw: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = retrying(lambda: s3.list_objects_v2(**kw), loc.uri)
        out += [Obj(o["Key"], int(o["Size"]), o["ETag"]) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    if not out:
        raise NotFound(f"{loc.uri}: not found (no object with this key and no objects under {loc.uri}/)")
    return out


# ---------------------------------------------------------------- download


def download(s3, bucket: str, obj: Obj, dest: Path, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Download ``obj`` to ``dest``, continuing a ``.part`` left by an interrupted attempt of the same ETag."""
    what = f"s3://{bucket}/{obj.key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    want = {"etag": obj.etag, "size": obj.size}
    try:
        same = json.loads(meta.read_text()) == want and part.exists()
    except (OSError, ValueError):
        same = False
    if not same:
        part.unlink(missing_ok=True)
        meta.write_text(json.dumps(want))
    offset = part.stat().st_size if part.exists() else 0
    if offset > obj.size:
        part.unlink()
        offset = 0
    if offset:
        log.info("%s: resuming at byte %d of %d", what, offset, obj.size)
        on_bytes(offset)
    backoff = Backoff()
    with part.open("ab") as f:
        while offset < obj.size:
            kw: dict[str, Any] = {"Bucket": bucket, "Key": obj.key, "IfMatch": obj.etag}
            if offset:
                kw["Range"] = f"bytes={offset}-"
            try:
                body = s3.get_object(**kw)["Body"]
                for chunk in body.iter_chunks(CHUNK):
                    f.write(chunk)
                    offset += len(chunk)
                    on_bytes(len(chunk))
                    backoff.reset()  # progress starts a fresh budget: a flaky link still finishes
                if offset < obj.size:
                    raise bx.IncompleteReadError(actual_bytes=offset, expected_bytes=obj.size)
            except Exception as e:  # noqa: BLE001
                f.flush()
                code = getattr(e, "response", {}).get("Error", {}).get("Code") if isinstance(e, bx.ClientError) else None
                if code in ("PreconditionFailed", "412"):
                    raise StorageUnavailable(f"{what}: the object changed during the download; a retry starts over") from None
                err = classify(e, what)
                if not isinstance(err, Transient):
                    raise err from None
                backoff.wait(err, f", at byte {offset}")
                log.info("%s: resuming at byte %d", what, offset)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, dest)
    meta.unlink(missing_ok=True)


# ---------------------------------------------------------------- upload


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_part_size() -> int:
    return max(MIN_PART, int(os.environ.get("SFT_S3_PART_SIZE") or DEFAULT_PART))


def part_size_for(size: int) -> int:
    mib = 1 << 20
    return max(base_part_size(), math.ceil(size / MAX_PARTS / mib) * mib)


class UploadState:
    """Multipart uploads in flight, by key, in a small JSON file beside the outputs (survives a restart)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.uploads: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.uploads = {}

    def put(self, key: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.uploads.pop(key, None)
        else:
            self.uploads[key] = entry
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.uploads))
        os.replace(tmp, self.path)


def stored_sha256(s3, bucket: str, key: str) -> str | None:
    """The sha256 metadata of an object we uploaded before, or None if there is no such object."""
    try:
        head = retrying(lambda: s3.head_object(Bucket=bucket, Key=key), f"s3://{bucket}/{key}")
    except NotFound:
        return None
    return head.get("Metadata", {}).get(SHA256_META)


def upload(s3, path: Path, bucket: str, key: str, sha256: str, state: UploadState,
           on_bytes: Callable[[int], None] = lambda n: None) -> str:
    """Upload ``path`` unless the same content is stored; returns "skipped", "put" or "multipart"."""
    what = f"s3://{bucket}/{key}"
    size = path.stat().st_size
    if stored_sha256(s3, bucket, key) == sha256:
        on_bytes(size)
        return "skipped"
    if size <= base_part_size():
        def put() -> None:
            with path.open("rb") as f:
                s3.put_object(Bucket=bucket, Key=key, Body=f, Metadata={SHA256_META: sha256})

        retrying(put, what)
        on_bytes(size)
        return "put"

    part_size = part_size_for(size)
    count = math.ceil(size / part_size)
    entry = state.uploads.get(key)
    done: dict[int, str] = {}
    upload_id = None
    if entry and entry.get("sha256") == sha256 and entry.get("partSize") == part_size:
        upload_id = entry["uploadId"]
        try:
            done = _listed_parts(s3, bucket, key, upload_id)
            log.info("%s: resuming upload %s with %d of %d parts stored", what, upload_id, len(done), count)
        except NotFound:  # NoSuchUpload: aborted or expired
            upload_id = None
    if upload_id is None:
        upload_id = retrying(
            lambda: s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata={SHA256_META: sha256}), what
        )["UploadId"]
        state.put(key, {"uploadId": upload_id, "sha256": sha256, "partSize": part_size})
    on_bytes(sum(min(part_size, size - (n - 1) * part_size) for n in done))

    stop = threading.Event()  # set when the main thread is interrupted: part threads stop waiting to retry

    def send(number: int) -> tuple[int, str]:
        offset = (number - 1) * part_size
        length = min(part_size, size - offset)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        etag = retrying(
            lambda: s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data), what,
            cancelled=stop,
        )["ETag"]
        on_bytes(length)
        return number, etag

    missing = [n for n in range(1, count + 1) if n not in done]
    pool = ThreadPoolExecutor(PART_WORKERS)
    try:
        done.update(dict(pool.map(send, missing)))
    finally:  # interrupted (SIGTERM): the parts in flight finish, the queued ones are dropped, none waits to retry
        stop.set()
        pool.shutdown(cancel_futures=True)
    parts = [{"PartNumber": n, "ETag": done[n]} for n in sorted(done)]
    retrying(
        lambda: s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}),
        what,
    )
    state.put(key, None)
    return "multipart"


def _listed_parts(s3, bucket: str, key: str, upload_id: str) -> dict[int, str]:
    parts: dict[int, str] = {}
    marker = 0
    while True:
        page = retrying(
            lambda: s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker),
            f"s3://{bucket}/{key}",
        )
        parts.update({p["PartNumber"]: p["ETag"] for p in page.get("Parts", [])})
        if not page.get("IsTruncated"):
            return parts
        marker = page["NextPartNumberMarker"]
