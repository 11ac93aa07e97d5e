"""Real servers on loopback for the storage tests: an S3 server (moto in server mode, with IAM auth on), an
MLflow tracking server (SQLite backend, local artifact root), a hub-like HTTP server, and a TCP proxy that
injects network faults. Imported by name (tests/ folders are not packages).

Each binds one address, loopback unless told otherwise: the real node's pods reach this machine only at
the node's bridge address (tests/integration/test_storage_end_to_end.py binds them there alone)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REQUEST_LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.[01]" (\d{3})')


LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0, log: Path | None = None,
                  host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Request:
    method: str
    path: str  # without the query
    query: str
    status: int


@dataclass
class S3Server:
    """moto's S3 (and IAM) server."""

    proc: subprocess.Popen
    port: int
    log: Path
    access_key: str = ""
    secret_key: str = ""
    host: str = LOOPBACK

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The variables the renderer would set from credentialsSecretRef."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", **extra}

    def client(self, service: str = "s3", access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
        )

    def mark(self) -> int:
        """A position in the request log; ``requests(since=mark)`` lists what came after it."""
        time.sleep(0.3)  # the server logs a request just after answering it
        return len(self.log.read_text().splitlines())

    def requests(self, since: int = 0) -> list[Request]:
        time.sleep(0.3)
        out = []
        for line in self.log.read_text().splitlines()[since:]:
            m = REQUEST_LINE.search(line)
            if m:
                path, _, query = m.group(2).partition("?")
                out.append(Request(m.group(1), urllib.parse.unquote(path), query, int(m.group(3))))
        return out


def start_s3(tmp: Path, *, auth: bool = False, host: str = LOOPBACK) -> S3Server:
    """moto in server mode on ``host``. With ``auth`` it checks signatures and IAM policies (an admin user is
    created and its keys kept); moto then rejects the signature of a ListObjects with a ``/`` in the prefix,
    so tests that list prefixes use a server without auth (any keys accepted)."""
    port = free_port(host)
    log = tmp / "moto.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )
    server = S3Server(proc, port, log, "test-key-id", "test-secret", host)
    try:
        wait_for_port(port, proc, log=log, host=host)
        if auth:
            # The first three requests go through unauthenticated: an admin user, its key, its policy.
            iam = server.client("iam", access_key="bootstrap", secret_key="bootstrap")
            iam.create_user(UserName="admin")
            key = iam.create_access_key(UserName="admin")["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(policy))
            server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    except BaseException:
        stop(proc)
        raise
    return server


@dataclass
class MlflowServer:
    proc: subprocess.Popen
    port: int
    log: Path
    host: str = LOOPBACK

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def start_mlflow(tmp: Path, host: str = LOOPBACK) -> MlflowServer:
    port = free_port(host)
    log = tmp / "mlflow.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp,
    )
    try:
        wait_for_port(port, proc, timeout=120, log=log, host=host)
    except BaseException:
        stop(proc)
        raise
    return MlflowServer(proc, port, log, host)


# ---------------------------------------------------------------- a hub-like server


