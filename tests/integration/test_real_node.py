"""The dev cluster's real node `sft-node-0`: a kubelet with containerd, runc, a CNI bridge,
kube-proxy and CoreDNS, running pods from an image built here (Debian's busybox-static)
under Pod Security "restricted"."""

from __future__ import annotations

import ipaddress
import socket
import ssl

import pytest
from kubernetes import client

import sft_devcluster as devcluster
from sft_devcluster import node as realnode

from .host_snapshot import differences, host_snapshot

pytestmark = pytest.mark.cluster

NODE = realnode.NODE_NAME
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
# Debian's busybox wget has no working -T (it crashes): bound it with timeout instead.
WGET = "timeout 10 wget -q -O -"


@pytest.fixture(scope="module")
def busybox() -> str:
    """The tests' image (scripts/node-bin.sh), imported into the node by `up`."""
    return realnode.archive_reference(devcluster.state.node_cache_dir() / "images" / "busybox.tar")


def pod(name: str, image: str, script: str, container: dict | None = None, **spec) -> dict:
    """A pod that passes Pod Security "restricted" and runs `sh -c script`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": POD_SECURITY,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script], "securityContext": CONTAINER_SECURITY,
                            **(container or {})}],
            **spec,
        },
    }


def run_to_end(cluster, namespace: str, body: dict, timeout: float = 90):
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(namespace, body)
    name = body["metadata"]["name"]

    def finished():
        p = core.read_namespaced_pod(name, namespace)
        return p if p.status.phase in ("Succeeded", "Failed") else None

    return cluster.wait_for(finished, timeout, f"pod {name} to finish")


def test_real_node_is_ready_next_to_kwok_nodes_and_advertises_gpus(real_node):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(real_node.api).list_node().items}
    assert set(nodes) == {NODE, "kwok-gpu-0"}
    node = nodes[NODE]
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert node.status.allocatable[realnode.GPU_RESOURCE] == str(realnode.DEFAULT_GPUS)
    assert node.metadata.labels["sft.dev/real-node"] == "true"
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [realnode.NODE_IP]
    assert node.status.node_info.kubelet_version == "v1.36.3"
    assert node.status.node_info.container_runtime_version.startswith("containerd://2.3")
    # Next to a real node the kwok nodes take only pods that tolerate them.
    assert [t.key for t in nodes["kwok-gpu-0"].spec.taints] == ["sft.dev/kwok-node"]
    table = real_node.kubectl("get", "nodes").stdout
    assert f"{NODE}   Ready" in table and "kwok-gpu-0" in table


def test_restricted_pod_runs_as_non_root_with_read_only_root_and_kubectl_logs_shows_it(
        real_node, node_namespace, busybox):
    script = ("id -u; grep -E '^(CapEff|Seccomp):' /proc/self/status; "
              "touch /probe 2>&1 || true; echo done")
    done = run_to_end(real_node, node_namespace, pod("restricted", busybox, script))
    logs = real_node.kubectl("logs", "-n", node_namespace, "restricted").stdout
    assert done.status.phase == "Succeeded", logs
    assert done.spec.node_name == NODE
    assert ipaddress.ip_address(done.status.pod_ip) in ipaddress.ip_network(realnode.POD_CIDR)
    lines = logs.splitlines()
    assert lines[0] == "65534"  # runAsUser, not root
    assert "CapEff:\t0000000000000000" in lines  # every capability dropped
    assert "Seccomp:\t2" in lines  # RuntimeDefault: a seccomp filter is on
    assert "Read-only file system" in logs and lines[-1] == "done"
    wide = real_node.kubectl("get", "pods", "-n", node_namespace, "-o", "wide").stdout
    assert done.status.pod_ip in wide and NODE in wide


def test_pods_reach_each_other_over_the_bridge_and_through_a_cluster_ip_service(real_node, node_namespace, busybox):
    core = client.CoreV1Api(real_node.api)
    server = pod("web", busybox, "mkdir /tmp/www && echo hello-from-web > /tmp/www/index.html && "
                                 "exec httpd -f -p 8080 -h /tmp/www",
                 container={"ports": [{"containerPort": 8080}],
                            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                 volumes=[{"name": "tmp", "emptyDir": {}}])
    server["spec"]["restartPolicy"] = "Always"
    core.create_namespaced_pod(node_namespace, server)
    core.create_namespaced_service(node_namespace, {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    web = real_node.wait_for(lambda: (p := core.read_namespaced_pod("web", node_namespace)).status.pod_ip
                             and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions) and p,
                             60, "pod web Ready")
    cluster_ip = core.read_namespaced_service("web", node_namespace).spec.cluster_ip
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(realnode.SERVICE_CIDR)
    script = (f"{WGET} http://{web.status.pod_ip}:8080/ && {WGET} http://{cluster_ip}/ && {WGET} http://web/")
    done = run_to_end(real_node, node_namespace, pod("client", busybox, script))
    logs = real_node.pod_log(node_namespace, "client")
    assert done.status.phase == "Succeeded", logs
    # Pod IP over the bridge, then the ClusterIP through kube-proxy, then the name through CoreDNS.
    assert logs.splitlines() == ["hello-from-web"] * 3


def test_pod_network_stays_on_this_machine(real_node, node_namespace, busybox):
    # The host's default gateway: what a pod would need to reach anything beyond this machine.
    with open("/proc/net/route") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    gateway = next((socket.inet_ntoa(bytes.fromhex(r[2])[::-1]) for r in rows if r[1] == "00000000"), "198.51.100.1")
    script = f"ip route; {WGET} http://{gateway}/ 2>&1; echo exit=$?"
    done = run_to_end(real_node, node_namespace, pod("isolated", busybox, script))
    logs = real_node.pod_log(node_namespace, "isolated")
    assert done.status.phase == "Succeeded", logs
    routes = [line for line in logs.splitlines() if "dev eth0" in line]
    assert not any(r.startswith("default") for r in routes), routes
    assert {r.split()[0] for r in routes} == {realnode.POD_CIDR, realnode.SERVICE_CIDR}
    assert "exit=0" not in logs and "unreachable" in logs.lower()
    rules = "\n".join(realnode.iptables_save("iptables", "mangle") + realnode.iptables_save("iptables", "raw"))
    assert rules.count(f'--comment {realnode.RULE_TAG} -j DROP') == len(realnode.netfilter_rules())
    # Forwarding is on for the bridge alone; the host's global setting is what it was.
    before = dict(s.split("=", 1) for s in real_node.host_before["sysctls"])
    with open("/proc/sys/net/ipv4/conf/all/forwarding") as f:
        assert f.read().strip() == before["net.ipv4.conf.all.forwarding"]
    with open(f"/proc/sys/net/ipv4/conf/{realnode.BRIDGE}/forwarding") as f:
        assert f.read().strip() == "1"


def test_indexed_job_pods_resolve_each_other_through_the_headless_service(real_node, node_namespace, busybox):
    core, batch = client.CoreV1Api(real_node.api), client.BatchV1Api(real_node.api)
    core.create_namespaced_service(node_namespace, {
        "metadata": {"name": "rdzv"},
        "spec": {"clusterIP": "None", "selector": {"job-name": "rdzv"}, "publishNotReadyAddresses": True,
                 "ports": [{"port": 29500}]}})
    # What torchrun does with --master-addr=<job>-0.<service>: reach the peer by its short
    # name (the resolver's search path), here over HTTP to a page that names the server.
    # A pod stays a while after reaching its peer, so that the peer can reach it too.
    script = ("mkdir /tmp/www && echo \"$(hostname) $(hostname -i)\" > /tmp/www/index.html && httpd -p 29500 -h /tmp/www "
              "&& peer=rdzv-$((1 - JOB_COMPLETION_INDEX)).rdzv && for i in $(seq 120); do "
              f"{WGET} http://$peer:29500/ && sleep 8 && exit 0; sleep 0.5; done; exit 1")
    template = pod("rdzv", busybox, script, container={"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                   subdomain="rdzv", volumes=[{"name": "tmp", "emptyDir": {}}])
    batch.create_namespaced_job(node_namespace, {
        "metadata": {"name": "rdzv"},
        "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                 "template": {"spec": template["spec"]}}})

    def complete():
        conditions = batch.read_namespaced_job("rdzv", node_namespace).status.conditions or []
        return next((c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None)

    outcome = real_node.wait_for(complete, 120, "Job rdzv to finish")
    pods = core.list_namespaced_pod(node_namespace, label_selector="job-name=rdzv").items
    by_index = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    logs = {i: real_node.pod_log(node_namespace, p.metadata.name) for i, p in by_index.items()}
    assert outcome == "Complete", logs
    # Each pod reached the other one, at the other one's pod IP (after "connection refused"
    # while the other one's server was starting).
    assert logs["0"].splitlines()[-1].split() == ["rdzv-1", by_index["1"].status.pod_ip]
    assert logs["1"].splitlines()[-1].split() == ["rdzv-0", by_index["0"].status.pod_ip]


def test_exit_code_and_termination_message_reach_the_jobs_pod_failure_policy(real_node, node_namespace, busybox):
    # What the operator reads from a failed trainer: its exit code, on which the Job's podFailurePolicy
    # fails the Job at once (no retry), and the one-line reason it wrote to /dev/termination-log
    # (writable on a read-only root: the kubelet mounts it).
    batch = client.BatchV1Api(real_node.api)
    template = pod("fails", busybox, "printf 'DataError: bad row 7' > /dev/termination-log; exit 65")
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [65]}}]}
    batch.create_namespaced_job(node_namespace, {"metadata": {"name": "fails"}, "spec": {
        "backoffLimit": 3, "podFailurePolicy": policy, "template": {"spec": template["spec"]}}})

    def failed():
        conditions = batch.read_namespaced_job("fails", node_namespace).status.conditions or []
        return next((c for c in conditions if c.type == "Failed" and c.status == "True"), None)

    assert real_node.wait_for(failed, 90, "Job fails to fail").reason == "PodFailurePolicy"
    (p,) = client.CoreV1Api(real_node.api).list_namespaced_pod(node_namespace, label_selector="job-name=fails").items
    state = p.status.container_statuses[0].state.terminated
    assert (state.exit_code, state.message) == (65, "DataError: bad row 7")


def test_pods_reach_the_api_server_as_kubernetes_default(real_node, node_namespace, busybox):
    # The Service's endpoint is the API server on the node's address (lease reconciler).
    endpoints = client.DiscoveryV1Api(real_node.api).list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=kubernetes").items
    assert [a for s in endpoints for e in s.endpoints for a in e.addresses] == [realnode.NODE_IP]
    # From a pod: the name resolves, kube-proxy forwards 443 to the API server (which answers
    # plain HTTP with its own complaint), and the pod's service-account token is there.
    # busybox's TLS can't talk to an ECDSA certificate, so the handshake is checked below.
    script = ("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 kubernetes.default.svc 443; echo; "
              "echo token=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)")
    done = run_to_end(real_node, node_namespace, pod("in-cluster", busybox, script))
    logs = real_node.pod_log(node_namespace, "in-cluster")
    assert done.status.phase == "Succeeded", logs
    assert "Client sent an HTTP request to an HTTPS server" in logs
    token = next(line.split("=", 1)[1] for line in logs.splitlines() if line.startswith("token="))
    review = client.AuthenticationV1Api(real_node.api).create_token_review({"spec": {"token": token}})
    assert review.status.authenticated and review.status.user.username == f"system:serviceaccount:{node_namespace}:default"
    # The certificate behind the Service is valid for the names in-cluster clients verify.
    ca = ssl.create_default_context(cafile=str(real_node.state_dir / "pki" / "ca.crt"))
    port = real_node.info.ports["apiserver"]
    for name in ("kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "10.96.0.1"):
        with socket.create_connection((realnode.NODE_IP, port), timeout=5) as raw:
            with ca.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version()


def test_memory_limit_ends_the_container_as_oomkilled(real_node, node_namespace, busybox):
    limits = {"limits": {"memory": "32Mi", "cpu": "500m"}, "requests": {"memory": "32Mi", "cpu": "100m"}}
    script = "a=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived"
    done = run_to_end(real_node, node_namespace, pod("hungry", busybox, script, container={"resources": limits}))
    state = done.status.container_statuses[0].state.terminated
    assert done.status.phase == "Failed"
    assert (state.reason, state.exit_code) == ("OOMKilled", 137)
    assert "survived" not in real_node.pod_log(node_namespace, "hungry")


def test_gpu_pod_schedules_on_the_real_node_and_runs_on_its_cpu(real_node, node_namespace, busybox):
    gpus = {"limits": {realnode.GPU_RESOURCE: "2"}}
    done = run_to_end(real_node, node_namespace,
                      pod("gpu", busybox, "ls /dev/nvidia* 2>/dev/null; echo cpu-only", container={"resources": gpus}))
    assert done.spec.node_name == NODE and done.status.phase == "Succeeded"
    assert real_node.pod_log(node_namespace, "gpu").strip() == "cpu-only"
    # More GPUs than the node advertises: Pending, and the scheduler says why.
    core = client.CoreV1Api(real_node.api)
    too_many = {"limits": {realnode.GPU_RESOURCE: str(realnode.DEFAULT_GPUS + 1)}}
    core.create_namespaced_pod(node_namespace, pod("greedy", busybox, "true", container={"resources": too_many}))
    message = real_node.wait_for(lambda: next((c.message for c in core.read_namespaced_pod(
        "greedy", node_namespace).status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None),
        30, "the scheduler's verdict")
    assert f"Insufficient {realnode.GPU_RESOURCE}" in message


def test_claims_on_local_volumes_are_writable_by_restricted_pods_and_land_on_the_host(
        real_node, node_namespace, busybox):
    core = client.CoreV1Api(real_node.api)
    for claim in devcluster.node_objects.DEFAULT_CLAIMS:  # what examples/*.yaml name, made by `up`
        got = core.read_namespaced_persistent_volume_claim(claim, devcluster.node_objects.VOLUMES_NAMESPACE)
        assert got.spec.storage_class_name == "sft-local"
    folder = devcluster.node_objects.create_volume(real_node.api, real_node.state_dir, node_namespace, "models")
    (folder / "seeded.txt").write_text("from the host\n")
    body = pod("writer", busybox, "cat /models/seeded.txt && echo from-the-pod > /models/out.txt && id -G",
               container={"volumeMounts": [{"name": "models", "mountPath": "/models"}]},
               volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}])
    body["spec"]["securityContext"] = {**POD_SECURITY, "fsGroup": 4242}
    done = run_to_end(real_node, node_namespace, body)
    logs = real_node.pod_log(node_namespace, "writer")
    assert done.status.phase == "Succeeded", logs
    assert "from the host" in logs and "4242" in logs.splitlines()[-1].split()  # fsGroup applied
    assert (folder / "out.txt").read_text() == "from-the-pod\n"


@pytest.mark.stops_real_node
def test_down_leaves_nothing_behind(real_node, busybox):
    # Something for down to clean: a finished pod, a running pod behind a Service (netfilter
    # rules, veths, mounts, cgroups, log links).
    core = client.CoreV1Api(real_node.api)
    core.create_namespace({"metadata": {"name": "leftovers"}})
    real_node.wait_for(lambda: core.read_namespaced_service_account("default", "leftovers"), 30, "ServiceAccount")
    run_to_end(real_node, "leftovers", pod("once", busybox, "echo ran"))
    core.create_namespaced_pod("leftovers", pod("sleeper", busybox, "sleep 600"))
    core.create_namespaced_service("leftovers", {
        "metadata": {"name": "sleeper"}, "spec": {"selector": {"app": "sleeper"}, "ports": [{"port": 80}]}})
    real_node.wait_for(lambda: core.read_namespaced_pod("sleeper", "leftovers").status.phase == "Running", 60,
                       "pod sleeper Running")
    devcluster.down(real_node.state_dir)
    assert differences(real_node.host_before, host_snapshot()) == {}
    lock = realnode.NodeLock.try_acquire()  # the machine's node is free again
    assert lock is not None
    lock.release()
