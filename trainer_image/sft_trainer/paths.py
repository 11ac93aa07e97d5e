"""Where a spec's sources live on this machine: local paths, ``~``, ``pvc://claim/path``, and the fetch cache.

Inside a pod the operator mounts each claim at ``/mnt/pvc/<claim>``; ``SFT_PVC_ROOT`` moves that root
(tests and ``sftctl run`` map pvc:// to a local folder with it). Hub ids and ``s3://`` locations are read
from the fetch cache (``SFT_CACHE_DIR``), filled once by ``python -m sft_trainer.fetch``:

    <cache>/s3/<bucket>/<key>                          s3:// objects and prefixes, mirrored (outputs are staged here too)
    <cache>/hub/<models|datasets>/<org>/<name>/<rev>/  hub snapshots (rev: the spec's revision, default main)
    <cache>/.sft/done/<hash>.json                      one marker per fetched source: its files, sizes, etags/commit
    <cache>/.sft/fetch-progress.json                   the fetch stage's byte progress

Anything else that does not exist locally is treated as a hub id by the callers; a pvc:// or s3:// location
never is (``missing_reason`` says why one is not here instead).

Every path built from a reference stays under its root (``within``): the API server already refuses ``.`` and
``..`` segments (``references``), and a key listed from a bucket or a hand-written config is checked again
where it becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sft_contract.references import EXPLICIT_LOCAL, split_pvc, split_s3
from sft_contract.sources import names_a_path

from .errors import ConfigError

DEFAULT_PVC_ROOT = "/mnt/pvc"
# `sftctl run` and a trainer started by hand; in a pod the operator sets SFT_CACHE_DIR to the cache volume.
DEFAULT_LOCAL_CACHE = "~/.cache/sft-operator/fetch"


def pvc_root() -> Path:
    return Path(os.environ.get("SFT_PVC_ROOT", DEFAULT_PVC_ROOT))


def cache_root() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR") or DEFAULT_LOCAL_CACHE).expanduser()


class Escapes(ConfigError):
    """A reference that would resolve outside its root."""


def within(root: Path, relative: str, what: str) -> Path:
    """``root/relative``, refused when ``relative`` is absolute or has a ``.`` or ``..`` segment: such a path
    would leave ``root`` or alias another entry under it (another bucket's cache, a done-marker).

    Lexical, so pure: the strings are what is untrusted; a claim's own symlinks are its owner's business.
    """
    parts = relative.split("/")
    if relative.startswith("/") or "." in parts or ".." in parts:
        raise Escapes(f"{what}: a path under {root} may not be absolute or have . or .. segments")
    return root.joinpath(*(p for p in parts if p))


def pvc_claim_dir(claim: str) -> Path:
    return pvc_root() / claim


def pvc_path(uri: str) -> Path:
    claim, sub = split_pvc(uri)
    return within(pvc_claim_dir(claim), sub, uri)


def s3_cache_path(uri: str) -> Path:
    bucket, key = split_s3(uri)
    return within(cache_root() / "s3", f"{bucket}/{key}".rstrip("/"), uri)


def hub_cache_path(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path:
    rev = (revision or "main").replace("/", "--")  # branch names such as refs/pr/1
    return within(cache_root() / "hub" / f"{repo_type}s", f"{repo_id}/{rev}", f"{repo_id}@{rev}")


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
        return pvc_path(source)
    if source.startswith("s3://"):
        return s3_cache_path(source)
    return Path(os.path.expanduser(source))


def missing_reason(source: str) -> str | None:
    """Why a pvc:// or s3:// source is not on this machine, or None when it is (or is not such a location).

    The callers raise it as their own error rather than letting a loader try the path as a hub id.
    """
    if source.startswith("pvc://"):
        claim, _ = split_pvc(source)
        claim_dir = pvc_claim_dir(claim)
        if not claim_dir.is_dir():
            return (
                f"{source}: the claim {claim!r} is not mounted on this machine (no folder {claim_dir}). In a cluster "
                f"the operator mounts it at {DEFAULT_PVC_ROOT}/{claim}; on this machine point SFT_PVC_ROOT at a "
                f"folder that holds one subfolder per claim, e.g. SFT_PVC_ROOT=DIR with the claim's files in DIR/{claim}"
            )
        path = resolve(source)
        if not path.exists():
            return f"{source}: no such file or folder {path} on the claim {claim!r}"
        return None
    if source.startswith(("s3://", *EXPLICIT_LOCAL)):
        path = resolve(source)
        if path.exists():
            return None
        if source.startswith("s3://"):
            return f"{source}: not in the fetch cache ({path}); the fetch stage (python -m sft_trainer.fetch) must run first"
        return f"{source}: no such file or folder"
    return None


def unmounted_claims(references: list[tuple[str, str]]) -> str | None:
    """For ``sftctl run``, where no cluster mounts anything: which pvc:// claims of (field, source) pairs have no
    folder on this machine, and how to map them; None when every claim is there."""
    missing: dict[str, str] = {}
    for field, source in references:
        if source.startswith("pvc://"):
            claim, _ = split_pvc(source)
            if not pvc_claim_dir(claim).is_dir():
                missing.setdefault(claim, field)
    if not missing:
        return None
    listed = ", ".join(f"the claim {claim!r} ({field})" for claim, field in missing.items())
    return (
        f"not mounted on this machine: {listed}. Here pvc://<claim>/<path> is read from $SFT_PVC_ROOT/<claim>/<path>, "
        f"and SFT_PVC_ROOT ({pvc_root()}) has no folder for {'it' if len(missing) == 1 else 'them'}. Map claims to local folders: "
        "SFT_PVC_ROOT=DIR sftctl run ..., with one folder per claim in DIR (for the dev cluster's claims, "
        "DIR=~/.cache/sft-operator/dev-cluster/volumes/<namespace>)"
    )


def is_local(source: str) -> bool:
    """True for pvc://, s3:// (read from the cache), absolute, ``~``, ``./`` paths and anything that exists here;
    hub ids otherwise."""
    return names_a_path(source, lambda s: resolve(s).exists())


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
