"""``python -m sft_trainer.fetch``: the fetch stage. Hub and s3:// sources, fetched once into the cache; then
the data checked (``datacheck``: every bad row named, exit 65) before any rank loads the model.

In a cluster it runs as the trainer pod's init container on the cache volume (``SFT_CACHE_DIR``), before any
rank starts; ``sftctl run`` calls ``fetch_all`` itself. Every rank and every restart then reads the cache
(``paths``). What it does:

- ``model.source``, the train/validation/general ``source`` fields and ``evaluation.prompts.source`` that are
  hub ids or s3:// locations are fetched; local and pvc:// sources are read in place.
- Hub: the revision (default ``main``) is resolved to its commit once, and that commit's snapshot is
  downloaded with huggingface_hub into ``<cache>/hub/...`` (files already complete are kept; huggingface_hub
  restarts a file that was cut off). s3://: every object of the key or prefix is mirrored into
  ``<cache>/s3/<bucket>/<key>`` with ranged, resumable GETs (``s3.download``).
- A completed source gets a marker (``paths.done_marker``). Next time the source is checked with one
  metadata request (a hub commit needs none) and only changed files are downloaded, so a restart downloads
  nothing.
- One fetch at a time per cache (an flock on ``<cache>/.sft/fetch.lock``): pods sharing a ReadWriteMany cache
  wait for the first and then find everything there.
- Progress: bytes done/total in ``<cache>/.sft/fetch-progress.json`` and as progress reports with stage
  ``fetching`` (stdout JSON lines, and ``$SFT_PROGRESS_URL`` when set).
- An ``s3://`` output is proved writable (``check_output_writable``: a probe object put and deleted) after the
  sources are listed and before anything is downloaded; the trainer probes again, pvc:// and local outputs too.
- Failures: NotFound (68) and AccessDenied (77) are terminal and name the object; too little space in the
  cache, CacheTooSmall (73); network errors are retried with backoff, then StorageUnavailable (69, retried).
  SIGTERM (the pod deleted) exits 75, Interrupted, which the Job retries without counting it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sft_contract.exit_codes import ExitCode
from sft_contract.messages import ProgressReport
from sft_contract.sources import Remote, remote_sources
from sft_contract.spec import TrainingSpec, is_s3

from . import paths
from .errors import AccessDenied, CacheTooSmall, NotFound, StorageUnavailable, TrainerError, sigterm_interrupts

log = logging.getLogger("sft_trainer.fetch")

PROGRESS_EVERY_S = 1.0
HUB_WORKERS = 4



# ---------------------------------------------------------------- progress


@dataclass
class FetchProgress:
    """Bytes done out of total across every source, written to a file and reported (rate-limited)."""

    file: Path
    reporter: Any = None  # reporter.ProgressReporter
    total: int = 0
    done: int = 0
    current: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last: float = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
        self.flush()

    def set_done(self, n: int) -> None:
        with self._lock:
            self.done = n
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        state = {
            "stage": "fetching", "source": self.current, "bytesDone": self.done, "bytesTotal": self.total,
            "updatedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.file.with_name(self.file.name + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(state) + "\n")
            os.replace(tmp, self.file)
        if self.reporter is not None:
            self.reporter.report(ProgressReport(
                step=0, total_steps=0, epoch=0.0, stage="fetching", bytes_done=self.done, bytes_total=self.total,
                message=f"fetching {self.current}"[:1024],
            ))


# ---------------------------------------------------------------- the stage


@contextlib.contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    lock_path = root / ".sft" / "fetch.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another fetch is filling the cache %s; waiting for it", root)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_progress(reporter=None) -> FetchProgress:
    """The fetch's progress in the cache (``.sft/fetch-progress.json``), reported through ``reporter``."""
    return FetchProgress(paths.cache_root() / ".sft" / "fetch-progress.json", reporter)


