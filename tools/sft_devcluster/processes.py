"""Processes of a dev cluster: start each in its own session, find them again, stop them.

Every process is started with ``SFT_DEVCLUSTER_DIR=<state dir>`` in its environment and a
pidfile (pid and start time) under ``<state dir>/pids``, so a reused pid is never mistaken for ours, and
``stop`` takes a component's whole session (its children included) down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

MARKER_ENV = "SFT_DEVCLUSTER_DIR"


class DevClusterError(RuntimeError):
    """The dev cluster could not be built, started or reached; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state ppid pgrp session ..."""
    return read_proc(pid, "stat").decode(errors="replace").rpartition(")")[2].split()


def is_ours(pid: int, state_dir: Path) -> bool:
    """The pid is alive and was started by this state dir (not a reused pid)."""
    marker = f"{MARKER_ENV}={state_dir}".encode()
    return marker in read_proc(pid, "environ").split(b"\0")


def marked_processes(state_dir: Path) -> list[int]:
    """Every live process carrying this state dir's marker (children that left the session too)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and alive(int(e)) and is_ours(int(e), state_dir)]


def session_members(sids: set[int]) -> list[int]:
    """Every live process whose session id is in ``sids`` (children, pods, ...)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) in sids:
                members.append(int(entry))
    return members


def pidfile(state_dir: Path, name: str) -> Path:
    return state_dir / "pids" / f"{name}.pid"


def running(state_dir: Path, names) -> dict[str, int]:
    """Component name -> pid, for the components among ``names`` that are alive."""
    alive_now = {}
    for name in names:
        path = pidfile(state_dir, name)
        if path.exists():
            pid, *started = path.read_text().split()
            # The start time tells a stopped component's pid, reused by another of ours, from it.
            if is_ours(int(pid), state_dir) and started[:1] in ([], [start_time(int(pid))]):
                alive_now[name] = int(pid)
    return alive_now


def start(name: str, cmd: list[str], state_dir: Path, extra_env: dict[str, str] | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    log = open(state_dir / "components" / f"{name}.log", "ab")
    env = {**os.environ, MARKER_ENV: str(state_dir), **(extra_env or {})}
    # Own session: survives `up` returning, and `down` kills the session as a whole.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=state_dir, start_new_session=True, pass_fds=pass_fds)
    log.close()
    pidfile(state_dir, name).write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    return proc


def start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); "" if gone."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    path = state_dir / "components" / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(what: str, check, deadline: float, procs: dict[str, subprocess.Popen], state_dir: Path) -> None:
    """Poll ``check`` until it is truthy; fail with a component's log tail if one exits."""
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - the API may be half-up; keep polling until the deadline
            pass
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise DevClusterError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; "
                    f"log {state_dir / 'components' / (name + '.log')}:\n{log_tail(state_dir, name)}"
                )
        if time.monotonic() > deadline:
            raise DevClusterError(f"timed out waiting for {what}; logs in {state_dir / 'components'}")
        time.sleep(0.2)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    if not fields:
        return False
    if fields[0] != "Z":
        return True
    # A zombie leader whose other threads are still exiting (a SIGKILLed Go program) still holds
    # its files: the port a restart binds, the node lock.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def stop_session(leader: int, timeout: float) -> list[int]:
    """SIGTERM the leader's whole session, SIGKILL what is left after ``timeout``; the pids."""
    members = session_members({leader})
    signal_all(members, signal.SIGTERM)
    left = wait_gone(members, timeout)
    signal_all(left, signal.SIGKILL)
    wait_gone(left, 5.0)
    return members
