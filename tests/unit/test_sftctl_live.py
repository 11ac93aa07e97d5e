"""`sftctl status` and `sftctl watch` against an API server over HTTP, logged in through a kubeconfig whose
user is an exec plugin (sft_operator.runtime.credentials): what a user sees, errors included."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "plugin-token-123"


def sftjob(phase: str, version: str, step: int = 0) -> dict[str, Any]:
    return {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "team-a", "resourceVersion": version},
            "status": {"phase": phase, "progress": {"percent": step, "step": step, "totalSteps": 100, "epoch": 0.5}}}


class Api:
    """SFTJobs to read; each watch sends the next round of ``rounds`` and ends; every request's path, query
    and bearer token."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.rounds: list[list[dict[str, Any]]] = []
        self.get_status: int | None = None  # answer GETs with this error instead
        self.seen: list[tuple[str, dict[str, list[str]], str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.seen.append((url.path, query, self.headers.get("Authorization", "")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"})
                parts = url.path.strip("/").split("/")  # apis sft.dev v1alpha1 namespaces NS sftjobs [NAME]
                namespace = parts[4]
                if query.get("watch") == ["1"]:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for event in (api.rounds.pop(0) if api.rounds else []):
                        self.wfile.write(json.dumps(event).encode() + b"\n")
                        self.wfile.flush()
                    return None
                if api.get_status == 403:
                    return self._send(403, {"kind": "Status", "reason": "Forbidden",
                                            "message": f'sftjobs "{parts[6]}" is forbidden'})
                obj = api.objects.get((namespace, parts[6]))
                if obj is None:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "message": "not found"})
                return self._send(200, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def api():
    server = Api()
    yield server
    server.close()


def kubeconfig(tmp_path: Path, server: str, namespace: str | None = "team-a") -> Path:
    """A kubeconfig whose user logs in with an exec plugin (a script printing an ExecCredential)."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        "assert sys.argv[1:] == ['get-token', '--cluster', 'dev'], sys.argv\n"
        "assert os.environ['PLUGIN_MODE'] == 'test'\n"
        f"print(json.dumps({{'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',"
        f" 'status': {{'token': os.environ['PLUGIN_TOKEN']}}}}))\n")
    context = {"cluster": "dev", "user": "me"} | ({"namespace": namespace} if namespace else {})
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "dev", "cluster": {"server": server}}],
        "contexts": [{"name": "dev", "context": context}],
        "users": [{"name": "me", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
            "args": [str(plugin), "get-token", "--cluster", "dev"],
            "env": [{"name": "PLUGIN_MODE", "value": "test"}, {"name": "PLUGIN_TOKEN", "value": TOKEN}]}}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


def sftctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "COLUMNS": "160"},
                          timeout=60)


def test_status_shows_the_job_of_the_contexts_namespace_logged_in_by_the_exec_plugin(api, tmp_path):
    api.objects[("team-a", "demo")] = sftjob("Running", "7", step=42)
    out = sftctl("status", "demo", "--kubeconfig", str(kubeconfig(tmp_path, api.url)))
    assert out.returncode == 0, out.stderr
    assert "team-a/demo" in out.stdout and "Running" in out.stdout and "42%" in out.stdout
    assert api.seen[0][0] == "/apis/sft.dev/v1alpha1/namespaces/team-a/sftjobs/demo"
    assert api.seen[0][2] == f"Bearer {TOKEN}"


def test_status_of_a_failed_job_exits_1(api, tmp_path):
    api.objects[("other", "demo")] = sftjob("Failed", "7")
    out = sftctl("status", "-n", "other", "demo", "--kubeconfig", str(kubeconfig(tmp_path, api.url, namespace=None)))
    assert out.returncode == 1 and "Failed" in out.stdout


def test_a_missing_job_is_named(api, tmp_path):
    out = sftctl("status", "nope", "--kubeconfig", str(kubeconfig(tmp_path, api.url, namespace=None)))
    assert out.returncode == 2
    assert out.stderr.strip() == "SFTJob default/nope not found"


def test_a_forbidden_read_says_so(api, tmp_path):
    api.get_status = 403
    out = sftctl("watch", "demo", "--kubeconfig", str(kubeconfig(tmp_path, api.url)))
    assert out.returncode == 2
    assert out.stderr.strip() == "reading SFTJob team-a/demo: 403 Forbidden"


def test_an_unreachable_api_server_is_reported_not_a_traceback(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = sftctl("status", "demo", "--kubeconfig", str(kubeconfig(tmp_path, f"http://127.0.0.1:{port}")))
    assert out.returncode == 2
    assert out.stderr.startswith("cannot reach the cluster:") and "Traceback" not in out.stderr


def test_a_kubeconfig_that_is_not_there_is_reported(tmp_path):
    out = sftctl("status", "demo", "--kubeconfig", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.startswith("cannot reach the cluster:") and "missing" in out.stderr


def test_a_failing_exec_plugin_is_reported_with_its_message(tmp_path):
    path = kubeconfig(tmp_path, "http://127.0.0.1:1")
    config = yaml.safe_load(path.read_text())
    config["users"][0]["user"]["exec"]["args"] = ["-c", "import sys; sys.exit('login expired: run sso login')"]
    path.write_text(yaml.safe_dump(config))
    out = sftctl("status", "demo", "--kubeconfig", str(path))
    assert out.returncode == 2
    assert "cannot reach the cluster:" in out.stderr and "login expired: run sso login" in out.stderr


def test_watch_follows_the_job_until_it_finishes(api, tmp_path):
    api.objects[("team-a", "demo")] = sftjob("Running", "7", step=10)
    api.rounds = [[
        {"type": "BOOKMARK", "object": {"kind": "SFTJob", "metadata": {"resourceVersion": "8"}}},
        {"type": "MODIFIED", "object": sftjob("Running", "9", step=60)},
    ], [  # the server ended the first stream (its timeout): sftctl watches again from the last version
        {"type": "MODIFIED", "object": sftjob("Succeeded", "10", step=100)},
    ]]
    out = sftctl("watch", "demo", "--kubeconfig", str(kubeconfig(tmp_path, api.url)))
    assert out.returncode == 0, out.stderr
    assert "Succeeded" in out.stdout and "100%" in out.stdout
    watches = [query for path, query, _ in api.seen if "watch" in query]
    assert [s[0] for s in api.seen[1:]] == ["/apis/sft.dev/v1alpha1/namespaces/team-a/sftjobs"] * 2
    assert [q["fieldSelector"] for q in watches] == [["metadata.name=demo"]] * 2
    assert [q["resourceVersion"] for q in watches] == [["7"], ["9"]]


def test_watch_reads_again_when_its_version_expired_and_reports_a_deletion(api, tmp_path):
    api.objects[("team-a", "demo")] = sftjob("Running", "7", step=10)
    api.rounds = [
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": "too old resource version"}}],
        [{"type": "DELETED", "object": sftjob("Running", "12", step=10)}],
    ]
    out = sftctl("watch", "demo", "--kubeconfig", str(kubeconfig(tmp_path, api.url)))
    assert out.returncode == 2
    assert "SFTJob team-a/demo was deleted" in out.stderr
    assert [("watch" in query) for _, query, _ in api.seen] == [False, True, False, True]  # read, watch, read again
