"""Pure parts of the dev cluster (the running cluster is tested in tests/integration)."""

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from sft_devcluster import cluster, control_plane, kueue, kwok, processes, state
from sft_devcluster import node as realnode
from sft_devcluster.pki import Pki
from sft_devcluster.processes import DevClusterError


def test_component_commands_wire_tokens_rbac_and_kwok(tmp_path):
    ports = dict.fromkeys(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"), 1)
    cmds = control_plane.component_commands(Path("/bin"), tmp_path, Pki(tmp_path / "pki"), ports)
    api = " ".join(cmds["kube-apiserver"])
    assert "--authorization-mode=Node,RBAC" in api and "--service-account-signing-key-file" in api
    kcm = " ".join(cmds["kube-controller-manager"])
    assert "--service-account-private-key-file" in kcm and "--root-ca-file" in kcm and "--leader-elect=false" in kcm
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in cmds["kwok"]


def test_kwok_nodes_have_eight_gpus_and_are_selected_by_annotation():
    node = kwok.kwok_node("kwok-gpu-0")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_kwok_stages_include_the_failure_stages_tests_rely_on():
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(kwok.KWOK_STAGES.read_text())}
    assert {"node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete",
            "sft-pod-exit-code", "sft-pod-oomkill", "pvc-provision"} <= names


def test_load_crds_falls_back_to_the_checked_in_crd_which_is_the_generated_one(tmp_path):
    from sft_operator.api.crd import crd_manifest

    assert cluster.load_crds(tmp_path) == [crd_manifest()]
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cluster.PLACEHOLDER_CRD | {"metadata": {"name": "x.sft.dev"}}))
    assert [c["metadata"]["name"] for c in cluster.load_crds(tmp_path)] == ["x.sft.dev"]


# ---------------------------------------------------------------- stop|start|restart COMPONENT


def _cluster(state_dir: Path, real_node: bool = False, **fields) -> state.ClusterInfo:
    names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok", "kubelet",
             "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics", "coredns-health", "coredns-ready")
    info = state.ClusterInfo(str(state_dir), str(state_dir / "admin.kubeconfig"), "https://127.0.0.1:1",
                               "/k8s/bin", {name: 2000 + i for i, name in enumerate(names)},
                               real_node=real_node, **fields)
    (state_dir / "pids").mkdir(parents=True, exist_ok=True)
    (state_dir / "components").mkdir(exist_ok=True)
    info.save()
    return info


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_every_component_of_a_cluster_has_a_command_and_a_health_check(tmp_path):
    info = _cluster(tmp_path, real_node=True, node_cache="/cache/node", kueue="/cache/kueue-v0.17.0")
    assert set(control_plane.cluster_commands(info)) == set(info.components) == set(control_plane.COMPONENTS)
    assert info.components[0] == "kueue"  # stopped first: it calls the API server and the node runs its pods
    assert set(control_plane.HEALTH_CHECKS) == set(control_plane.COMPONENTS)
    kwok_only = _cluster(tmp_path / "kwok-only")
    assert set(control_plane.cluster_commands(kwok_only)) == set(kwok_only.components) == set(state.CONTROL_PLANE)


def test_start_rebuilds_the_command_lines_of_up_from_cluster_json_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache-when-up-ran"))
    at_up = control_plane.cluster_commands(_cluster(tmp_path, real_node=True, profiling=True,
                                              node_cache=str(state.node_cache_dir())))
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "another-shell"))  # start runs elsewhere
    assert control_plane.cluster_commands(state.ClusterInfo.load(tmp_path)) == at_up
    assert "--profiling=true" in at_up["kube-apiserver"]
    assert at_up["containerd"][0] == str(tmp_path / "cache-when-up-ran" / "node" / "bin" / "containerd")


def test_start_launches_the_command_up_launched_and_waits_for_its_health(tmp_path, monkeypatch):
    info = _cluster(tmp_path)
    processes.pidfile(tmp_path, "etcd").write_text(f"{_dead_pid()}\n")  # stopped (or crashed)
    launched = []

    def fake_start(name, cmd, state_dir, extra_env=None, pass_fds=()):
        launched.append((name, cmd))
        return types.SimpleNamespace(pid=4242, poll=lambda: None)

    checked = []
    monkeypatch.setattr(cluster, "start", fake_start)
    monkeypatch.setitem(control_plane.HEALTH_CHECKS, "etcd", lambda info, since: checked.append(since) or True)
    started = cluster.start_component(tmp_path, "etcd")
    assert launched == [("etcd", control_plane.cluster_commands(info)["etcd"])]
    assert "--data-dir=" + str(tmp_path / "etcd") in launched[0][1]  # the data of the etcd that stopped
    assert started.pid == 4242 and started.not_checked == () and checked
    assert state.ClusterInfo.load(tmp_path).pids["etcd"] == 4242


