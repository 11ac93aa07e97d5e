"""Image archives into the real node's containerd, when missing or changed.

No registry can be reached from here, so images travel as archives: ``podman save`` /
``docker save`` output (docker-archive) or an OCI layout tar (scripts/node-bin.sh's pause
and busybox images). ``ctr -n k8s.io images import`` loads them where the kubelet looks,
and pods use ``imagePullPolicy: IfNotPresent`` or ``Never``.

An archive is imported only when one of its references is absent from the node or names
another image ID (the config digest, what ``crictl images`` shows), so importing the
same multi-GiB trainer image twice costs a read of the archive's headers.

Imports discard the layer blobs once they are unpacked (``--local
--discard-unpacked-layers``): the node keeps each image once, as snapshots, instead of
also keeping its (uncompressed, docker-archive) layers in the content store, 6 GiB for
the trainer. The CRI still lists and runs such an image (its manifest and config stay);
it could not be pushed or exported again, which a node never needs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

from .processes import DevClusterError


def normalize(ref: str) -> str:
    """A reference as containerd's CRI lists it: registry host and tag always present."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rpartition("/")[2] else (ref, "", "latest")
    first = name.split("/")[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{tag or 'latest'}"


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise DevClusterError(f"{tar.name}: {name} is not a file")
    return f.read()


def archive_images(path: Path) -> dict[str, str]:
    """Reference -> image ID (``sha256:`` of the config) of every tagged image in an archive."""
    try:
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
            if "manifest.json" in names:  # docker-archive
                images = {}
                for entry in json.loads(_member(tar, "manifest.json")):
                    image_id = "sha256:" + hashlib.sha256(_member(tar, entry["Config"])).hexdigest()
                    images.update({normalize(tag): image_id for tag in entry.get("RepoTags") or []})
                return images
            if "index.json" in names:  # OCI layout
                images = {}
                for desc in json.loads(_member(tar, "index.json"))["manifests"]:
                    ref = (desc.get("annotations") or {}).get("io.containerd.image.name")
                    blob = json.loads(_member(tar, "blobs/sha256/" + desc["digest"].split(":", 1)[1]))
                    if ref and "config" in blob:
                        images[normalize(ref)] = blob["config"]["digest"]
                return images
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise DevClusterError(f"{path} is not a readable image archive: {exc}") from None
    raise DevClusterError(f"{path} is neither a docker-archive (manifest.json) nor an OCI layout (index.json)")


def _crictl_images(layout, *args: str, timeout: str = "10s") -> subprocess.CompletedProcess:
    return subprocess.run([str(layout.bin / "crictl"), "--config=/dev/null", f"--image-endpoint=unix://{layout.socket}",
                           f"--timeout={timeout}", *args], capture_output=True, text=True)


def _listed_images(layout) -> list[dict]:
    proc = _crictl_images(layout, "images", "-o", "json")
    if proc.returncode != 0:
        raise DevClusterError(f"crictl images failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout).get("images") or []


def node_images(layout) -> dict[str, str]:
    """Reference -> image ID of what the node's containerd holds (through the CRI)."""
    return {tag: image["id"] for image in _listed_images(layout) for tag in image.get("repoTags") or []}


def remove_untagged(layout) -> list[str]:
    """Remove images no reference names any more: what an import that replaced a version left
    (the CRI keeps each image ID as a reference of its own). Returns their IDs."""
    stale = [image["id"] for image in _listed_images(layout) if not image.get("repoTags")]
    for image_id in stale:
        # Removing a replaced trainer image deletes gigabytes of snapshots: over 10 s on a busy node.
        proc = _crictl_images(layout, "rmi", image_id, timeout="180s")
        if proc.returncode != 0:
            raise DevClusterError(f"crictl rmi {image_id} failed: {proc.stderr.strip()}")
    return stale


def import_command(layout, archive: Path) -> list[str]:
    """``ctr images import`` into the CRI's namespace, keeping the unpacked snapshots only
    (``--discard-unpacked-layers`` needs ``--local``: the transfer service lacks it)."""
    return [str(layout.bin / "ctr"), f"--address={layout.socket}", "--namespace=k8s.io", "images", "import",
            "--local", "--discard-unpacked-layers", str(archive)]


def import_archives(layout, archives: list[Path], before_import=None) -> list[tuple[str, str]]:
    """Import each archive whose images the node lacks or holds in another version
    (``before_import(archive)`` is told first: a big one takes minutes).
    Returns (reference, "present" | "imported" | "replaced") for every image."""
    have = node_images(layout)
    report = []
    for archive in archives:
        wanted = archive_images(archive)
        if not wanted:
            raise DevClusterError(f"{archive} holds no tagged image")
        if all(have.get(ref) == image_id for ref, image_id in wanted.items()):
            report += [(ref, "present") for ref in wanted]
            continue
        if before_import:
            before_import(archive)
        proc = subprocess.run(import_command(layout, archive), capture_output=True, text=True)
        if proc.returncode != 0:
            raise DevClusterError(f"ctr images import {archive} failed: {proc.stderr.strip()[-2000:]}")
        report += [(ref, "replaced" if ref in have else "imported") for ref in wanted]
        have.update(wanted)
    if any(action == "replaced" for _, action in report):
        remove_untagged(layout)  # the versions replaced: a trainer image's top layers each time
    return report
