"""A 2-pod run loses one pod: the surviving rank exits 76 (PeerLost), which the Job ignores like a
disruption, instead of 1, which the Job would count against backoffLimit. Two launchers with one
process each stand for the two pods of a `nodes: 2` SFTJob (static rendezvous at rank 0's address)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")

from sft_contract.exit_codes import REASONS, UNCOUNTED, ExitCode  # noqa: E402

from trainer_helpers import free_port, trainer_env, write_config  # noqa: E402


def test_the_surviving_rank_exits_peer_lost_when_the_other_pod_dies(make_spec, tmp_path):
    spec = make_spec(hyperparameters={"maxSteps": 400, "perDeviceBatchSize": 2, "gradientAccumulationSteps": 1},
                     evaluation={"strategy": "no"}, checkpointing={"strategy": "steps", "steps": 5})
    cfg = write_config(spec, tmp_path / "config.json")
    port = str(free_port())
    term = tmp_path / "termination-log"

    def pod(rank: int) -> subprocess.Popen:
        log = open(tmp_path / f"pod-{rank}.log", "w")  # files, not pipes: a full pipe would stall the rank
        return subprocess.Popen(
            [sys.executable, "-m", "sft_trainer.launch", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
             str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "--config", str(cfg)],
            env=trainer_env(SFT_TERMINATION_LOG=str(term) if rank == 0 else os.devnull,
                            SFT_COLLECTIVE_TIMEOUT_SECONDS="60", PYTHONUNBUFFERED="1"),
            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    survivor, victim = pod(0), pod(1)
    try:
        deadline = time.monotonic() + 180
        while not trained_a_few_steps(tmp_path / "pod-0.log") and time.monotonic() < deadline:
            time.sleep(0.5)  # rank 0 reports progress: both ranks are training
        kill_tree(victim.pid)  # the pod is gone with every process in it: no SIGTERM, no save
        code = survivor.wait(timeout=180)
    finally:
        for proc in (survivor, victim):
            kill_tree(proc.pid)
    assert code == ExitCode.PEER_LOST, (tmp_path / "pod-0.log").read_text()[-3000:]
    assert ExitCode.PEER_LOST in UNCOUNTED and REASONS[ExitCode.PEER_LOST] == "PeerLost"
    assert "another rank was lost" in term.read_text()


def trained_a_few_steps(log: Path) -> bool:
    return any('"event": "progress"' in line and json.loads(line[line.index("{"):])["step"] >= 3
               for line in log.read_text().splitlines() if line.startswith("{"))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a pod's end kills its cgroup (torchrun starts
    its workers in sessions of their own, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    for each in found:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