def test_start_does_not_wait_for_a_health_check_a_stopped_component_blocks(tmp_path, monkeypatch):
    _cluster(tmp_path)
    processes.pidfile(tmp_path, "kube-apiserver").write_text(f"{_dead_pid()}\n")
    monkeypatch.setattr(cluster, "start", lambda *a, **k: types.SimpleNamespace(pid=4243, poll=lambda: None))
    started = cluster.start_component(tmp_path, "kube-apiserver")  # etcd isn't running either
    assert started.not_checked == ("etcd",)


def test_stop_ends_only_the_components_own_process_and_start_knows_it_stopped(tmp_path):
    _cluster(tmp_path)
    # Like containerd: a child in the component's session (a shim) that must outlive it.
    proc = processes.start("kwok", ["sh", "-c", "sleep 300 & echo $! > child.pid; exec sleep 301"], tmp_path)
    child = _wait_for_file(tmp_path / "child.pid")
    try:
        assert cluster.stop_component(tmp_path, "kwok") == proc.pid
        proc.wait(5)
        assert processes.alive(child)
        assert state.running_components(tmp_path) == {}
        assert cluster.status(tmp_path)["components"]["kwok"] is None
        assert cluster.stop_component(tmp_path, "kwok") is None  # already stopped: nothing to do
    finally:
        processes.signal_all([child], signal.SIGKILL)


def test_stop_sends_sigkill_after_the_timeout_and_at_once_with_kill(tmp_path):
    _cluster(tmp_path)
    for kill, timeout in ((False, 0.5), (True, 60.0)):
        # SIGTERM ignored (the disposition survives exec): only SIGKILL ends it.
        proc = processes.start("kube-scheduler", ["sh", "-c", "trap '' TERM; echo $$ > ready; exec sleep 300"],
                               tmp_path)
        _wait_for_file(tmp_path / "ready")
        (tmp_path / "ready").unlink()
        assert cluster.stop_component(tmp_path, "kube-scheduler", kill=kill, timeout=timeout) == proc.pid
        assert proc.wait(5) == -signal.SIGKILL


def test_stop_and_start_name_what_is_wrong(tmp_path):
    _cluster(tmp_path)  # kwok-only
    with pytest.raises(DevClusterError, match="unknown component 'kube-apiserv'; known: etcd, kube-apiserver"):
        cluster.stop_component(tmp_path, "kube-apiserv")
    with pytest.raises(DevClusterError, match="kubelet is part of the real node sft-node-0, which the cluster"):
        cluster.start_component(tmp_path, "kubelet")
    with pytest.raises(DevClusterError, match="is down"):  # down removed the pidfiles
        cluster.start_component(tmp_path, "etcd")
    with pytest.raises(DevClusterError, match="no dev cluster in"):
        cluster.stop_component(tmp_path / "never-up", "etcd")