def fetch_all(spec: TrainingSpec, *, reporter=None, progress: FetchProgress | None = None) -> dict[str, Path]:
    """Fetch every hub and s3:// source of ``spec`` into the cache; returns source -> local path.
    ``progress``: the caller's (``cache_progress``), to read the bytes fetched afterwards."""
    remotes = remote_sources(spec, lambda s: paths.resolve(s).exists())
    if not remotes:
        return {}
    root = paths.cache_root()
    (root / ".sft" / "done").mkdir(parents=True, exist_ok=True)
    progress = progress or cache_progress(reporter)
    with cache_lock(root):
        plans = [_plan(r, spec) for r in remotes]
        if is_s3(spec.output.destination):  # before the download: an unwritable output fails in seconds, not hours
            check_output_writable(spec)
        progress.total = sum(p.total for p in plans)
        progress.set_done(sum(p.present for p in plans))
        _check_space(root, sum(p.total - p.present for p in plans))
        out = {}
        for plan in plans:
            progress.current = plan.remote.source
            progress.flush(force=True)
            out[plan.remote.source] = plan.run(progress)
        progress.flush(force=True)
    log.info("fetched %d source(s), %d bytes, into %s", len(out), progress.total, root)
    return out


PROBE = ".sft-write-probe"


def check_output_writable(spec: TrainingSpec) -> None:
    """Prove ``output.destination`` can be written before any GPU time is spent on it: NotFound (68) or
    AccessDenied (77) naming it, now rather than at the export. s3://: a small object put, then deleted, under
    the destination prefix (the permission the export needs); a path or pvc://: a file created and removed
    there (the claim must be mounted). Transient storage errors are retried as every transfer's are."""
    dest = spec.output.destination
    if is_s3(dest):
        from . import s3

        client = s3.client(spec.storage.s3 if spec.storage else None)
        probe = s3.Location.parse(dest).join(f"{PROBE}-{os.getpid()}-{time.time_ns()}")
        what = f"{dest} (output.destination, probed with {probe.uri})"
        s3.retrying(lambda: client.put_object(Bucket=probe.bucket, Key=probe.key, Body=b"sft write probe\n"), what)
        try:
            s3.retrying(lambda: client.delete_object(Bucket=probe.bucket, Key=probe.key), what)
        except AccessDenied as e:  # writing is what the export needs; a leftover probe object is harmless
            log.warning("cannot delete the write probe %s: %s", probe.uri, e.reason)
        return
    folder = paths.resolve(dest)
    if dest.startswith("pvc://"):
        claim = dest[len("pvc://") :].partition("/")[0]
        mount = paths.pvc_root() / claim
        if not mount.is_dir():
            raise NotFound(f"{dest} (output.destination): the claim {claim!r} is not mounted here (no folder {mount})")
    probe = folder / f"{PROBE}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"sft write probe\n")
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise AccessDenied(f"{dest} (output.destination): cannot write {probe}: {e.strerror or e}") from None
        raise StorageUnavailable(f"{dest} (output.destination): cannot write {probe}: {e.strerror or e}") from None


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise CacheTooSmall(
            f"the fetch cache {root} has {free / 2**30:.2f} GiB free but the sources need {needed / 2**30:.2f} GiB "
            "more; raise spec.storage.cache.size or use a bigger claim"
        )


