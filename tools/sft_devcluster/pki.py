"""Certificates and keys of the dev/test control plane, made with the openssl CLI.

Everything is throw-away: a private CA valid for a year, an API server serving cert
for loopback, client certs for the admin (``O=system:masters``), the controller
manager and the scheduler (whose bootstrap RBAC roles match their CNs), and the
service-account signing key pair. With a real node, also: the node IP in the API
server's cert, the kubelet's client (``system:node:<name>``) and serving certs, and
clients for kube-proxy, CoreDNS and the API server's calls to the kubelet. Files are
reused when present (the API server's cert is remade when its names change), so a
restarted cluster keeps its kubeconfig valid.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Names the API server's serving cert must answer to: loopback plus the in-cluster
# service names that a pod using in-cluster config dials.
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
# With a real node. kube-proxy's CN has a bootstrap binding (system:node-proxier); the
# other two get theirs from cluster.node_rbac().
KUBE_PROXY_USER = "system:kube-proxy"
COREDNS_USER = "sft-dev:coredns"
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


def node_clients(node_name: str) -> dict[str, tuple[str, str]]:
    return {
        "kubelet": (f"system:node:{node_name}", "system:nodes"),  # the Node authorizer's identity
        "kube-proxy": (KUBE_PROXY_USER, ""),
        "coredns": (COREDNS_USER, ""),
        "apiserver-kubelet-client": (KUBELET_CLIENT_USER, ""),
    }

CLIENT_EXTENSIONS = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
)


def serving_extensions(sans) -> str:
    return ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(sans)}\n")


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


def ensure_pki(directory: Path, node_name: str | None = None, node_ip: str | None = None) -> Pki:
    """Create whatever is missing under ``directory`` and return the file layout.
    ``node_name``/``node_ip``: also what a real node needs."""
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
    sans = [*SERVING_SANS, *([f"IP:{node_ip}"] if node_ip else [])]
    sans_file = directory / "apiserver.sans"
    if not pki.apiserver_crt.exists() or (sans_file.read_text() if sans_file.exists() else "") != ",".join(sans):
        _ec_key(pki.apiserver_key)
        _sign(pki, pki.apiserver_key, pki.apiserver_crt, "/CN=kube-apiserver", serving_extensions(sans))
        sans_file.write_text(",".join(sans))
    clients = {**CLIENTS, **(node_clients(node_name) if node_name else {})}
    for name, (cn, org) in clients.items():
        if pki.client_crt(name).exists():
            continue
        _ec_key(pki.client_key(name))
        _sign(pki, pki.client_key(name), pki.client_crt(name), f"/CN={cn}" + (f"/O={org}" if org else ""),
              CLIENT_EXTENSIONS)
    if node_name and not pki.client_crt("kubelet-serving").exists():
        _ec_key(pki.client_key("kubelet-serving"))
        _sign(pki, pki.client_key("kubelet-serving"), pki.client_crt("kubelet-serving"), f"/CN={node_name}",
              serving_extensions([f"DNS:{node_name}", f"IP:{node_ip}"]))
    if not pki.sa_key.exists():
        # RSA for the service-account issuer: RS256 is what every token consumer supports.
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki.sa_key), cwd=directory)
        _openssl("pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub), cwd=directory)
    return pki


def ensure_serving_cert(pki: Pki, name: str, sans: list[str]) -> tuple[Path, Path]:
    """A serving certificate ``<name>.crt``/``.key`` signed by the cluster CA for ``sans`` (made once per
    SAN list); its (certificate, key) paths."""
    crt, key = pki.client_crt(name), pki.client_key(name)
    sans_file = pki.dir / f"{name}.sans"
    if not crt.exists() or (sans_file.read_text() if sans_file.exists() else "") != ",".join(sans):
        _ec_key(key)
        _sign(pki, key, crt, f"/CN={name}", serving_extensions(sans))
        sans_file.write_text(",".join(sans))
    return crt, key
