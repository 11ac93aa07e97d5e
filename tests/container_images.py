"""The operator and trainer images for tests: built or reused by scripts/build-images.sh, and run
with podman the way a Pod Security "restricted" pod runs them.

The build runs once per session, before the first test (tests/conftest.py), so a cold build (about
ten minutes) counts against no test's timeout. Its log goes to ``<cache>/images/build.log``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
CONTAINERS_CONF = ROOT / "scripts" / "containers.conf"

# What the kubelet does for a restricted pod (runAsNonRoot with the image's numeric user,
# readOnlyRootFilesystem, capabilities drop ALL, allowPrivilegeEscalation false, RuntimeDefault
# seccomp: podman's default profile), with /tmp as the emptyDir the renderer mounts there.
RESTRICTED = ("--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--tmpfs=/tmp:rw,mode=1777")


class ImageBuildError(Exception):
    pass


@dataclass(frozen=True)
class Image:
    ref: str  # e.g. ghcr.io/sft-operator/trainer:0.1.0
    tar: Path  # docker-archive, loadable with `ctr -n k8s.io images import`


def build_log() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-operator")) / "images" / "build.log"


def ensure_images() -> dict[str, Image]:
    """Build (or reuse) both images; {"operator": Image, "trainer": Image}."""
    log_path = build_log()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), "all"], stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise ImageBuildError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    images = {}
    for line in proc.stdout.strip().splitlines()[-2:]:
        ref, tar = line.split()
        images[ref.rsplit("/", 1)[1].split(":")[0]] = Image(ref, Path(tar))
    return images


def podman(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout, check=check)


def run_restricted(image: Image, *args: str, options: tuple[str, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """`podman run` of the image as a restricted pod would run it, offline; extra podman options first."""
    return podman("run", "--rm", "--network=none", *RESTRICTED, *options, image.ref, *args, timeout=timeout)