def _write_marker(remote: Remote, path: Path, info: dict[str, Any]) -> None:
    marker = paths.done_marker(remote.source, remote.revision)
    doc = {"source": remote.source, "revision": remote.revision, "kind": remote.kind, "path": str(path),
           "fetchedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, marker)


def _read_marker(remote: Remote) -> dict[str, Any] | None:
    try:
        return json.loads(paths.done_marker(remote.source, remote.revision).read_text())
    except (OSError, ValueError):
        return None


class _Plan:
    remote: Remote
    total: int = 0
    present: int = 0

    def run(self, progress: FetchProgress) -> Path:
        raise NotImplementedError


def _plan(remote: Remote, spec: TrainingSpec) -> _Plan:
    if remote.kind == "s3":
        return _S3Plan(remote, spec)
    return _HubPlan(remote)


class _S3Plan(_Plan):
    """Objects of an s3:// key or prefix, compared with what the cache holds."""

    def __init__(self, remote: Remote, spec: TrainingSpec):
        from . import s3

        self.remote = remote
        self.s3 = s3
        self.client = s3.client(spec.storage.s3 if spec.storage else None)
        self.loc = s3.Location.parse(remote.source)
        self.objects = s3.list_source(self.client, self.loc)
        self.dest = paths.s3_cache_path(remote.source)
        known = (_read_marker(remote) or {}).get("objects", {})
        self.todo = []
        for o in self.objects:
            target = self._target(o)
            if known.get(o.key) == {"size": o.size, "etag": o.etag} and target.exists() and target.stat().st_size == o.size:
                self.present += o.size
            else:
                self.todo.append(o)
        self.total = sum(o.size for o in self.objects)

    def _target(self, obj) -> Path:
        if obj.key == self.loc.key:  # the source is one object
            return self.dest
        # Listed keys are the bucket's, not the spec's: one with a . or .. segment must not leave dest.
        return paths.within(self.dest, obj.key[len(self.loc.key) :].lstrip("/"), f"s3://{self.loc.bucket}/{obj.key}")

    def run(self, progress: FetchProgress) -> Path:
        if not self.todo:
            log.info("%s: in the cache (%d object(s), unchanged)", self.remote.source, len(self.objects))
        for obj in self.todo:
            log.info("%s: downloading s3://%s/%s (%d bytes)", self.remote.source, self.loc.bucket, obj.key, obj.size)
            self.s3.download(self.client, self.loc.bucket, obj, self._target(obj), progress.add)
        _write_marker(self.remote, self.dest, {"objects": {o.key: {"size": o.size, "etag": o.etag} for o in self.objects}})
        return self.dest


class _HubPlan(_Plan):
    """A hub repo at one commit: the spec's revision resolved once, then that snapshot."""

    def __init__(self, remote: Remote):
        self.remote = remote
        self.dest = paths.hub_cache_path(remote.source, remote.kind, remote.revision)
        marker = _read_marker(remote)
        revision = remote.revision or "main"
        if marker and marker.get("commit") and _is_commit(revision):
            self.commit, self.files = marker["commit"], marker["files"]  # a commit never changes: no request
        else:
            self.commit, self.files = _hub_call(remote, lambda api: _repo_files(api, remote))
        self.total = sum(self.files.values())
        if marker and marker.get("commit") == self.commit and self.dest.is_dir():
            self.present = self.total
            self.done = True
        else:
            self.done = False
            self.present = sum(
                size for name, size in self.files.items()
                if (self.dest / name).is_file() and (self.dest / name).stat().st_size == size
            )

    def run(self, progress: FetchProgress) -> Path:
        if self.done:
            log.info("%s: in the cache (commit %s)", self.remote.source, self.commit)
            return self.dest
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # bytes go to the progress file and reports instead
        self.dest.mkdir(parents=True, exist_ok=True)
        # huggingface_hub writes each file to a process-unique *.incomplete and never reuses one: remove
        # those an interrupted attempt left, or they would fill the cache.
        for stale in (self.dest / ".cache").rglob("*.incomplete"):
            stale.unlink(missing_ok=True)
        base = progress.done
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(progress, base, stop), daemon=True)
        watcher.start()
        try:
            _hub_call(self.remote, lambda api: snapshot_download(
                self.remote.source, repo_type=self.remote.kind, revision=self.commit, local_dir=self.dest,
                token=api.token, max_workers=HUB_WORKERS,
            ))
        finally:
            stop.set()
            watcher.join()
        progress.set_done(base - self.present + self.total)
        _write_marker(self.remote, self.dest, {"commit": self.commit, "files": self.files})
        return self.dest

    def _watch(self, progress: FetchProgress, base: int, stop: threading.Event) -> None:
        """huggingface_hub reports no bytes to us: count what is on disk, including files in flight."""
        while not stop.wait(0.5):
            on_disk = sum(
                size for name, size in self.files.items()
                if (self.dest / name).is_file() and (self.dest / name).stat().st_size == size
            )
            partial = sum(p.stat().st_size for p in (self.dest / ".cache").rglob("*.incomplete") if p.is_file())
            progress.set_done(base - self.present + on_disk + partial)


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _repo_files(api, remote: Remote) -> tuple[str, dict[str, int]]:
    info = api.repo_info(remote.source, repo_type=remote.kind, revision=remote.revision, files_metadata=True)
    return info.sha, {s.rfilename: int(s.size or 0) for s in info.siblings or []}


