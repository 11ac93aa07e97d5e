"""Where the time and the requests went: RSS and CPU seconds per process, the API server's request and
watch-event counters, the operator's reconcile histogram."""

from __future__ import annotations

import re
import threading
from collections import Counter

import aiohttp
import psutil

from .api import Api
from .watches import Wave


class Sampler(threading.Thread):
    """RSS of the operator every 0.25 s (peak and timeline)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return


OTHER = "(everything else on the machine)"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds of each named process itself (not its children: the benchmark
    started the operator and the control plane), and of everything else on the machine."""
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = 0.0
    sys_t = psutil.cpu_times()
    busy = sum(getattr(sys_t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    out[OTHER] = busy - sum(out.values())
    return out


REQ_RE = re.compile(r"^apiserver_request_total\{([^}]*)\}\s+([0-9.e+]+)$")
WATCH_EVENTS_RE = re.compile(r"^apiserver_watch_events_total\{([^}]*)\}\s+([0-9.e+]+)$")
INTERESTING = {"configmaps", "services", "jobs", "sftjobs", "events", "pods", "persistentvolumeclaims"}
WATCH_EVENTS = "watch events sent"  # the "verb" of the watch-event counter: events sent to all watchers


async def apiserver_requests(api: Api) -> Counter:
    """Cumulative API server requests by (verb, resource[/subresource]), reads included (a WATCH counts
    its connections, not what they carry), and the watch events sent to all watchers by resource."""
    out: Counter = Counter()
    try:
        text = await api.text("/metrics")
    except aiohttp.ClientError:
        return out
    for line in text.splitlines():
        m = REQ_RE.match(line) or WATCH_EVENTS_RE.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'(\w+="[^"]*")', m.group(1)))
        labels = {k: v.strip('"') for k, v in labels.items()}
        if line.startswith("apiserver_watch_events_total"):
            res = labels.get("resource") or (labels.get("kind", "").lower() + "s")  # "kind" before Kubernetes 1.30
            if res in INTERESTING:
                out[(WATCH_EVENTS, res)] += float(m.group(2))
            continue
        res = labels.get("resource", "")
        if res not in INTERESTING:
            continue
        key = (labels.get("verb", ""), res + (f"/{labels['subresource']}" if labels.get("subresource") else ""))
        out[key] += float(m.group(2))
    return out


def diff(after: Counter, before: Counter) -> dict[tuple[str, str], int]:
    return {k: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0) > 0}


def reconcile_stats(metrics_text: str) -> tuple[float | None, int | None]:
    """(sum, count) of the operator's reconcile-duration histogram."""
    total = count = None
    for line in metrics_text.splitlines():
        if line.startswith("#") or "reconcile" not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith("_sum") and "duration" in name:
            total = (total or 0.0) + float(value)
        elif name.endswith("_count") and "duration" in name:
            count = (count or 0) + int(float(value))
    return total, count


# The operator's writes in a wave's life, from the API server's counters (verb, resource): children
# created and patched (nothing else creates or patches these in the benchmark's namespaces). Writes
# on the SFTJobs (status, and metadata for an operator that patches it) are counted exactly from the
# watch's MODIFIED events, and Events from the Events about SFTJobs.
CHILD_WRITES = (("POST", "configmaps"), ("POST", "services"), ("POST", "jobs"), ("PATCH", "configmaps"),
                ("PATCH", "services"), ("PATCH", "jobs"))


def writes_per_job(wave: Wave) -> dict[str, float]:
    n = len(wave.names)
    children = sum(wave.life_requests.get(k, 0) for k in CHILD_WRITES)
    status = sum(wave.seen.sft_writes.values())
    events = sum(wave.events.values())
    return {"children": children / n, "status": status / n, "events": events / n,
            "total": (children + status + events) / n, "status_max": max(wave.seen.sft_writes.values(), default=0)}
