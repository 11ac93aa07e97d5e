"""Where the API server is and how to log in to it: in-cluster, or a kubeconfig (tokens, client
certificates, exec plugins). One loader for the operator, its Kopf watches and ``sftctl status``/``watch``.

Exec plugins (``users[].user.exec``, client-go's credential plugins) are run here rather than through
the kubernetes library: that library would be a dependency of the product only for this, and it
costs ~24 MiB of memory in the operator.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_TIMEOUT_SECONDS = 60.0  # a plugin that asks for a browser login takes a while
EXPIRY_MARGIN_SECONDS = 10.0  # renew a little before the plugin's expirationTimestamp, not after a 401


class CredentialsError(ValueError):
    """A kubeconfig or credential plugin that cannot give credentials, with the reason."""


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate, in plain files and strings."""

    server: str
    ca_file: str | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None  # re-read when it changes (projected tokens rotate)
    cert_file: str | None = None
    key_file: str | None = None
    namespace: str | None = None  # the context's (kubeconfig) or the pod's (in-cluster) namespace
    expires: float | None = None  # epoch seconds: an exec plugin's expirationTimestamp

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def expired(self, now: float | None = None) -> bool:
        """True once the plugin's credentials are (about to be) out of date: time to load them again."""
        return self.expires is not None and (time.time() if now is None else now) >= self.expires - EXPIRY_MARGIN_SECONDS


def connection_info(credentials: Credentials) -> Any:
    """The same credentials for Kopf's own client (its watches): one login for the whole operator."""
    import kopf

    token = credentials.token
    if credentials.token_file:
        token = Path(credentials.token_file).read_text().strip()
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_file,
        insecure=credentials.insecure or None,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=credentials.cert_file,
        private_key_path=credentials.key_file,
        default_namespace=credentials.namespace,
        expiration=datetime.fromtimestamp(credentials.expires).astimezone() if credentials.expires else None,
    )


def in_cluster_credentials() -> Credentials | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token = SERVICE_ACCOUNT_DIR / "token"
    if not host or not port or not token.exists():
        return None
    host = f"[{host}]" if ":" in host else host
    try:
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or None
    except OSError:
        namespace = None
    return Credentials(f"https://{host}:{port}", ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"), token_file=str(token),
                       namespace=namespace)