def _hub_call(remote: Remote, fn):
    """Call the hub; terminal errors name the repo, network errors are retried with backoff."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    from .s3 import Backoff

    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    what = f"hub {remote.kind} {remote.source} (revision {remote.revision or 'main'})"
    backoff = Backoff()
    while True:
        try:
            return fn(api)
        except hf.GatedRepoError as e:
            raise AccessDenied(f"{what}: gated; accept its terms on the hub and set a token (model.tokenSecretRef): {_first_line(e)}") from None
        except hf.RepositoryNotFoundError as e:
            raise NotFound(f"{what}: no such repository, or it is private and the token cannot see it: {_first_line(e)}") from None
        except hf.RevisionNotFoundError:
            raise NotFound(f"{what}: no such revision (branch, tag or commit) in this repository") from None
        except hf.EntryNotFoundError as e:
            raise NotFound(f"{what}: a file of the snapshot is missing: {_first_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - HTTP status decides; connection errors are transient
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise AccessDenied(f"{what}: HTTP {status}: {_first_line(e)}") from None
            if status is not None and status < 500 and status != 429:
                raise
            if status is None and not _is_network_error(e):
                raise
            backoff.wait(StorageUnavailable(f"{what}: {type(e).__name__}: {_first_line(e)}"))


def _is_network_error(e: Exception) -> bool:
    import httpx

    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(e, (httpx.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from .__main__ import DEFAULT_CONFIG, load_config, setup_logging, write_termination_log
    from .reporter import ProgressReporter

    p = argparse.ArgumentParser(
        prog="python -m sft_trainer.fetch",
        description="Fetch the spec's hub and s3:// sources once into the cache (SFT_CACHE_DIR).",
    )
    p.add_argument("--config", default=os.environ.get("SFT_CONFIG", DEFAULT_CONFIG), help="TrainingSpec JSON/YAML file")
    p.add_argument("--cache-dir", help="the cache folder (default: $SFT_CACHE_DIR)")
    p.add_argument("--world-size", type=int, default=1, help="processes the run will have (for the estimated steps)")
    p.add_argument("--no-data-check", action="store_true", help="fetch only; skip the data check")
    args = p.parse_args(argv)
    if args.cache_dir:
        os.environ["SFT_CACHE_DIR"] = args.cache_dir
    setup_logging()
    for noisy in ("httpx", "httpx2", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    reporter = None
    try:
        spec = load_config(args.config)
        reporter = ProgressReporter.from_env()
        with sigterm_interrupts("the fetch stage"):  # a pod deleted mid-download: retried uncounted, resumes
            progress = cache_progress(reporter)
            fetch_all(spec, progress=progress)
            if not args.no_data_check:
                from . import datacheck

                datacheck.run(spec, world=max(1, args.world_size), reporter=reporter,
                              fetched=(progress.done, progress.total))
        return ExitCode.OK
    except TrainerError as e:
        log.error("%s (exit %d %s)", e.reason, e.code, e.code.name)
        write_termination_log(e.reason)
        return int(e.code)
    except Exception as e:  # noqa: BLE001 - a bug: traceback in the log, the reason in the message
        traceback.print_exc()
        write_termination_log(f"{type(e).__name__}: {e}")
        return 1
    finally:
        if reporter is not None:
            reporter.close()


if __name__ == "__main__":
    sys.exit(main())
