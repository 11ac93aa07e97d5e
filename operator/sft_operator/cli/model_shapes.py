"""Where ``sftctl validate`` finds a model's shapes for the memory estimate: the model's own config.json
(a local path, or pvc:// through ``$SFT_PVC_ROOT`` where the claim is mounted), the bundled table, or
the hub. The I/O edge of the estimate; ``sft_contract.memory`` itself only computes."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from sft_contract.memory import Shapes, table_shapes


def local_config(source: str) -> Path | None:
    """The config.json of a local or pvc:// model source, if it can be read here."""
    if source.startswith("pvc://"):
        claim, _, sub = source[len("pvc://") :].partition("/")
        path = Path(os.environ.get("SFT_PVC_ROOT", "/mnt/pvc")) / claim / sub
    else:
        path = Path(os.path.expanduser(source))
    cfg = path / "config.json"
    return cfg if cfg.is_file() else None


def hub_config(model_id: str, revision: str | None = None, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """config.json from the hub (``$HF_ENDPOINT``, ``$HF_TOKEN``); None when offline or unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(f"{endpoint}/{model_id}/resolve/{revision or 'main'}/config.json")
    if os.environ.get("HF_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def find_shapes(source: str, revision: str | None = None, *, network: bool = False) -> tuple[Shapes | None, str]:
    """(shapes, where they came from) — or (None, why there are none)."""
    try:
        cfg = local_config(source)
        if cfg is not None:
            return Shapes.from_config(json.loads(cfg.read_text()), f"{source}/config.json"), ""
        shapes = table_shapes(source)
        if shapes is not None:
            return shapes, ""
        if source.startswith(("pvc://", "/", "~", "./", "../")):
            return None, f"{source}/config.json cannot be read here (the trainer checks at start)"
        if network:
            fetched = hub_config(source, revision)
            if fetched is not None:
                return Shapes.from_config(fetched, f"hub config.json of {source}"), ""
        return None, (f"{source} is not in the bundled table and its config.json was "
                      f"{'not reachable' if network else 'not fetched'} (the trainer checks at start)")
    except (KeyError, ValueError, TypeError) as e:
        return None, f"cannot read the model shapes of {source}: {e}"