def _materialize(data: bytes, name: str, directory: list[str]) -> str:
    """Key material as a private file (the ssl module loads client certificates from files)."""
    if not directory:
        directory.append(tempfile.mkdtemp(prefix="sft-operator-"))
    path = Path(directory[0]) / name
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def _timestamp(value: str) -> float:
    """RFC 3339 (``2026-12-08T00:00:00Z``, fractions and offsets too) as epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def exec_credential(spec: dict[str, Any], cluster: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Run a kubeconfig user's exec plugin (command, args, env) and return its ExecCredential's status:
    ``token`` or ``clientCertificateData`` + ``clientKeyData``, and ``expirationTimestamp`` if it has one."""
    command = spec.get("command")
    if not command:
        raise CredentialsError("kubeconfig: the user's exec plugin has no command")
    if os.sep in command and not os.path.isabs(command):  # relative to the kubeconfig, as client-go reads it
        command = str(base_dir / command)
    api_version = spec.get("apiVersion") or "client.authentication.k8s.io/v1"
    info: dict[str, Any] = {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    if spec.get("provideClusterInfo"):
        info["spec"]["cluster"] = {k: v for k, v in {
            "server": cluster.get("server"),
            "certificate-authority-data": cluster.get("certificate-authority-data"),
            "insecure-skip-tls-verify": cluster.get("insecure-skip-tls-verify"),
        }.items() if v is not None}
    env = {**os.environ, **{e["name"]: str(e.get("value", "")) for e in spec.get("env") or []},
           "KUBERNETES_EXEC_INFO": json.dumps(info)}
    argv = [command, *(spec.get("args") or [])]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=EXEC_TIMEOUT_SECONDS,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        hint = spec.get("installHint") or ""
        raise CredentialsError(f"kubeconfig: exec plugin {command!r} not found" + (f"; {hint.strip()}" if hint else "")) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialsError(f"kubeconfig: exec plugin {command!r}: {exc}") from None
    if proc.returncode != 0:
        raise CredentialsError(f"kubeconfig: exec plugin {command!r} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-500:]}")
    try:
        status = (json.loads(proc.stdout) or {}).get("status") or {}
    except (ValueError, AttributeError):
        raise CredentialsError(f"kubeconfig: exec plugin {command!r} printed no ExecCredential JSON") from None
    if not status.get("token") and not (status.get("clientCertificateData") and status.get("clientKeyData")):
        raise CredentialsError(f"kubeconfig: exec plugin {command!r}: its ExecCredential has neither status.token "
                               "nor status.clientCertificateData and clientKeyData")
    return status


def kubeconfig_credentials(path: str | None = None) -> Credentials:
    """From a kubeconfig (``path``, else ``$KUBECONFIG``, else ~/.kube/config): the current context's
    server, CA, namespace and client certificate, token or exec plugin."""
    paths = [p for p in (path or os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep) if p]
    current, contexts, clusters, users = None, {}, {}, {}
    base_dir = Path(paths[0]).expanduser().parent if paths else Path.cwd()
    for item in paths:
        try:
            doc = yaml.safe_load(Path(item).expanduser().read_text()) or {}
        except FileNotFoundError:
            if len(paths) > 1:  # $KUBECONFIG lists files that may not exist, like kubectl reads it
                continue
            raise
        current = current or doc.get("current-context")
        for table, key in ((contexts, "contexts"), (clusters, "clusters"), (users, "users")):
            for entry in doc.get(key) or []:
                table.setdefault(entry["name"], entry.get(key[:-1]) or {})
    if current is None or current not in contexts:
        raise CredentialsError(f"kubeconfig {':'.join(paths)}: no current context")
    context = contexts[current]
    if context.get("cluster") not in clusters:
        raise CredentialsError(f"kubeconfig {':'.join(paths)}: context {current!r} names no known cluster")
    cluster, user = clusters[context["cluster"]], users.get(context.get("user"), {})
    files: list[str] = []

    def file(key: str, name: str, source: dict[str, Any]) -> str | None:
        if source.get(f"{key}-data"):
            return _materialize(base64.b64decode(source[f"{key}-data"]), name, files)
        return str((base_dir / Path(source[key]).expanduser())) if source.get(key) else None

    token, cert_file, key_file, expires = user.get("token"), None, None, None
    if user.get("exec"):
        status = exec_credential(user["exec"], cluster, base_dir)
        token = status.get("token")
        if not token:
            cert_file = _materialize(status["clientCertificateData"].encode(), "client.crt", files)
            key_file = _materialize(status["clientKeyData"].encode(), "client.key", files)
        if status.get("expirationTimestamp"):
            expires = _timestamp(status["expirationTimestamp"])
    elif user.get("auth-provider"):
        provider = user["auth-provider"]
        token = (provider.get("config") or {}).get("id-token")  # oidc: the current ID token
        if provider.get("name") != "oidc" or not token:
            raise CredentialsError(f"kubeconfig: auth-provider {provider.get('name')!r} is not supported "
                                   "(client-go dropped auth providers); use an exec plugin (users[].user.exec)")
    else:
        cert_file = file("client-certificate", "client.crt", user)
        key_file = file("client-key", "client.key", user)
    return Credentials(
        server=cluster["server"],
        ca_file=file("certificate-authority", "ca.crt", cluster),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=token,
        token_file=None if user.get("exec") else user.get("tokenFile"),
        cert_file=cert_file,
        key_file=key_file,
        namespace=context.get("namespace"),
        expires=expires,
    )


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """In-cluster when running in a pod, otherwise the kubeconfig (``kubeconfig``, $KUBECONFIG, ~/.kube/config)."""
    if kubeconfig is None:
        found = in_cluster_credentials()
        if found is not None:
            return found
    return kubeconfig_credentials(kubeconfig)
