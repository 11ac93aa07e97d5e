"""A directory -> a one-layer OCI image archive that ``ctr images import`` loads.

Used by scripts/node-bin.sh for the node's pause image and the tests' busybox image (no
registry can be reached, and no image builder is needed for a static binary or two).
The archive is reproducible: entries sorted, owner root, mtime 0, gzip without a
timestamp, so the same input gives the same image ID and a re-import is skipped.

Standard library only, and runnable as a plain script (the build script calls it by path):

    python3 oci.py ROOTFS_DIR NAME OUT_TAR [--entrypoint CMD] [--cmd CMD] [--user UID:GID]

No library fits: podman/buildah would need a base image and a container engine, and the
OCI Python packages on PyPI build registry clients, not archives.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shlex
import tarfile
from pathlib import Path

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar_bytes(add_entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_entries(tar)
    return buf.getvalue()


def rootfs_layer(root: Path) -> bytes:
    """The uncompressed layer tar of ``root``: sorted, owned by root, mtime 0."""

    def add(tar: tarfile.TarFile) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)

    return _tar_bytes(add)


def image_blobs(layer_tar: bytes, name: str, config: dict) -> dict[str, bytes]:
    """The files of an OCI image layout holding one image (pure).

    ``config`` is the image's runtime config (Entrypoint, Cmd, User, Env, ...).
    """
    layer = gzip.compress(layer_tar, compresslevel=6, mtime=0)
    image_config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": DEFAULT_ENV, **config},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "sft_devcluster/oci.py"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": digest(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": digest(manifest_bytes),
            "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            # containerd names the imported image after the first; the OCI spec wants the tag in the second.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rpartition(":")[2],
            },
        }],
    }
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(index, sort_keys=True).encode()}
    for blob in (config_bytes, manifest_bytes, layer):
        files[f"blobs/sha256/{digest(blob)[7:]}"] = blob
    return files


def write_archive(files: dict[str, bytes], out: Path) -> None:
    def add(tar: tarfile.TarFile) -> None:
        for dirname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(_tar_bytes(add))
    tmp.replace(out)  # a reader never sees half an archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rootfs", type=Path, help="directory that becomes the image's filesystem")
    parser.add_argument("name", help="image reference, e.g. localhost/sft-node/pause:3.10.2")
    parser.add_argument("out", type=Path, help="archive to write")
    parser.add_argument("--entrypoint", help="entrypoint command line (shell words)")
    parser.add_argument("--cmd", help="default command line (shell words)")
    parser.add_argument("--user", help="default user, e.g. 65535:65535")
    args = parser.parse_args(argv)
    config: dict = {}
    if args.entrypoint:
        config["Entrypoint"] = shlex.split(args.entrypoint)
    if args.cmd:
        config["Cmd"] = shlex.split(args.cmd)
    if args.user:
        config["User"] = args.user
    files = image_blobs(rootfs_layer(args.rootfs), args.name, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_archive(files, args.out)
    index = json.loads(files["index.json"])
    print(f"{args.out}: {args.name} manifest {index['manifests'][0]['digest']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
