"""Where the model is and how its tokenizer is loaded, without torch: the fetch stage's data check and
``sftctl validate --data`` load the tokenizer exactly as the trainer does (modeling.py uses these)."""

from __future__ import annotations

import os

from sft_contract.spec import TrainingSpec

from . import hub, paths
from .errors import ModelLoadError, TrainerError


def model_location(spec: TrainingSpec) -> str:
    src = spec.model.source
    if not paths.is_local(src):
        # A hub id the fetch stage mirrored into the cache loads from there (pinned revision).
        return paths.hub_location(src, "model", spec.model.revision)
    # A missing pvc://, s3:// or path is said as such: from_pretrained would take it for a hub id.
    reason = paths.missing_reason(src)
    if reason is not None:
        raise ModelLoadError(reason)
    return str(paths.resolve(src))


def load_or_fail(what: str, load):
    """A hub load with retries; a permanent failure is a model-load error with its reason."""
    try:
        return hub.with_retries(load, what)
    except TrainerError:  # StorageUnavailable after retries (exit 69), or our own errors
        raise
    except Exception as e:  # noqa: BLE001 - any other loader failure is a model-load error with its reason
        raise ModelLoadError(f"{what}: {type(e).__name__}: {e}") from None


def load_tokenizer(spec: TrainingSpec):
    from transformers import AutoTokenizer

    kw = {"revision": spec.model.revision, "token": os.environ.get("HF_TOKEN")}
    tok = load_or_fail(f"cannot load the tokenizer from {spec.model.source}",
                       lambda: AutoTokenizer.from_pretrained(model_location(spec), **kw))
    tok.padding_side = "right"
    return tok
