"""`sftctl status` and `sftctl watch`: a live SFTJob's phase, progress, losses, conditions and evaluation gates."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.api.types import TERMINAL_PHASES, Phase

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


def render(sftjob: dict[str, Any]) -> Group:
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
        from sft_trainer.local import gate_table

        parts += [Text(""), gate_table(status["evaluation"])]
    return Group(*parts)


def exit_code(sftjob: dict[str, Any]) -> int:
    return 1 if (sftjob.get("status") or {}).get("phase") == Phase.failed.value else 0


def _client(kubeconfig: str | None):
    from kubernetes import client, config

    if kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
        _, current = config.list_kube_config_contexts(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
            return client.CustomObjectsApi(), _incluster_namespace()
        except config.ConfigException:
            config.load_kube_config()
        api = client.ApiClient()
        _, current = config.list_kube_config_contexts()
    namespace = (current or {}).get("context", {}).get("namespace") or "default"
    return client.CustomObjectsApi(api), namespace


def _incluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as handle:
            return handle.read().strip()
    except OSError:
        return "default"


def show_status(name: str, namespace: str | None, watch: bool, kubeconfig: str | None) -> int:
    """Print one SFTJob; with watch, follow it until it finishes. 0 unless it Failed (or is missing)."""
    from kubernetes import watch as kwatch
    from kubernetes.client.exceptions import ApiException

    console = Console()
    try:
        custom, default_namespace = _client(kubeconfig)
    except Exception as exc:  # no kubeconfig, unreadable file
        print(f"cannot reach the cluster: {exc}", file=sys.stderr)
        return 2
    namespace = namespace or default_namespace
    try:
        sftjob = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            print(f"SFTJob {namespace}/{name} not found", file=sys.stderr)
        else:
            print(f"reading SFTJob {namespace}/{name}: {exc.status} {exc.reason}", file=sys.stderr)
        return 2
    if not watch or (sftjob.get("status") or {}).get("phase") in TERMINAL_PHASES:
        console.print(render(sftjob))
        return exit_code(sftjob)

    with Live(render(sftjob), console=console, refresh_per_second=4) as live:
        version = sftjob["metadata"].get("resourceVersion")
        while True:
            stream = kwatch.Watch()
            try:
                for event in stream.stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                    field_selector=f"metadata.name={name}", resource_version=version, timeout_seconds=300,
                ):
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        live.update(render(obj))
                        print(f"SFTJob {namespace}/{name} was deleted", file=sys.stderr)
                        return 2
                    version = obj["metadata"].get("resourceVersion", version)
                    live.update(render(obj))
                    if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
                        return exit_code(obj)
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: the version expired; read again and go on
                    raise
                obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                version = obj["metadata"].get("resourceVersion")
                live.update(render(obj))
                if (obj.get("status") or {}).get("phase") in TERMINAL_PHASES:
                    return exit_code(obj)
            except KeyboardInterrupt:
                return 130
            finally:
                stream.stop()
