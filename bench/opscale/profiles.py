"""CPU profiles: py-spy of the operator (collapsed stacks, summarized), `go tool pprof` of kube-apiserver."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path


def pprof_top(binary: Path, profile: Path, nodes: int = 30) -> str:
    """`go tool pprof -top` of a CPU profile, by cumulative time (what each call path costs in all)."""
    if not profile.exists() or profile.stat().st_size == 0:
        return "(no profile)"
    out = subprocess.run(["go", "tool", "pprof", "-top", "-cum", f"-nodecount={nodes}", str(binary), str(profile)],
                         capture_output=True, text=True, timeout=300)
    return out.stdout or out.stderr


class Profiler:
    """py-spy record (raw collapsed stacks, GIL holder only, non-blocking) of one process."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if not exe:
            raise RuntimeError("--profile-operator needs py-spy on PATH (or $PY_SPY=/path/to/py-spy)")
        self.out = out
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "--gil",
                                      "--nonblocking", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarize_profile(self.out)


def summarize_profile(path: Path, top: int = 18) -> str:
    if not path.exists():
        return "(py-spy wrote no profile)"
    inclusive: Counter = Counter()
    leaf: Counter = Counter()  # self time by function
    leaf_mod: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        leaf[frames[-1]] += n
        m = re.search(r"\(([^)]*)\)$", frames[-1])
        fname = m.group(1) if m else frames[-1]
        for mod in ("sft_operator", "kopf", "kubernetes", "urllib3", "aiohttp", "pydantic", "yaml", "json", "ssl",
                    "asyncio", "prometheus_client", "logging", "copy"):
            if f"/{mod}/" in fname or fname.startswith(f"{mod}/") or fname.endswith(f"{mod}.py")\
                    or f"/{mod}/" in "/" + fname:
                leaf_mod[mod] += n
                break
        else:
            leaf_mod["other"] += n
    if not total:
        return "(no samples)"
    lines = [f"py-spy, GIL-holding samples in the burst window: {total} at 50 Hz ({total / 50:.1f} s of CPU)", "",
             "| self time by package | share |", "|---|---:|"]
    for mod, n in leaf_mod.most_common():
        lines.append(f"| {mod} | {100 * n / total:.0f}% |")
    lines += ["", "| function (self) | share |", "|---|---:|"]
    lines += [f"| `{f.replace('|', '/')[:110]}` | {100 * n / total:.0f}% |" for f, n in leaf.most_common(top)]
    lines += ["", "| function (inclusive) | share |", "|---|---:|"]
    generic = ("asyncio/", "runpy", "threading.py", "concurrent/futures", "sft_operator/runtime/main.py", "<module>",
               "kopf/_core/reactor/running.py", "kopf/_core/reactor/queueing.py", "kopf/_cogs/aiokits/", "copy.py)",
               "json/decoder.py", "operator_wrapper.py", "kopf/_cogs/clients/watching.py")
    shown = 0
    for f, n in inclusive.most_common():
        if any(g in f for g in generic):
            continue
        lines.append(f"| `{f.replace('|', '/')[:110]}` | {100 * n / total:.0f}% |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)
