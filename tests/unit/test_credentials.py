"""Logging in to the API server (sft_operator.runtime.credentials): kubeconfig users with an exec plugin,
its expiry, and in-cluster service accounts."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sft_operator.runtime import credentials as creds
from sft_operator.runtime.client import KubeClient
from sft_operator.runtime.credentials import CredentialsError, kubeconfig_credentials


def write_kubeconfig(tmp_path: Path, user: dict, cluster: dict | None = None) -> Path:
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster or {"server": "https://k.example:6443"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team-a"}}],
        "users": [{"name": "u", "user": user}],
    }))
    return path


def plugin(tmp_path: Path, status: dict, name: str = "plugin.py") -> dict:
    """An exec plugin that prints an ExecCredential with ``status`` and records each run and what it was told."""
    script = tmp_path / name
    script.write_text(
        "import json, os, sys\n"
        f"open({str(tmp_path / 'runs')!r}, 'a').write(os.environ['KUBERNETES_EXEC_INFO'] + '\\n')\n"
        f"print(json.dumps({{'kind': 'ExecCredential', 'apiVersion': 'client.authentication.k8s.io/v1',"
        f" 'status': {status!r}}}))\n")
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(script)], "provideClusterInfo": True}}


def runs(tmp_path: Path) -> list[dict]:
    path = tmp_path / "runs"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_exec_plugins_token_and_expiry_are_used(tmp_path):
    got = kubeconfig_credentials(str(write_kubeconfig(
        tmp_path, plugin(tmp_path, {"token": "t0k", "expirationTimestamp": "2030-01-02T03:04:05Z"}))))
    assert got.token == "t0k" and got.namespace == "team-a" and got.server == "https://k.example:6443"
    assert got.expires == 1893553445.0 and not got.expired(now=1893553445.0 - 60) and got.expired(now=1893553445.0)
    told = runs(tmp_path)[0]
    assert told["kind"] == "ExecCredential" and told["spec"]["cluster"]["server"] == "https://k.example:6443"


def test_an_exec_plugins_client_certificate_becomes_private_files(tmp_path):
    cert, key = "-----BEGIN CERTIFICATE-----\nabc\n", "-----BEGIN PRIVATE KEY-----\ndef\n"
    got = kubeconfig_credentials(str(write_kubeconfig(
        tmp_path, plugin(tmp_path, {"clientCertificateData": cert, "clientKeyData": key}))))
    assert got.token is None and got.expires is None
    assert Path(got.cert_file).read_text() == cert and Path(got.key_file).read_text() == key
    assert Path(got.key_file).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(("status", "message"), [
    ({}, "neither status.token nor status.clientCertificateData"),
    ({"clientCertificateData": "x"}, "neither status.token nor status.clientCertificateData"),
])
def test_an_exec_credential_without_credentials_is_refused(tmp_path, status, message):
    with pytest.raises(CredentialsError, match=message):
        kubeconfig_credentials(str(write_kubeconfig(tmp_path, plugin(tmp_path, status))))


def test_a_missing_exec_plugin_shows_its_install_hint(tmp_path):
    user = {"exec": {"command": "no-such-login-tool", "installHint": "install it with: brew install login-tool"}}
    with pytest.raises(CredentialsError, match="'no-such-login-tool' not found; install it with: brew install"):
        kubeconfig_credentials(str(write_kubeconfig(tmp_path, user)))


def test_a_token_and_embedded_ca_are_read_and_relative_files_are_next_to_the_kubeconfig(tmp_path):
    got = kubeconfig_credentials(str(write_kubeconfig(
        tmp_path, {"token": "static", "client-key": "keys/me.key"},
        {"server": "https://x:6443", "certificate-authority-data": base64.b64encode(b"CA PEM").decode()})))
    assert got.token == "static" and Path(got.ca_file).read_bytes() == b"CA PEM"
    assert got.key_file == str(tmp_path / "keys" / "me.key")


def test_an_unsupported_auth_provider_points_to_exec_plugins(tmp_path):
    with pytest.raises(CredentialsError, match="auth-provider 'gcp' is not supported.*exec plugin"):
        kubeconfig_credentials(str(write_kubeconfig(tmp_path, {"auth-provider": {"name": "gcp", "config": {}}})))


def test_in_cluster_credentials_carry_the_pods_namespace(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("sft-system\n")
    monkeypatch.setattr(creds, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    got = creds.load_credentials()
    assert got.server == "https://[fd00::1]:443" and got.namespace == "sft-system"
    assert got.token_file == str(tmp_path / "token")


def test_the_client_runs_the_plugin_again_when_its_token_expires_before_a_call(tmp_path):
    """An exec plugin's token is renewed at its expirationTimestamp, not after the API server refused it."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"kind": "SFTJob", "metadata": {"name": "demo"}})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/apis/sft.dev/v1alpha1/namespaces/a/sftjobs/demo", handler)
        async with TestServer(app) as server:
            soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            stale = plugin(tmp_path, {"token": "first", "expirationTimestamp": "2000-01-01T00:00:00Z"}, "expired.py")
            plugin(tmp_path, {"token": "second", "expirationTimestamp": soon}, "fresh.py")
            path = write_kubeconfig(tmp_path, stale, {"server": str(server.make_url("")).rstrip("/")})
            client = KubeClient.from_kubeconfig(str(path))
            assert client.credentials.token == "first"
            # from now on the plugin hands out a token valid for an hour
            path.write_text(path.read_text().replace("expired.py", "fresh.py"))
            await client.get("SFTJob", "a", "demo")
            await client.get("SFTJob", "a", "demo")
            await client.close()

    asyncio.run(main())
    assert seen == ["Bearer second", "Bearer second"]
    assert len(runs(tmp_path)) == 2  # once at the start, once when it had expired; not on every call
