"""What a run leaves in ``output.destination`` (rank 0 writes it)::

    model/              the fine-tuned model and tokenizer (best weights when validation ran;
                        LoRA: the adapter, or the merged model with peft.merge)
    rejected/model/     instead of model/: the model a failed evaluation gate (onFail Fail) rejected, kept for
                        inspection where a pipeline that reads model/ does not pick it up
    checkpoints/        atomic training checkpoints (checkpoint.py)
    metrics.json        final metrics: losses, best checkpoint, forgetting, the evaluation gates, throughput,
                        data statistics
    trainer_log.jsonl   one JSON object per optimizer step and per evaluation
    loss.png            train and eval loss curves

With an ``s3://`` destination these are staged on the cache volume and exported at the end; until the export
has finished, ``<cache>/.sft/export-pending/<run id>.json`` records that a trained model awaits it
(``mark_export_pending``), so that a rerun of the run exports it instead of training again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from . import paths
from .errors import DataError

log = logging.getLogger(__name__)

MODEL_DIR = "model"
REJECTED_DIR = "rejected"
CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.json"
LOG = "trainer_log.jsonl"
PLOT = "loss.png"


class TrainerLog:
    """Append-only JSON lines; on resume, lines after the resumed step are dropped (they will be redone).

    A cut-off last line (a full disk, a kill mid-write) is dropped with a warning: the steps it logged are
    after the last checkpoint and will be redone. A bad line anywhere else is a DataError naming the line.
    """

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append(record)
            elif n == len(lines):
                log.warning("%s line %d: cut off (a full disk or a kill mid-write); dropped", self.path, n)
            else:
                raise DataError(f"{self.path} line {n}: not a JSON object; the run cannot tell which steps it logged. "
                                "Remove the line (or the file) and run again")
        return out


def readable_by_all(folder: Path) -> None:
    """Let every user read (and enter) what lies under ``folder``. safetensors writes its files
    with mode 0600 whatever the umask, and a saved model is read by other users: the host's user
    reading a pod's volume, or a trainer pod (UID 1000) reading assets written by root."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def model_dir(out_dir: Path) -> Path:
    """Where a finished run's model is: model/, or rejected/model/ when an evaluation gate rejected it."""
    rejected = out_dir / REJECTED_DIR / MODEL_DIR
    return rejected if rejected.is_dir() and not (out_dir / MODEL_DIR).is_dir() else out_dir / MODEL_DIR


def save_model(model, tokenizer, out: Path, *, merge_lora: bool = False) -> Path:
    """Save model and tokenizer into ``out`` via a temporary folder, so a reader never sees half a
    model; readable by every user, as a model on a shared volume must be."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    readable_by_all(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export_pending_marker(run_id: str) -> Path:
    """Where a finished, not yet exported run is recorded: on the cache volume, by run id (the SFTJob's uid)."""
    return paths.cache_root() / ".sft" / "export-pending" / f"{run_id}.json"


def mark_export_pending(run_id: str, destination: str, staging: Path, metrics: dict[str, Any]) -> None:
    """Record that ``staging`` holds the finished model of ``run_id``, to be exported to ``destination``."""
    marker = export_pending_marker(run_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_metrics(marker, {"runId": run_id, "destination": destination, "staging": str(staging), "metrics": metrics})


def export_pending(run_id: str, destination: str) -> dict[str, Any] | None:
    """The final metrics of this run's trained model still awaiting its export to ``destination``, or None.

    A new run (another SFTJob, so another run id) mounting a cache claim that the operator kept for an earlier
    run's unexported model, with the same destination, adopts that model: its marker becomes this run's, and
    the run exports it instead of training (the documented way to retry a failed export)."""
    marker = export_pending_marker(run_id)
    if not marker.exists():
        _adopt_kept_model(marker, destination)
    try:
        doc = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); the run trains again", marker, e)
        return None
    staged = model_dir(Path(doc.get("staging", "")))
    if doc.get("destination") != destination or not staged.is_dir():
        log.warning("%s: for %s with the model in %s, not this run's output (%s); the run trains again",
                    marker, doc.get("destination"), staged, destination)
        return None
    return doc.get("metrics") or {}


def _adopt_kept_model(marker: Path, destination: str) -> None:
    for other in sorted(marker.parent.glob("*.json")) if marker.parent.is_dir() else []:
        try:
            doc = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("destination") == destination and model_dir(Path(doc.get("staging", ""))).is_dir():
            log.info("%s: the trained model of run %s awaits its export to %s; this run adopts and exports it",
                     other, doc.get("runId"), destination)
            write_metrics(marker, {**doc, "runId": marker.stem, "adoptedFrom": doc.get("runId")})
            other.unlink(missing_ok=True)
            return


def clear_export_pending(run_id: str) -> None:
    export_pending_marker(run_id).unlink(missing_ok=True)


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """Train loss per step and eval loss per evaluation, on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["evalLoss"]) for r in records if "evalLoss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss (response tokens)", linewidth=0.6, alpha=0.35, color="tab:blue")
        # A moving average shows the trend through small-batch noise.
        k = max(1, len(losses) // 40)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"train loss, {k}-step average", linewidth=1.5, color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5, color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
