"""The benchmark's table and its BENCHMARKS.md section (only that section is rewritten)."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

from .accounting import WATCH_EVENTS, writes_per_job

SECTION = "## Operator: SFTJobs at scale"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def fmt_mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def summarize(r: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The printed / written report, and the key numbers."""
    args = r["args"]
    n, n_warm = args["jobs"], r["n_warm"]
    warm, burst, rss = r["warm"], r["burst"], r["rss"]
    bare = min(r["bare1"], r["bare2"], key=lambda b: b["seconds"])
    which = "first" if bare is r["bare1"] else "second"
    ratio = burst.children / bare["seconds"] if burst.children else None
    lines = []
    lines.append(f"{n} SFTJobs x {args['gpus_per_job']} GPU, {args['gpu_nodes']} kwok nodes x 8 GPUs, "
                 f"client concurrency {args['concurrency']}, {os.cpu_count()} CPU cores; cluster up in {r['startup']} s")
    lines.append("")
    lines.append("| | bare client | operator | ratio |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| all {3 * n} children of {n} SFTJobs exist | {bare['seconds']:.2f} s | {fmt_s(burst.children)} "
                 f"| **{ratio:.2f}x** |" if ratio else
                 f"| all {3 * n} children of {n} SFTJobs exist | {bare['seconds']:.2f} s | incomplete | n/a |")
    lines.append(f"| children per second | {bare['objects'] / bare['seconds']:.0f} | "
                 f"{(3 * n / burst.children) if burst.children else 0:.0f} | |")
    lines.append(f"| (operator) {n} SFTJobs POSTed by the client | | {burst.applied:.2f} s | |")
    lines.append(f"| (bare client) pass before / after the operator | {r['bare1']['seconds']:.2f} s / "
                 f"{r['bare2']['seconds']:.2f} s | | the {which} (faster) is used |")
    lines.append(f"| every Job Complete / every SFTJob Succeeded | {fmt_s(bare['jobs_complete'])} | {fmt_s(burst.all_done)} | |")
    lines.append("")
    per = writes_per_job(burst)
    lags = burst.latencies()
    lag99 = max((pct(xs, .99) or 0.0) for what, xs in lags.items() if what.startswith(("pod Running", "Job Complete")))
    lines.append("| target (docs/practice.md, issue #12) | measured | goal |")
    lines.append("|---|---:|---:|")
    lines.append(f"| API writes per SFTJob over its life | {per['total']:.2f} (children {per['children']:.2f}, on the "
                 f"SFTJob {per['status']:.2f}, Events {per['events']:.2f}) | <= 6 (3 + 2 + 1) |")
    lines.append(f"| all children created, operator / bare client | {f'{ratio:.2f}x' if ratio else 'n/a'} | <= 1.5x |")
    lines.append(f"| status lag p99 (pod Running, Job Complete) | {fmt_s(lag99)} | <= 2 s |")
    lines.append(f"| operator RSS after the burst | {fmt_mib(rss['all'])} | <= 150 MiB |")
    lines.append("")
    lines.append("Status latency (the benchmark's own watch: pod/Job change seen -> SFTJob status.phase seen):")
    lines.append("")
    lines.append("| wave | transition | jobs | p50 | p90 | p99 | max |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for label, wave in ((f"warm-up {n_warm}", warm), (f"burst {n}", burst)):
        for what, xs in wave.latencies().items():
            lines.append(f"| {label} | {what} | {len(xs)} | {fmt_s(pct(xs, .5))} | {fmt_s(pct(xs, .9))} | "
                         f"{fmt_s(pct(xs, .99))} | "
                         f"{fmt_s(max(xs) if xs else None)} |")
    lines.append("")
    per_warm = (rss["warm"] - rss["idle"]) / n_warm
    per_burst = (rss["all"] - rss["warm"]) / n
    lines.append("Operator memory (RSS, sampled after each wave settled):")
    lines.append("")
    lines.append("| point | SFTJobs tracked | RSS | bytes per job on this step |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| idle | 0 | {fmt_mib(rss['idle'])} | |")
    lines.append(f"| after the warm-up wave | {n_warm} | {fmt_mib(rss['warm'])} | {per_warm / 1024:.1f} KiB |")
    lines.append(f"| after the burst | {n_warm + n} | {fmt_mib(rss['all'])} | {per_burst / 1024:.1f} KiB |")
    lines.append(f"| peak during the run | | {fmt_mib(rss['peak'])} | |")
    lines.append("")
    lines.append("Where the time goes (burst window: first SFTJob POST until the last child was seen):")
    lines.append("")
    lines.append(f"| API server requests | bare client window ({which} pass) | operator burst window |")
    lines.append("|---|---:|---:|")
    keys = sorted(set(bare["requests"]) | set(burst.requests), key=lambda k: (k[0] == WATCH_EVENTS, k[1], k[0]))
    for k in keys:
        lines.append(f"| {k[0]} {k[1]} | {bare['requests'].get(k, 0)} | {burst.requests.get(k, 0)} |")
    lines.append("")
    lines.append(f"| CPU seconds | bare client window ({which} pass) | operator burst window |")
    lines.append("|---|---:|---:|")
    for k in sorted(set(bare["cpu"]) | set(burst.cpu)):
        lines.append(f"| {k} | {bare['cpu'].get(k, 0):.1f} | {burst.cpu.get(k, 0):.1f} |")
    lines.append("")
    rsum, rcount = burst.reconcile
    per = writes_per_job(burst)
    lines.append(f"API writes per SFTJob over its whole life (burst, first POST until all Succeeded): "
                 f"**{per['total']:.2f}** = children {per['children']:.2f} + writes on the SFTJob (status, "
                 f"metadata) {per['status']:.2f} (max {per['status_max']} for one job; states written: "
                 f"{', '.join(f'{k} {v}' for k, v in burst.seen.sft_written_states.most_common())}) + Events {per['events']:.2f} "
                 f"({', '.join(f'{r} {c}' for r, c in burst.events.most_common()) or 'none'}). "
                 + (f"Reconcile runs: {rcount}, mean {rsum / rcount * 1000:.1f} ms (both waves). " if rcount else "")
                 + f"Operator log: {r['operator_log_lines']} lines, {r['operator_log_warnings']} warnings/errors.")
    if burst.profile:
        lines += ["", "Operator CPU profile, burst window (`--profile-operator`):", "", burst.profile]
    keynums = {"ratio": ratio, "bare": bare["seconds"], "operator": burst.children,
               "lat": burst.latencies(), "per_warm": per_warm, "per_burst": per_burst, "writes": per}
    return "\n".join(lines), keynums


def heading(args: argparse.Namespace) -> str:
    extra = " (profiled)" if args.profile_operator else ""
    if args.operator_source:
        extra += f" (operator from {args.operator_source})"
    if args.operator_arg:
        extra += f" (operator {' '.join(args.operator_arg)})"
    return f"### {args.jobs} SFTJobs{extra}"


def write_section(path: Path, head: str, body: str, command: str) -> None:
    """Add or replace our block under `head` in our own section; nothing else in the file changes."""
    intro = (
        f"{SECTION}\n\n"
        "Measured by `bench/operator_scale.py` in one run on a throw-away dev cluster (etcd, kube-apiserver,\n"
        "kube-controller-manager, kube-scheduler, kwok GPU nodes), all on the same machine. The bare client\n"
        "is an aiohttp client POSTing the very children `render_children` gives (real ownerReferences) with\n"
        "the same concurrency the benchmark applies SFTJobs with; the operator is `python -m sft_operator`\n"
        "as a subprocess. Latencies are between the benchmark's own watch events. Ratios, not absolute times,\n"
        "are the point: on 2 cores the API server, etcd, the controllers and the operator share the CPU.\n"
    )
    block = f"{head}\n\n```bash\n{command}\n```\n\n{body.rstrip()}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"  # re-read right before writing
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + intro + "\n" + block
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], re.MULTILINE)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        ours = text[start:end]
        # Result blocks are "### <N> SFTJobs..."; any other text before the first one (notes,
        # findings written by hand) is kept as it is.
        blocks = {m.group(0).strip(): m for m in re.finditer(r"^### \d+ SFTJobs.*\n", ours, re.MULTILINE)}
        parts: dict[str, str] = {}
        ordered = sorted(blocks.items(), key=lambda kv: kv[1].start())
        for i, (k, m) in enumerate(ordered):
            stop = ordered[i + 1][1].start() if i + 1 < len(ordered) else len(ours)
            parts[k] = ours[m.start():stop].rstrip() + "\n"
        prefix = ours[: ordered[0][1].start()] if ordered else intro + "\n"
        parts[head] = block

        def order(h: str) -> tuple[int, str]:
            m = re.match(r"### (\d+)", h)
            return (int(m.group(1)) if m else 0, h)

        new = prefix.rstrip() + "\n\n" + "\n".join(parts[k] for k in sorted(parts, key=order))
        text = text[:start] + new.rstrip() + "\n" + ("\n" + text[end:].lstrip("\n") if end < len(text) else "")
    path.write_text(text)
