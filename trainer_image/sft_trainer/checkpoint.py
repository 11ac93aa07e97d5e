"""Atomic checkpoints: written to a hidden temporary folder, completed with a marker file, then renamed.

A folder named ``step-NNNNNNNN`` with a ``COMPLETE`` marker is always whole; anything else (a pod killed
mid-write) is ignored and cleaned up. Resume picks the newest complete one. ``fence`` (the destination
lock's ``check``) runs before every rename and delete: a writer that was superseded stops there.

Layout of one checkpoint::

    step-00000120/
      trainable.safetensors   trainable parameters only (full weights, or LoRA adapters); a tensor shared
                              under several names (tied embeddings) is stored once, its other names in
                              the file's metadata
      optimizer.pt            optimizer, scheduler, loss scaler and RNG states: tensors and plain Python
                              values only, loaded with ``torch.load(weights_only=True)`` (no code runs)
      trainer_state.json      the run's id, step, epoch, position in the epoch, best eval loss, guard history
      COMPLETE
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import DataError

MARKER = "COMPLETE"
NAME = re.compile(r"^step-(\d{8})$")
STATE = "trainer_state.json"
ALIASES = "aliases"  # safetensors metadata key: {"other name": "stored name"} for shared tensors


def dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once (safetensors refuses shared memory): (tensors, alias -> stored name)."""
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key in sorted(tensors):
        t = tensors[key]
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in kept:
            aliases[key] = kept[ident]
        else:
            kept[ident] = key
            out[key] = t.contiguous()
    return out, aliases


def name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unfenced() -> None:
    pass


def save(root: Path, step: int, tensors: dict[str, torch.Tensor], states: dict[str, Any], trainer_state: dict[str, Any],
         fence: Callable[[], None] = _unfenced) -> Path:
    """Write one checkpoint atomically; returns its final path (an existing one is kept as is)."""
    fence()  # before writing gigabytes, and again before the rename
    root.mkdir(parents=True, exist_ok=True)
    final = root / name(step)
    if (final / MARKER).exists():
        return final
    tmp = root / f".tmp-{name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stored, aliases = dedupe(tensors)
    save_file(stored, tmp / "trainable.safetensors", metadata={ALIASES: json.dumps(aliases)})
    torch.save(states, tmp / "optimizer.pt")
    (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    with open(tmp / MARKER, "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    fence()
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of that name
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def clean_partial(root: Path, fence: Callable[[], None] = _unfenced) -> None:
    """Remove half-written checkpoints left by a killed process."""
    if not root.is_dir():
        return
    fence()
    for p in root.iterdir():
        if p.name.startswith(".tmp-") or (NAME.match(p.name) and not (p / MARKER).exists()):
            shutil.rmtree(p, ignore_errors=True)


def rotate(root: Path, keep: int, protect: Path | None = None, fence: Callable[[], None] = _unfenced) -> None:
    """Keep the newest ``keep`` complete checkpoints, plus ``protect`` (the best one)."""
    found = complete(root)
    old = found[: max(0, len(found) - keep)]
    if old:
        fence()
    for p in old:
        if protect is None or p.resolve() != protect.resolve():
            shutil.rmtree(p, ignore_errors=True)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors under every name they were saved with (shared tensors shared again)."""
    from safetensors import safe_open

    file = path / "trainable.safetensors"
    with safe_open(file, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES, "{}"))
    tensors = load_file(file)
    for alias, stored in aliases.items():
        tensors[alias] = tensors[stored]
    return tensors


def trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable tensors, optimizer/scheduler/scaler/RNG states, trainer state) of one checkpoint.

    ``weights_only=True``: a file holding anything but tensors and plain values (code planted in a
    pickle) is refused, never run: exit 65 naming the checkpoint.
    """
    try:
        states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return load_tensors(path), states, trainer_state(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be loaded safely as a checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); delete it to resume from an older one") from None
