"""`sftctl status` and `sftctl watch`: a live SFTJob's phase, progress, losses, conditions and evaluation gates."""

from __future__ import annotations

import asyncio
import sys
from contextlib import aclosing
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sft_contract.gate_table import gate_table
from sft_operator.api import GROUP, PLURAL
from sft_operator.api.types import TERMINAL_PHASES, Phase
from sft_operator.runtime.client import ApiError, KubeClient
from sft_operator.runtime.credentials import load_credentials

# What sftctl reads with the user's credentials: one SFTJob, and a watch on it.
READ_SFTJOBS: frozenset[tuple[str, str, str]] = frozenset({("get", GROUP, PLURAL), ("watch", GROUP, PLURAL)})

PHASE_STYLE = {
    Phase.succeeded.value: "bold green",
    Phase.failed.value: "bold red",
    Phase.running.value: "bold cyan",
    Phase.restarting.value: "bold yellow",
    Phase.suspended.value: "yellow",
    Phase.queued.value: "yellow",
    Phase.pending.value: "white",
}


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def status_panel(sftjob: dict[str, Any]) -> Group:
    """The summary table and the conditions table of one SFTJob (pure; no I/O)."""
    meta = sftjob.get("metadata") or {}
    status = sftjob.get("status") or {}
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    output = status.get("output") or {}
    phase = status.get("phase") or Phase.pending.value

    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("SFTJob", f"{meta.get('namespace', '')}/{meta.get('name', '')}")
    summary.add_row("Phase", Text(phase, style=PHASE_STYLE.get(phase, "")))
    percent = progress.get("percent")
    summary.add_row("Progress", "-" if percent is None else f"{percent}%  (step {progress.get('step', 0)}/"
                    f"{progress.get('totalSteps', 0)}, epoch {progress.get('epoch', 0):.2f})")
    summary.add_row("Train loss", _num(metrics.get("trainLoss")))
    summary.add_row("Eval loss", _num(metrics.get("evalLoss"))
                    + (f"  (best {_num(metrics.get('bestEvalLoss'))})" if metrics.get("bestEvalLoss") is not None else ""))
    summary.add_row("Learning rate", _num(metrics.get("learningRate"), "{:.2e}"))
    summary.add_row("Tokens/s", _num(metrics.get("tokensPerSecond"), "{:,.0f}"))
    summary.add_row("ETA", _duration(progress.get("etaSeconds")))
    summary.add_row("Restarts", str(status.get("restarts", 0)))
    if status.get("effectiveBatchSize"):
        summary.add_row("Effective batch", str(status["effectiveBatchSize"]))
    data = status.get("data")
    if data:  # the fetch stage's data check
        summary.add_row("Data", f"{data.get('rows', 0)} rows ({data.get('format', '?')}), "
                        f"{data.get('invalidRows', 0)} invalid, {data.get('duplicateRows', 0)} duplicate, "
                        f"{data.get('truncatedRows', 0)} truncated, {data.get('droppedRows', 0)} dropped; "
                        f"~{data.get('estimatedSteps', 0)} steps, ~{data.get('estimatedTokens', 0):,} tokens")
    summary.add_row("Started", status.get("startTime") or "-")
    if status.get("completionTime"):
        summary.add_row("Finished", status["completionTime"])
    if output.get("model"):
        summary.add_row("Model", output["model"])
    if output.get("bestCheckpoint"):
        summary.add_row("Best checkpoint", output["bestCheckpoint"])

    conditions = Table(title="Conditions", title_justify="left", expand=False)
    for column in ("Type", "Status", "Reason", "Message", "Since"):
        conditions.add_column(column, overflow="fold")
    for cond in status.get("conditions") or []:
        style = "green" if cond.get("status") == "True" else "dim"
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            style = "red"
        conditions.add_row(cond.get("type", ""), Text(cond.get("status", ""), style=style), cond.get("reason", ""),
                           cond.get("message", ""), cond.get("lastTransitionTime", ""))
    parts = [summary, Text(""), conditions]
    if status.get("evaluation"):  # the evaluation gates: base and tuned values, as `sftctl run` prints them
        parts += [Text(""), gate_table(status["evaluation"])]
    return Group(*parts)



