"""``sftctl run FILE``: the trainer on this machine, on the same SFTJob manifest a cluster would run.

Only the training part of the spec is used (``TRAINING_FIELDS``); resources, image, scheduling and run
policy are cluster matters and are ignored. Progress shows as a rich progress bar; a summary table follows.
Exit codes are the trainer's (``exit_codes.ExitCode``); a run interrupted with Ctrl-C saves a checkpoint,
exits 75, and the same command resumes it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from sft_contract.exit_codes import ExitCode
from sft_contract.gate_table import gate_table, number

from . import gates
from .errors import ConfigError, EvaluationFailed, TrainerError
from .outputs import REJECTED_DIR


def _load_manifest(manifest: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(manifest, dict):
        return manifest
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(Path(manifest).expanduser().read_text(encoding="utf-8")) if d]
    except OSError as e:
        raise ConfigError(f"cannot read {manifest}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{manifest}: not valid YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "SFTJob"]
    if len(jobs) != 1:
        raise ConfigError(f"{manifest}: expected exactly one SFTJob document, found {len(jobs)}")
    return jobs[0]


def _ensure_tiny_assets(spec, console) -> None:
    """The example's assets are generated on first use, so ``sftctl run examples/local-tiny.yaml`` just works."""
    from . import paths, tiny

    default = tiny.DEFAULT_DIR.expanduser().resolve()
    wanted = [spec.model.source, spec.dataset.train.source]
    for src in wanted:
        p = paths.resolve(src).resolve() if paths.is_local(src) else None
        if p is not None and not p.exists() and default in p.parents and not tiny.is_complete(default):
            console.print(f"[dim]generating the tiny example assets in {default} (offline, ~10 s)[/dim]")
            tiny.generate(default)
            return


def check_claims_mounted(spec) -> None:
    """A cluster spec's pvc:// claims must have local folders before anything is fetched or loaded."""
    from . import paths

    refs = [("spec.model.source", spec.model.source)]
    for name in ("train", "validation", "general"):
        data = getattr(spec.dataset, name)
        if data is not None:
            refs.append((f"spec.dataset.{name}.source", data.source))
    if spec.evaluation.prompts is not None:
        refs.append(("spec.evaluation.prompts.source", spec.evaluation.prompts.source))
    refs.append(("spec.output.destination", spec.output.destination))
    reason = paths.unmounted_claims(refs)
    if reason is not None:
        raise ConfigError(reason)


def run(manifest: str | Path | dict[str, Any], *, output: str | None = None, console=None) -> int:
    """Run an SFTJob manifest's training spec locally; returns the trainer's exit code.

    ``manifest``: a YAML file path or an already-parsed SFTJob dict. ``output`` overrides
    ``spec.output.destination``. Shows a rich progress bar (epoch, step, loss, ETA) and a summary table.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    from .__main__ import parse_spec

    console = console or Console()
    try:
        doc = _load_manifest(manifest)
        if output:
            doc = {**doc, "spec": {**(doc.get("spec") or {}), "output": {"destination": output}}}
        spec = parse_spec(doc, str(manifest) if not isinstance(manifest, dict) else "manifest")
        _ensure_tiny_assets(spec, console)
        check_claims_mounted(spec)
    except TrainerError as e:
        console.print(f"[red]error:[/red] {e.reason}")
        return int(e.code)

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    name = (doc.get("metadata") or {}).get("name", "sftjob")
    try:
        from . import datacheck
        from .fetch import fetch_all
        from .reporter import ProgressReporter
        from .run_hooks import train_under_hooks

        fetch_all(spec)  # hub and s3:// sources into the cache (~/.cache/sft-operator/fetch or $SFT_CACHE_DIR)
        datacheck.run(spec)  # every bad row named before the model loads, as the cluster's fetch stage does
        metrics = train_under_hooks(spec, lambda hooks: _train_with_progress(spec, name, console, hooks.sinks),
                                    run_name=name, reporter=ProgressReporter(None, stdout=None))
        if metrics.get("evaluation"):
            console.print(gate_table(metrics["evaluation"]))
        rejected = gates.rejection(metrics)
        if rejected:
            raise EvaluationFailed(rejected)
    except TrainerError as e:
        console.print(f"[red]{ExitCode(e.code).name}[/red] (exit {int(e.code)}): {e.reason}")
        if e.code == ExitCode.INTERRUPTED:
            console.print("run the same command again to resume from the checkpoint")
        return int(e.code)
    console.print(summary_table(metrics))
    return 0


def _train_with_progress(spec, name: str, console, sinks) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import train

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]:.2f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eval {task.fields[eval]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(name, total=None, epoch=0.0, loss="-", eval="-", tps="-")

    def listener(r) -> None:
        progress.update(
            task,
            completed=r.step,
            total=r.total_steps,
            epoch=r.epoch,
            loss=f"{r.train_loss:.4f}" if r.train_loss is not None else "-",
            eval=f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-",
            tps=f"{r.tokens_per_second:,.0f}" if r.tokens_per_second else "-",
        )

    t0 = time.monotonic()
    with progress:
        metrics = train.run(spec, stdout=None, listener=listener, sinks=sinks)
    metrics.setdefault("wallSeconds", round(time.monotonic() - t0, 1))
    return metrics


def summary_table(m: dict[str, Any]):
    """The end-of-run summary: what a user checks first."""
    from rich.table import Table

    t = Table(title="fine-tuning summary", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    data = m.get("data", {})
    rows = [
        ("steps", f"{m['steps']} / {m['totalSteps']} ({m['epochs']:.2f} epochs)" + (" - stopped early" if m.get("stoppedEarly") else "")),
        ("train loss", number(m.get("trainLoss"))),
        ("eval loss", number(m.get("evalLoss"))),
        ("best eval loss", number(m.get("bestEvalLoss"))),
        ("best checkpoint", number(m.get("bestCheckpoint"))),
        ("general loss before -> after", f"{number(m.get('generalLossBefore'))} -> {number(m.get('generalLossAfter'))}"),
        ("effective batch", f"{m['effectiveBatchSize']} ({m['worldSize']} process(es), {m['precision']})"),
        ("tokens/s (non-padding)", number(m.get("tokensPerSecond"))),
        ("rows: train / validation", f"{data.get('trainRows')} / {data.get('validationRows')}"
         f" ({data.get('generalRows', 0)} general), truncated {data.get('train', {}).get('truncated', 0)},"
         f" dropped {data.get('train', {}).get('dropped', 0)}"),
        ("time", f"{m.get('wallSeconds', 0):.1f} s"),
        ("model", number(m.get("outputModel"))),
    ]
    if m.get("outputUri", "").startswith("s3://"):
        rows.append(("exported to", f"{m['outputUri']} (COMPLETE written last)"))
    if m.get("mlflowRunId"):
        rows.append(("MLflow run", m["mlflowRunId"]))
    out = m.get("outputModel", "")
    if out:
        base = os.path.dirname(out)
        if os.path.basename(base) == REJECTED_DIR:
            base = os.path.dirname(base)
        rows.append(("metrics / curves", f"{base}/metrics.json, {base}/loss.png"))
    for k, v in rows:
        t.add_row(k, v)
    return t

