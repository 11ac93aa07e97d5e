"""Checkpoints belong to their run, and a destination to one live run at a time.

- **Run identity.** ``$SFT_RUN_ID`` (the renderer sets it to the SFTJob's uid, so every pod and restart of
  one SFTJob shares it and a deleted-and-recreated SFTJob does not), else ``config-<hash>`` of what
  defines the training (model, dataset, hyperparameters, freezing, peft, evaluation; not checkpointing,
  output or distributed, which say how it runs) — so ``sftctl run`` resumes the same config and never an
  edited one. Every checkpoint's trainer_state.json records it.
- **A foreign checkpoint is never resumed.** If ``checkpoints/`` holds a complete checkpoint of another
  run (or one with no id), the run stops with exit 64 naming the path and both ids, and touches nothing:
  another run's checkpoints are not deleted or rotated. Choose a new ``output.destination``, or delete
  the old checkpoints to start over there.
- **A lock file** ``.sft-lock`` in the destination names the run holding it, its host and pid, and a
  heartbeat rank 0 refreshes every 30 s. Another run finding a fresh heartbeat (under 120 s old) stops
  with exit 64; a stale lock (a killed pod) is taken over. The same run id on another host is a restarted
  pod of the same SFTJob and takes over at once; on the same host with the holder's pid alive it is a
  second copy of the run and stops. The lock is removed when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from . import checkpoint
from .config import TrainingSpec
from .errors import ConfigError

log = logging.getLogger(__name__)

LOCK = ".sft-lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0
IDENTITY_FIELDS = ("model", "dataset", "hyperparameters", "freeze_layers", "freeze_embeddings", "peft", "evaluation")


def run_id(spec: TrainingSpec) -> str:
    """``$SFT_RUN_ID``, or a hash of the fields that define the training."""
    given = os.environ.get("SFT_RUN_ID", "").strip()
    if given:
        return given
    canonical = json.dumps(spec.model_dump(mode="json", include=set(IDENTITY_FIELDS)), sort_keys=True)
    return "config-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_checkpoints(ckpt_dir: Path, rid: str, display: str) -> None:
    """Exit 64 if any complete checkpoint in ``ckpt_dir`` belongs to another run."""
    for path in checkpoint.complete(ckpt_dir):
        try:
            owner = checkpoint.trainer_state(path).get("runId")
        except (OSError, ValueError):
            owner = None
        if owner != rid:
            raise ConfigError(
                f"{display}/{path.name} is a checkpoint of another run ({owner or 'no run id'}; this run is {rid}): "
                "it is never resumed or deleted. Use a new output.destination, or delete its checkpoints/ folder "
                "to start over there"
            )


class DestinationLock:
    """A heartbeat lock file; see the module doc. ``acquire`` raises ConfigError when a live run holds it."""

    def __init__(self, out_dir: Path, rid: str, display: str):
        self.path = out_dir / LOCK
        self.rid = rid
        self.display = display
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        body = {"runId": self.rid, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)

    def _live_conflict(self, held: dict) -> str | None:
        age = time.time() - float(held.get("heartbeat", 0))
        host, pid = held.get("host"), held.get("pid")
        if age > STALE_S:
            return None
        if held.get("runId") != self.rid:
            return f"another run ({held.get('runId')}, host {host}, pid {pid}) holds it, heartbeat {age:.0f} s ago"
        if host == socket.gethostname() and pid != os.getpid() and _alive(pid):
            return f"a second copy of this run (host {host}, pid {pid}) is running"
        return None  # this run restarted (another pod of the same SFTJob): take over

    def acquire(self) -> None:
        held = self._holder()
        if held:
            conflict = self._live_conflict(held)
            if conflict:
                raise ConfigError(
                    f"{self.display}/{LOCK}: {conflict}. Two live runs cannot share output.destination; "
                    f"use another one (a lock older than {STALE_S:.0f} s is taken over)"
                )
            if held.get("runId") != self.rid:
                log.warning("%s/%s: taking over a stale lock of run %s", self.display, LOCK, held.get("runId"))
        self._write()
        self._thread = threading.Thread(target=self._beat, name="sft-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as e:  # a full disk must not stop training; the lock just ages
                log.warning("cannot refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        held = self._holder()
        if held and held.get("runId") == self.rid and held.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