@dataclass
class HubServer:
    """Serves folders under ``root/<models|datasets>/<org>/<name>`` the way the HF hub serves repos, enough for
    huggingface_hub's repo_info, list_repo_tree and file downloads (HEAD + ranged GET). Every repo has one
    commit, derived from its files."""

    root: Path
    port: int = 0
    log: list[tuple[str, str, int]] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def commit(self, kind: str, repo: str) -> str:
        files = self._files(kind, repo) or {}
        h = hashlib.sha1()
        for name, path in sorted(files.items()):
            h.update(name.encode() + hashlib.sha1(path.read_bytes()).digest())
        return h.hexdigest()

    def _files(self, kind: str, repo: str) -> dict[str, Path] | None:
        base = self.root / kind / repo
        if not base.is_dir():
            return None
        return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}

    def file_gets(self) -> list[str]:
        return [path for method, path, status in self.log if method == "GET" and "/resolve/" in path]

    def start(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet; requests are recorded in hub.log
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                hub.log.append((self.command, self.path, status))
                headers = dict(headers or {})
                headers.setdefault("Content-Length", str(len(body)))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, doc, status: int = 200):
                self._send(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

            def _not_found(self, code: str, head: bool = False):
                self._send(404, b'{"error": "not found"}', {"X-Error-Code": code, "X-Error-Message": code}, head=head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

            def _route(self, head: bool):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
                if m:
                    kind, repo, what, rev = m.group(1), m.group(2), m.group(3) or "revision", m.group(4) or "main"
                    files = hub._files(kind, repo)
                    if files is None:
                        return self._not_found("RepoNotFound")
                    commit = hub.commit(kind, repo)
                    if rev not in ("main", commit):
                        return self._not_found("RevisionNotFound")
                    blobs = {n: hashlib.sha1(p.read_bytes()).hexdigest() for n, p in files.items()}
                    if what == "revision":
                        return self._json({
                            "id": repo, "sha": commit, "private": False,
                            "siblings": [{"rfilename": n, "size": p.stat().st_size, "blobId": blobs[n]} for n, p in files.items()],
                        })
                    return self._json([{"type": "file", "path": n, "size": p.stat().st_size, "oid": blobs[n]} for n, p in files.items()])
                m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    kind = "datasets" if m.group(1) else "models"
                    files = hub._files(kind, m.group(2))
                    if files is None:
                        return self._not_found("RepoNotFound", head)
                    commit = hub.commit(kind, m.group(2))
                    if m.group(3) not in ("main", commit):
                        return self._not_found("RevisionNotFound", head)
                    if m.group(4) not in files:
                        return self._not_found("EntryNotFound", head)
                    data = files[m.group(4)].read_bytes()
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
                    rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                    if rng and not head:
                        start = int(rng.group(1))
                        end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                        return self._send(206, data[start : end + 1], headers)
                    if head:
                        headers["Content-Length"] = str(len(data))
                        return self._send(200, b"", headers, head=True)
                    return self._send(200, data, headers)
                self._not_found("EntryNotFound", head)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


# ---------------------------------------------------------------- network faults


class FaultyProxy:
    """A TCP proxy in front of a server: ``cut_after(n, times)`` closes the next ``times`` connections once
    ``n`` response bytes went through; ``rate`` limits bytes per second both ways (to interrupt a transfer
    mid-way); ``refuse(times)`` closes the next connections at once. ``bytes_down`` counts response bytes."""

    def __init__(self, target_port: int, host: str = LOOPBACK):
        self.target_port = target_port
        self.host = host
        self.rate: float | None = None
        self._cuts: list[int] = []
        self._refusals = 0
        self.connections = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._down = False
        self._live: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def cut_after(self, n: int, times: int = 1) -> None:
        with self._lock:
            self._cuts += [n] * times

    def refuse(self, times: int) -> None:
        with self._lock:
            self._refusals += times

    def stop_refusing(self) -> None:
        """The end of an outage started with a large ``refuse``."""
        with self._lock:
            self._refusals = 0

    def go_down(self) -> None:
        """The server is gone: open connections are cut and new ones refused, until ``come_back``."""
        with self._lock:
            self._down = True
            live, self._live = self._live, set()
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def come_back(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self._down:
                    client.close()
                    continue
                if self._refusals:
                    self._refusals -= 1
                    client.close()
                    continue
                cut = self._cuts.pop(0) if self._cuts else None
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, None, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, cut, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: int | None, response: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[: max(0, cut - sent)])
                    with self._lock:
                        self.bytes_down += max(0, cut - sent)
                    break
                dst.sendall(data)
                sent += len(data)
                if response:
                    with self._lock:
                        self.bytes_down += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live -= {src, dst}
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
