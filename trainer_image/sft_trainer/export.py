"""The export: a finished run's outputs uploaded to an s3:// destination, a ``COMPLETE`` marker last.

Training writes into the local staging folder for the destination (``paths.resolve``: on the cache volume in a
cluster). ``export(out_dir, destination)`` then uploads::

    model/**            the fine-tuned model and tokenizer (rejected/model/** when an evaluation gate rejected it)
    metrics.json
    trainer_log.jsonl
    loss.png
    COMPLETE            written last: JSON with every file's size and sha256, and the time

Re-running it is safe and cheap: a marker that already lists the same files means there is nothing to do; a
different one is deleted first, so a reader never sees COMPLETE over a half-replaced model. Files already
stored with the same sha256 are skipped and a cut-off multipart upload continues at its next part
(``s3.upload``), so a pod killed mid-upload finishes the job on its retry. Checkpoints stay in the staging
folder (they are for resuming, not for consumers).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sft_contract.spec import S3Spec

from . import outputs, s3

log = logging.getLogger("sft_trainer.export")

MARKER = "COMPLETE"
STATE_FILE = ".export-state.json"  # multipart uploads in flight, in the staging folder
EXPORTED_FILES = (outputs.METRICS, outputs.LOG, outputs.PLOT)


def files_to_export(out_dir: Path) -> dict[str, Path]:
    """Relative object name -> local file, in upload order (model first, metrics last)."""
    model = outputs.model_dir(out_dir)
    if not model.is_dir():
        raise FileNotFoundError(f"{model}: no model to export (training did not finish?)")
    found = {p.relative_to(out_dir).as_posix(): p for p in sorted(model.rglob("*")) if p.is_file()}
    found.update({name: out_dir / name for name in EXPORTED_FILES if (out_dir / name).is_file()})
    return found


def export(
    out_dir: Path,
    destination: str,
    settings: S3Spec | None = None,
    *,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    fence: Callable[[], None] = lambda: None,
) -> str:
    """Upload ``out_dir``'s outputs to ``destination`` (s3://bucket/prefix); returns the destination URI.
    ``fence`` (the destination lock's check) runs before every write: a superseded writer stops there."""
    client = s3.client(settings)
    root = s3.Location.parse(destination)
    files = files_to_export(out_dir)
    manifest = {rel: {"size": p.stat().st_size, "sha256": s3.sha256_of(p)} for rel, p in files.items()}
    marker = root.join(MARKER)

    existing = _read_marker(client, marker)
    if existing is not None and existing.get("files") == manifest:
        log.info("%s: already exported (%s lists the same files)", root.uri, MARKER)
        total = sum(m["size"] for m in manifest.values())
        on_progress(total, total)
        return root.uri
    if existing is not None:
        fence()
        s3.retrying(lambda: client.delete_object(Bucket=marker.bucket, Key=marker.key), marker.uri)

    total = sum(m["size"] for m in manifest.values())
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        on_progress(done, total)

    state = s3.UploadState(out_dir / STATE_FILE)
    counts = {"skipped": 0, "put": 0, "multipart": 0}
    for rel, path in files.items():
        target = root.join(rel)
        fence()
        counts[s3.upload(client, path, target.bucket, target.key, manifest[rel]["sha256"], state, add)] += 1
    body = json.dumps(
        {"files": manifest, "completedAt": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1
    ).encode()
    fence()
    s3.retrying(lambda: client.put_object(Bucket=marker.bucket, Key=marker.key, Body=body), marker.uri)
    log.info(
        "exported %d files (%d bytes) to %s: %d uploaded, %d in parts, %d already there; %s written last",
        len(files), total, root.uri, counts["put"], counts["multipart"], counts["skipped"], MARKER,
    )
    return root.uri


def _read_marker(client, marker: s3.Location) -> dict | None:
    try:
        body = s3.retrying(lambda: client.get_object(Bucket=marker.bucket, Key=marker.key), marker.uri)["Body"].read()
    except s3.NotFound:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return {}
