"""Which of a spec's sources live outside the cluster's volumes: hub ids and s3:// locations (pure).

The operator decides from this whether a job needs the fetch stage and its cache; the fetch stage
downloads exactly these. Both must agree, so the decision is made here, from the spec's text alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .references import EXPLICIT_LOCAL
from .spec import TrainingSpec, is_s3

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # "x.jsonl" is a missing file, not a hub id


@dataclass(frozen=True)
class Remote:
    """One source the fetch stage downloads."""

    field: str  # where the spec names it, e.g. spec.model.source
    source: str
    kind: str  # "s3", "model" or "dataset" (hub repo types)
    revision: str | None = None


def names_a_path(source: str, exists_here: Callable[[str], bool] = lambda _: False) -> bool:
    """True for pvc://, s3:// (read from the cache) and explicit local paths; ``exists_here`` decides the rest.

    The operator passes nothing, so its output never depends on the directory it runs in; the trainer
    passes a check of its own file system (a relative path that exists there is read, not downloaded)."""
    return source.startswith(("pvc://", "s3://", *EXPLICIT_LOCAL)) or exists_here(source)


def remote_sources(spec: TrainingSpec, exists_here: Callable[[str], bool] = lambda _: False) -> list[Remote]:
    """The spec's hub and s3:// sources, each once."""
    out: list[Remote] = []
    m = spec.model
    if is_s3(m.source):
        out.append(Remote("spec.model.source", m.source, "s3"))
    elif not names_a_path(m.source, exists_here):
        out.append(Remote("spec.model.source", m.source, "model", m.revision))
    ds = spec.dataset
    sources = [(f"spec.dataset.{name}.source", data) for name, data in
               (("train", ds.train), ("validation", ds.validation), ("general", ds.general))]
    sources.append(("spec.evaluation.prompts.source", spec.evaluation.prompts))
    for where, data in sources:
        if data is None:
            continue
        if is_s3(data.source):
            out.append(Remote(where, data.source, "s3"))
        elif not names_a_path(data.source, exists_here) and not data.source.lower().endswith(DATA_SUFFIXES):
            out.append(Remote(where, data.source, "dataset"))
    unique: dict[tuple[str, str | None], Remote] = {}
    for r in out:
        unique.setdefault((r.source, r.revision), r)
    return list(unique.values())