def test_cli_says_a_stopped_component_is_already_stopped_and_rejects_unknown_ones(tmp_path, capsys):
    from sft_devcluster.__main__ import main

    _cluster(tmp_path)
    processes.pidfile(tmp_path, "etcd").write_text(f"{_dead_pid()}\n")
    assert main(["stop", "etcd", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "etcd is already stopped\n"
    assert main(["restart", "etcd", "kubelt", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown component 'kubelt'; known: etcd, kube-apiserver, kube-controller-manager" in err


def _wait_for_file(path: Path) -> int:
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def test_a_restarted_node_process_holds_the_node_lock_its_running_siblings_hold(tmp_path, monkeypatch):
    lock_file = tmp_path / "node.lock"
    monkeypatch.setattr(realnode, "LOCK_FILE", lock_file)
    lock_file.write_text(json.dumps({"stateDir": str(tmp_path)}))
    for sub in ("components", "pids"):
        (tmp_path / sub).mkdir()
    layout = realnode.NodeLayout(tmp_path / "node", tmp_path / "cache", tmp_path / "bin", run=tmp_path / "run")
    # A sibling (say containerd) holding the lock, as the node's processes do.
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "open('ready', 'w').write('1'); time.sleep(300)")
    sibling = processes.start("containerd", [sys.executable, "-c", code, str(lock_file)], tmp_path)
    try:
        _wait_for_file(tmp_path / "ready")
        lock = realnode.NodeLock.for_start(tmp_path, layout)
    finally:
        sibling.kill()
        sibling.wait()
    assert realnode.NodeLock.try_acquire() is None  # the copy still holds it: the restarted process would
    lock.release()
    free = realnode.NodeLock.try_acquire()
    assert free is not None
    free.release()


def test_a_node_process_is_not_started_on_a_machine_whose_node_is_no_longer_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(realnode, "LOCK_FILE", tmp_path / "node.lock")
    layout = realnode.NodeLayout(tmp_path / "node", tmp_path / "cache", tmp_path / "bin", run=tmp_path / "run")
    layout.run.mkdir()
    layout.host_record.write_text(json.dumps({"stateDir": "/another/cluster"}))
    with pytest.raises(DevClusterError, match="no longer the one of"):
        realnode.NodeLock.for_start(tmp_path, layout)
    assert realnode.NodeLock.try_acquire() is not None  # and the lock was let go


def test_a_stopped_components_pid_reused_by_another_process_of_the_cluster_is_not_taken_for_it(tmp_path):
    for sub in ("components", "pids"):
        (tmp_path / sub).mkdir()
    # Any process of the cluster carries its marker (a shim, say) and may get a stopped component's pid.
    other = processes.start("kwok", ["sleep", "300"], tmp_path)
    try:
        assert processes.running(tmp_path, ["kwok"]) == {"kwok": other.pid}
        processes.pidfile(tmp_path, "kube-scheduler").write_text(f"{other.pid} 1\n")  # started at tick 1
        assert processes.running(tmp_path, ["kube-scheduler"]) == {}
    finally:
        other.kill()
        other.wait()


def test_a_process_whose_main_thread_exited_first_counts_as_alive_until_its_last_thread_is_gone(tmp_path):
    # Its leader shows as a zombie while another thread still holds its socket: a restart binding
    # that port would fail ("address already in use") if stop returned then.
    code = ("import ctypes, sys, threading, time; open(sys.argv[1], 'w').write('1'); "
            "threading.Thread(target=time.sleep, args=(300,)).start(); ctypes.CDLL(None).pthread_exit(None)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ready")])
    try:
        _wait_for_file(tmp_path / "ready")
        deadline = time.monotonic() + 10
        while processes.read_proc(proc.pid, "stat").decode().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the main thread never exited"
            time.sleep(0.02)
        assert processes.alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not processes.alive(proc.pid)


def test_kueue_runs_on_loopback_with_only_the_webhooks_it_serves(tmp_path):
    manifests = [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
         "metadata": {"name": "mutating-webhook-configuration"},
         "webhooks": [
             {"name": "mjob.kb.io", "clientConfig": {"service": {"name": "webhook-service", "namespace": "system",
                                                                 "path": "/mutate-batch-v1-job"}},
              "rules": [{"apiGroups": ["batch"], "resources": ["jobs"]}], "failurePolicy": "Fail"},
             # Not enabled here: a Fail webhook nobody serves would refuse every pod in the cluster.
             {"name": "mpod.kb.io", "clientConfig": {"service": {"name": "webhook-service", "namespace": "system",
                                                                 "path": "/mutate--v1-pod"}},
              "rules": [{"apiGroups": [""], "resources": ["pods"]}], "failurePolicy": "Fail"}]},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
         "metadata": {"name": "validating-webhook-configuration"},
         "webhooks": [{"name": "vdeploy.kb.io", "clientConfig": {"service": {"path": "/validate-apps-v1-deployment"}},
                       "rules": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]},
    ]
    hooks = kueue.loopback_webhooks(manifests, 9443, b"CA")
    assert [h["metadata"]["name"] for h in hooks] == ["kueue-mutating-webhook-configuration"]
    assert hooks[0]["webhooks"] == [{**manifests[0]["webhooks"][0], "clientConfig": {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": "Q0E="}}]
    assert manifests[0]["webhooks"][0]["clientConfig"]["service"]  # the input is left alone
    config = kueue.configuration({"kueue-webhook": 9443, "kueue-health": 9444}, tmp_path)
    assert config["integrations"]["frameworks"] == ["batch/job"]
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert config["internalCertManagement"] == {"enable": False} and not config["manageJobsWithoutQueueName"]
