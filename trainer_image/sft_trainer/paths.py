"""Where a spec's sources live on this machine: local paths, ``~``, and ``pvc://claim/path``.

Inside a pod the operator mounts each claim at ``/mnt/pvc/<claim>``; ``SFT_PVC_ROOT`` moves that root
(tests and ``sftctl run`` map pvc:// to a local folder with it). Anything else that does not exist
locally is treated as a hub id by the callers.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PVC_ROOT = "/mnt/pvc"


def pvc_root() -> Path:
    return Path(os.environ.get("SFT_PVC_ROOT", DEFAULT_PVC_ROOT))


def resolve(source: str) -> Path:
    """The local path for a source string (pvc:// mapped onto the mount root, ``~`` expanded)."""
    if source.startswith("pvc://"):
        rest = source[len("pvc://") :]
        claim, _, sub = rest.partition("/")
        return pvc_root() / claim / sub
    return Path(os.path.expanduser(source))


def is_local(source: str) -> bool:
    """True for pvc://, absolute, ``~``, ``./`` paths and anything that exists here; hub ids otherwise."""
    if source.startswith(("pvc://", "/", "~", "./", "../")):
        return True
    return resolve(source).exists()
