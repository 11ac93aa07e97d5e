"""Where a spec's sources live on this machine: local paths, ``~``, ``pvc://claim/path``, and the fetch cache.

Inside a pod the operator mounts each claim at ``/mnt/pvc/<claim>``; ``SFT_PVC_ROOT`` moves that root
(tests and ``sftctl run`` map pvc:// to a local folder with it). Hub ids and ``s3://`` locations are read
from the fetch cache (``SFT_CACHE_DIR``), filled once by ``python -m sft_trainer.fetch``:

    <cache>/s3/<bucket>/<key>                          s3:// objects and prefixes, mirrored (outputs are staged here too)
    <cache>/hub/<models|datasets>/<org>/<name>/<rev>/  hub snapshots (rev: the spec's revision, default main)
    <cache>/.sft/done/<hash>.json                      one marker per fetched source: its files, sizes, etags/commit
    <cache>/.sft/fetch-progress.json                   the fetch stage's byte progress

Anything else that does not exist locally is treated as a hub id by the callers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DEFAULT_PVC_ROOT = "/mnt/pvc"
# `sftctl run` and a trainer started by hand; in a pod the operator sets SFT_CACHE_DIR to the cache volume.
DEFAULT_LOCAL_CACHE = "~/.cache/sft-operator/fetch"


def pvc_root() -> Path:
    return Path(os.environ.get("SFT_PVC_ROOT", DEFAULT_PVC_ROOT))


def cache_root() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR") or DEFAULT_LOCAL_CACHE).expanduser()


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); the key has no leading or trailing slash."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def s3_cache_path(uri: str) -> Path:
    bucket, key = split_s3(uri)
    return cache_root() / "s3" / bucket / key


def hub_cache_path(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path:
    rev = (revision or "main").replace("/", "--")  # branch names such as refs/pr/1
    return cache_root() / "hub" / f"{repo_type}s" / repo_id / rev


def done_marker(source: str, revision: str | None = None) -> Path:
    digest = hashlib.sha256(f"{source}@{revision or ''}".encode()).hexdigest()[:32]
    return cache_root() / ".sft" / "done" / f"{digest}.json"


def fetched(source: str, revision: str | None = None) -> Path | None:
    """The local copy of a fetched hub or s3:// source, or None when the fetch stage has not completed it."""
    marker = done_marker(source, revision)
    try:
        return Path(json.loads(marker.read_text())["path"])
    except (OSError, ValueError, KeyError):
        return None


def resolve(source: str) -> Path:
    """The local path for a source string (pvc:// mapped onto the mount root, s3:// onto the cache, ``~`` expanded)."""
    if source.startswith("pvc://"):
        rest = source[len("pvc://") :]
        claim, _, sub = rest.partition("/")
        return pvc_root() / claim / sub
    if source.startswith("s3://"):
        return s3_cache_path(source)
    return Path(os.path.expanduser(source))


def is_local(source: str) -> bool:
    """True for pvc://, s3:// (read from the cache), absolute, ``~``, ``./`` paths and anything that exists here;
    hub ids otherwise."""
    if source.startswith(("pvc://", "s3://", "/", "~", "./", "../")):
        return True
    return resolve(source).exists()


def hub_location(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    """Where to load a hub id from: its fetched snapshot; the hub itself only when no cache is configured.

    With ``SFT_CACHE_DIR`` set (a pod) an unfetched hub id is an error rather than a silent download into the
    pod's scratch space.
    """
    snapshot = fetched(repo_id, revision)
    if snapshot is not None:
        return str(snapshot)
    if os.environ.get("SFT_CACHE_DIR"):
        from .errors import DataError, ModelLoadError

        error = DataError if repo_type == "dataset" else ModelLoadError
        raise error(
            f"{repo_id} ({repo_type}, revision {revision or 'main'}) is not in the fetch cache {cache_root()}: "
            "the fetch stage (python -m sft_trainer.fetch) must run first"
        )
    return repo_id
