"""Certificates and keys of the dev/test control plane, made with the openssl CLI.

Everything is throw-away: a private CA valid for a year, an API server serving cert
for loopback, client certs for the admin (``O=system:masters``), the controller
manager and the scheduler (whose bootstrap RBAC roles match their CNs), and the
service-account signing key pair. Files are reused when present, so a restarted
cluster keeps its kubeconfig valid.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Names the API server's serving cert must answer to: loopback plus the in-cluster
# service names that a process-node pod using in-cluster config would dial.
SERVING_SANS = (
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    "IP:10.96.0.1",
)

# Client identities: file stem -> (CN, O)
CLIENTS = {
    "admin": ("sft-dev-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
}


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def apiserver_crt(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def client_crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)


def _ec_key(path: Path) -> None:
    # P-256 keys: instant to generate, accepted by every component.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


def _sign(pki: Pki, key: Path, crt: Path, subject: str, extensions: str) -> None:
    csr = crt.with_suffix(".csr")
    ext = crt.with_suffix(".ext")
    ext.write_text(extensions)
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), cwd=pki.dir)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_crt), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", "365", "-sha256", "-extfile", str(ext), "-out", str(crt),
        cwd=pki.dir,
    )
    csr.unlink()
    ext.unlink()


def ensure_pki(directory: Path) -> Pki:
    """Create whatever is missing under ``directory`` and return the file layout."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    if not pki.ca_crt.exists():
        _ec_key(pki.ca_key)
        _openssl(
            "req", "-x509", "-new", "-key", str(pki.ca_key), "-subj", "/CN=sft-dev-cluster-ca",
            "-days", "365", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", str(pki.ca_crt),
            cwd=directory,
        )
    if not pki.apiserver_crt.exists():
        _ec_key(pki.apiserver_key)
        _sign(
            pki, pki.apiserver_key, pki.apiserver_crt, "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(SERVING_SANS)}\n",
        )
    for name, (cn, org) in CLIENTS.items():
        if pki.client_crt(name).exists():
            continue
        _ec_key(pki.client_key(name))
        subject = f"/CN={cn}" + (f"/O={org}" if org else "")
        _sign(
            pki, pki.client_key(name), pki.client_crt(name), subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )
    if not pki.sa_key.exists():
        # RSA for the service-account issuer: RS256 is what every token consumer supports.
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki.sa_key), cwd=directory)
        _openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    return pki
