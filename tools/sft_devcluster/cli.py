"""``sftctl dev-cluster up|down|status|import-image|stop|start|restart`` (and ``python -m sft_devcluster``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import node as realnode
from .cluster import down, import_images, start_component, status, stop_component, up
from .control_plane import COMPONENTS
from .node_objects import DEFAULT_CLAIMS, VOLUMES_NAMESPACE, volume_path
from .processes import DevClusterError
from .state import (
    default_image_archives,
    default_state_dir,
    ensure_node_binaries,
    node_binaries_cached,
    running_components,
)

# What `dev-cluster --help` says the dev cluster is.
DESCRIPTION = "Start, stop and inspect the local dev/test control plane (no Docker)."


def add_subparser(subparsers) -> None:
    """Register ``dev-cluster up|down|status|import-image|stop|start|restart`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "dev-cluster",
        help="local cluster for development and tests (control plane, a real node, kwok GPU nodes)",
        description=DESCRIPTION,
    )
    parser.add_argument("action", choices=("up", "down", "status", "import-image", "stop", "start", "restart"))
    parser.add_argument("targets", nargs="*", metavar="ARCHIVE|COMPONENT",
                        help="import-image: image archives (podman/docker save, OCI layout tar); stop|start|restart: "
                             f"components ({', '.join(COMPONENTS)}), acted on in the order given")
    parser.add_argument("--dir", "--state-dir", dest="dir", type=Path, default=None,
                        help=f"state directory (default {default_state_dir()})")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="number of kwok GPU nodes (8 GPUs each)")
    parser.add_argument("--kubeconfig-out", type=Path, default=None, help="also write the admin kubeconfig here")
    parser.add_argument("--crds", type=Path, default=None, help="directory of CRD manifests (default: the repo's crds/)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for readiness (up; start and restart: for the component's health)")
    parser.add_argument("--kill", action="store_true",
                        help="stop|restart: SIGKILL at once, like a crash (default: SIGTERM, SIGKILL after --stop-timeout)")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="stop|restart: seconds from SIGTERM to SIGKILL")
    node = parser.add_mutually_exclusive_group()
    node.add_argument("--real-node", dest="real_node", action="store_true", default=None,
                      help=f"start the real node {realnode.NODE_NAME} (builds its binaries if needed; "
                           "default: start it when scripts/node-bin.sh has built them)")
    node.add_argument("--no-real-node", dest="real_node", action="store_false",
                      help="kwok nodes only (simulated pods; no root needed)")
    parser.add_argument("--kueue", action="store_true",
                        help="up: also run Kueue (built from its Go module on first use, scripts/kueue-bin.sh; "
                             "a running cluster gets it added)")
    parser.add_argument("--node-gpus", type=int, default=realnode.DEFAULT_GPUS,
                        help="nvidia.com/gpu advertised by the real node (pods then run on its CPUs)")
    parser.add_argument("--node-wait", type=float, default=0.0,
                        help="seconds to wait when another cluster's real node runs on this machine")
    parser.set_defaults(func=run_cli)


def _want_real_node(choice: bool | None) -> bool:
    if choice is not None:
        if choice:
            ensure_node_binaries()
        return choice
    if os.geteuid() != 0:
        print("real node: skipped (needs root); kwok nodes only")
        return False
    if not node_binaries_cached():
        print("real node: skipped, its binaries are not built yet: scripts/node-bin.sh "
              "(a few minutes, once), or `up --real-node`")
        return False
    ensure_node_binaries()  # quick when complete; picks up a changed recipe
    return True


def _component_cli(args) -> int:
    """``stop|start|restart COMPONENT...``: one line per component, exit 0 when each is as asked."""
    unknown = [name for name in args.targets if name not in COMPONENTS]
    if not args.targets or unknown:
        what = f"unknown component {', '.join(map(repr, unknown))}" if unknown else "name a component"
        print(f"dev-cluster {args.action}: {what}; known: {', '.join(COMPONENTS)}", file=sys.stderr)
        return 2
    for name in args.targets:
        began = time.monotonic()
        if args.action in ("stop", "restart"):
            pid = stop_component(args.dir, name, kill=args.kill, timeout=args.stop_timeout)
            how = "SIGKILL" if args.kill else "SIGTERM"
            if args.action == "stop":
                print(f"stopped {name} (pid {pid}, {how}) in {time.monotonic() - began:.1f}s" if pid
                      else f"{name} is already stopped")
                continue
        started = start_component(args.dir, name, timeout=args.timeout)
        if started is None:
            print(f"{name} is already running (pid {running_components((args.dir or default_state_dir()).resolve())[name]})")
            continue
        verb = "restarted" if args.action == "restart" else "started"
        if started.not_checked:
            print(f"{verb} {name} (pid {started.pid}); not waiting for {COMPONENTS[name].health}: "
                  f"it needs {', '.join(started.not_checked)}, stopped")
        else:
            print(f"{verb} {name} (pid {started.pid}): {COMPONENTS[name].health} after {started.seconds:.1f}s"
                  + (f", {time.monotonic() - began:.1f}s in all" if args.action == "restart" else ""))
    return 0


def run_cli(args) -> int:
    try:
        if args.action == "up":
            if status(args.dir)["running"]:
                info = up(args.dir, kubeconfig_out=args.kubeconfig_out, kueue=args.kueue)
                print(f"dev cluster already running: {info.server}")
                print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
                return 0
            real_node = _want_real_node(args.real_node)
            info = up(args.dir, gpu_nodes=args.gpu_nodes, kubeconfig_out=args.kubeconfig_out,
                      crds_dir=args.crds, timeout=args.timeout, real_node=real_node, node_gpus=args.node_gpus, node_wait=args.node_wait,
                      image_archives=default_image_archives() if real_node else [], kueue=args.kueue)
            nodes = f"real node {realnode.NODE_NAME}, " if real_node else ""
            queue = ", Kueue" if info.kueue else ""
            print(f"dev cluster up in {info.startup_seconds}s: {info.server} ({nodes}{args.gpu_nodes} kwok GPU nodes{queue})")
            if real_node:
                print(f"kubectl get nodes shows {realnode.NODE_NAME} (Ready {info.node_ready_seconds}s after the "
                      f"kubelet started); claims {', '.join(DEFAULT_CLAIMS)} in namespace {VOLUMES_NAMESPACE} "
                      f"hold {volume_path(Path(info.state_dir), VOLUMES_NAMESPACE, '<claim>')}")
            print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
            return 0
        if args.action == "down":
            pids = down(args.dir)
            print(f"stopped {len(pids)} processes" if pids else "nothing was running")
            return 0
        if args.action == "import-image":
            if not args.targets:
                print("dev-cluster import-image: name one or more image archives", file=sys.stderr)
                return 2
            for ref, action in import_images(args.dir, [Path(t) for t in args.targets], say=print):
                print(f"{ref}: {action}")
            return 0
        if args.action in ("stop", "start", "restart"):
            return _component_cli(args)
        st = status(args.dir)
        print(f"state dir:  {st['stateDir']}")
        print(f"kubeconfig: {st['kubeconfig']}")
        print(f"server:     {st['server']}")
        for name, pid in st["components"].items():
            print(f"  {name:<24} {'pid ' + str(pid) if pid else 'stopped'}")
        for node in st["nodes"]:
            print(f"  node {node['name']:<19} {'Ready' if node['ready'] else 'NotReady':<9} {node['kind']:<8}"
                  f"nvidia.com/gpu={node['gpus']}")
        if "realNodeHolder" in st:
            print(f"  real node: in use by {st['realNodeHolder']}")
        if "error" in st:
            print(f"  error: {st['error']}")
        return 0 if st["running"] else 1
    except DevClusterError as exc:
        print(f"dev-cluster {args.action}: {exc}", file=sys.stderr)
        return 1