def exit_code(sftjob: dict[str, Any]) -> int:
    return 1 if (sftjob.get("status") or {}).get("phase") == Phase.failed.value else 0


def show_status(name: str, namespace: str | None, watch: bool, kubeconfig: str | None) -> int:
    """Print one SFTJob; with watch, follow it until it finishes. 0 unless it Failed (or is missing)."""
    try:
        credentials = load_credentials(kubeconfig)
    except Exception as exc:  # no kubeconfig, unreadable file, a failing exec plugin
        print(f"cannot reach the cluster: {exc}", file=sys.stderr)
        return 2
    client = KubeClient(credentials, refresh=lambda: load_credentials(kubeconfig), permissions=READ_SFTJOBS,
                        field_manager="sftctl")
    try:
        return asyncio.run(_show(client, name, namespace or credentials.namespace or "default", watch))
    except KeyboardInterrupt:
        return 130


async def _show(client: KubeClient, name: str, namespace: str, watch: bool) -> int:
    try:
        return await _follow(client, name, namespace, watch, Console())
    finally:
        await client.close()


async def _read(client: KubeClient, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        return await client.get("SFTJob", namespace, name)
    except ApiError as exc:
        if exc.status == 404:
            print(f"SFTJob {namespace}/{name} not found", file=sys.stderr)
        elif exc.status == 0:
            print(f"cannot reach the cluster: {exc.message}", file=sys.stderr)
        else:
            print(f"reading SFTJob {namespace}/{name}: {exc.status} {exc.reason or exc.message}", file=sys.stderr)
        return None


async def _follow(client: KubeClient, name: str, namespace: str, watch: bool, console: Console) -> int:
    sftjob = await _read(client, name, namespace)
    if sftjob is None:
        return 2
    if not watch or (sftjob.get("status") or {}).get("phase") in TERMINAL_PHASES:
        console.print(status_panel(sftjob))
        return exit_code(sftjob)

    with Live(status_panel(sftjob), console=console, refresh_per_second=4) as live:
        version = sftjob["metadata"].get("resourceVersion") or ""
        while True:
            try:
                outcome = await _watch_once(client, name, namespace, version, live)
            except ApiError as exc:
                if exc.status != 410:
                    print(f"watching SFTJob {namespace}/{name}: {exc.status} {exc.reason or exc.message}",
                          file=sys.stderr)
                    return 2
                # 410 Gone: the version expired; read again and go on
                obj = await _read(client, name, namespace)
                if obj is None:
                    return 2
                live.update(status_panel(obj))
                if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
                    return exit_code(obj)
                outcome = obj["metadata"].get("resourceVersion") or ""
            if isinstance(outcome, int):
                return outcome
            version = outcome


async def _watch_once(client: KubeClient, name: str, namespace: str, version: str, live: Live) -> int | str:
    """One watch stream: the exit code once the SFTJob finishes or goes, else the last resourceVersion seen
    when the server ends the stream (a watch has a timeout)."""
    events = client.watch("SFTJob", namespace, resource_version=version, field_selector=f"metadata.name={name}",
                          timeout_seconds=300)
    async with aclosing(events):
        async for event in events:
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":  # e.g. 410 Expired, inside the stream
                raise ApiError(int(obj.get("code") or 0), str(obj.get("reason") or ""), str(obj.get("message") or ""))
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if event.get("type") == "BOOKMARK":
                continue
            live.update(status_panel(obj))
            if event.get("type") == "DELETED":
                print(f"SFTJob {namespace}/{name} was deleted", file=sys.stderr)
                return 2
            if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
                return exit_code(obj)
    return version
