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
- **A lock file** ``.sft-lock`` in the destination names the run holding it, the writing pod
  (``$SFT_POD_NAME``, else the host name), its pid, an epoch, a token and a heartbeat rank 0 refreshes every
  30 s. Another run finding a fresh heartbeat (under 120 s old) stops with exit 64; a stale lock (a killed
  pod) is taken over. The same run id in another pod is a restarted pod of the same SFTJob and takes over at
  once; in the same pod with the holder's pid alive it is a second copy of the run and stops. The lock is
  removed when the run ends (only by its holder).
- **The lock is a fence.** Taking it over bumps the epoch and writes a new token. Before every commit
  (a checkpoint renamed into place, old checkpoints rotated away, half-written ones cleaned up, the model and
  metrics.json written, each export upload) the writer re-reads the lock; one whose token is no longer there
  (a pod cut off by a network partition whose replacement took over) stops with exit 79 (Superseded) and
  deletes nothing. Its heartbeat stops too, so it never overwrites the new owner's lock. What is left: a
  commit that started before the takeover is not undone, so the old writer can finish the one file it was
  renaming; it deletes nothing after the takeover.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sft_contract.exit_codes import ExitCode
from sft_contract.spec import TrainingSpec

from . import checkpoint
from .errors import ConfigError, TrainerError

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


class Superseded(TrainerError):
    """Another pod took this run's destination over (see the module doc): exit 79, uncounted."""

    def __init__(self, reason: str):
        super().__init__(ExitCode.SUPERSEDED, reason)


def writer_name() -> str:
    """The writing pod: its name in a cluster (``$SFT_POD_NAME``; an Indexed Job's replacement pod has the same
    host name as the pod it replaces, but another name), else this host."""
    return os.environ.get("SFT_POD_NAME", "").strip() or socket.gethostname()


class DestinationLock:
    """A heartbeat lock file that fences; see the module doc. ``acquire`` raises ConfigError when a live run
    holds it; ``check`` raises Superseded once another writer has taken it over."""

    def __init__(self, out_dir: Path, rid: str, display: str):
        self.path = out_dir / LOCK
        self.rid = rid
        self.display = display
        self.pod = writer_name()
        self.epoch = 0
        self.token: str | None = None  # set while held
        self._superseded: str | None = None  # why check() fails, once the heartbeat found another owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        tmp = self.path.with_name(f"{LOCK}.{self.token}.tmp")  # two writers never share a temporary file
        body = {"runId": self.rid, "pod": self.pod, "host": socket.gethostname(), "pid": os.getpid(),
                "epoch": self.epoch, "token": self.token, "heartbeat": time.time()}
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)

    def _live_conflict(self, held: dict) -> str | None:
        age = time.time() - float(held.get("heartbeat", 0))
        pod, pid = held.get("pod", held.get("host")), held.get("pid")
        if age > STALE_S:
            return None
        if held.get("runId") != self.rid:
            return f"another run ({held.get('runId')}, pod {pod}, pid {pid}) holds it, heartbeat {age:.0f} s ago"
        if pod == self.pod and pid != os.getpid() and _alive(pid):
            return f"a second copy of this run (pod {pod}, pid {pid}) is running"
        return None  # this run restarted (another pod of the same SFTJob): take over, fencing the old one

    def acquire(self) -> None:
        if self.token is not None:  # already held (the caller keeps it through the export)
            return
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
            elif held.get("pod", held.get("host")) != self.pod:
                log.warning("%s/%s: taking over from pod %s (epoch %s); it stops before its next write",
                            self.display, LOCK, held.get("pod", held.get("host")), held.get("epoch", 0))
        self.epoch = int((held or {}).get("epoch", 0)) + 1
        self.token = uuid.uuid4().hex
        self._write()
        self._thread = threading.Thread(target=self._beat, name="sft-lock", daemon=True)
        self._thread.start()

    def superseded(self) -> str | None:
        """Why this writer no longer owns the destination (re-reads the lock), or None while it does."""
        if self.token is None:
            return None  # not taken (another rank, or before claim): nothing to fence
        if self._superseded:
            return self._superseded
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return "its lock file is gone (removed by a newer writer that finished)"
        except (OSError, ValueError) as e:  # cannot tell (a flaky network volume): keep going, check again later
            log.warning("cannot read %s: %s", self.path, e)
            return None
        if isinstance(held, dict) and held.get("token") == self.token:
            return None
        held = held if isinstance(held, dict) else {}
        return (f"pod {held.get('pod', held.get('host'))} took the lock over (epoch {held.get('epoch')}, "
                f"this pod {self.pod} held epoch {self.epoch})")

    def check(self) -> None:
        """Before a commit: raise Superseded (exit 79) unless this writer still holds the lock."""
        why = self.superseded()
        if why:
            self._superseded = why
            self._stop.set()
            raise Superseded(
                f"{self.display}/{LOCK}: {why}: another pod now writes this run's output, so this one stops "
                "without writing or deleting anything (a pod cut off by a network partition and replaced)"
            )

    def refresh(self) -> bool:
        """Rewrite the heartbeat, unless another writer took the lock over (never overwrite the new owner's
        lock): then False, and ``check`` fails from now on."""
        why = self.superseded()
        if why:
            if not self._superseded:
                log.error("%s/%s: %s; this pod stops before its next write", self.display, LOCK, why)
            self._superseded = why
            return False
        self._write()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.refresh():
                    return
            except OSError as e:  # a full disk must not stop training; the lock just ages
                log.warning("cannot refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.token is not None and self.superseded() is None:
            self.path.unlink(missing_ok=True)
        self.token = None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
