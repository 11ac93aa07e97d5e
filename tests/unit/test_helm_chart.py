"""The Helm chart: lints, renders valid Kubernetes objects, rejects bad values, grants least privilege.

Needs the pinned `helm` and `kubeconform` binaries that scripts/k8s-bin.sh builds (found through
`sft_devcluster.ensure_binaries`, or SFT_K8S_BIN). Without them the tests fail and say why.

kubeconform's default schema location is on the internet. Offline, its schemas are generated here
from the OpenAPI document of the Kubernetes release the binaries are built from
(`k8s.io/kubernetes@<version>/api/openapi-spec/swagger.json`, in the Go module cache that
k8s-bin.sh fills), strict: every object schema gets `additionalProperties: false`, as in
kubeconform's own `-strict` schema set. The cert-manager and prometheus-operator kinds
(Certificate, Issuer, ServiceMonitor, PrometheusRule) have no schema source on this machine,
so kubeconform skips them and `test_optional_kinds_fit_the_chart` checks what a user would notice:
they point at the Secret, Service port and metrics the chart really has.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from sft_operator.api.crd import CRD_FILE, crd_yaml

from .helpers import ROOT

CHART = ROOT / "helm" / "sft-operator"
RELEASE, NAMESPACE = "sft", "sft-system"
FULLNAME = "sft-sft-operator"
SKIPPED_KINDS = ("Certificate", "Issuer", "ServiceMonitor", "PrometheusRule")  # no offline CRD schemas

EVERYTHING = {
    "watchNamespaces": ["team-a", "team-b"],
    "tls": {"certManager": {"enabled": True}},
    "prometheus": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                   "rules": {"enabled": True}},
    "grafana": {"dashboard": {"enabled": True, "namespace": "monitoring"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {"extraEnv": [{"name": "SFT_POD_START_GRACE_SECONDS", "value": "600"}]},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "guardrails": {"allowedImagePrefixes": ["registry.corp.example/ml/"], "maxGpusPerJob": 16,
                   "gpusPerNamespace": {"team-a": 16}, "namespaceSelector": {"matchLabels": {"gpu": "yes"}}},
}


# ---------------------------------------------------------------- tools


@cache
def bin_dir() -> Path:
    import sft_devcluster as devcluster

    try:
        path = devcluster.ensure_binaries()
    except devcluster.DevClusterError as exc:
        pytest.fail(f"helm/kubeconform are needed (scripts/k8s-bin.sh): {exc}", pytrace=False)
    for tool in ("helm", "kubeconform"):
        if not (path / tool).is_file():
            pytest.fail(f"{path / tool} is missing; run scripts/k8s-bin.sh", pytrace=False)
    return path


def k8s_version() -> str:
    """The Kubernetes release of the pinned binaries: the bin dir is .../k8s-v1.36.3/bin."""
    match = re.search(r"k8s-(v\d+\.\d+\.\d+)", str(bin_dir()))
    assert match, f"cannot tell the Kubernetes version from {bin_dir()}"
    return match.group(1)


def helm(*args: str, values: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(bin_dir() / "helm"), *args]
    if args[0] in ("template", "lint"):
        # A `go install`ed helm assumes Kubernetes v1.20 offline; say which one we target.
        cmd += ["--kube-version", k8s_version().lstrip("v")]
    proc = subprocess.run(cmd + (["-f", "-"] if values is not None else []), input=json.dumps(values or {}),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(values: dict | None = None, *extra: str) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra, values=values).stdout


def objects(values: dict | None = None) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(values)) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# ---------------------------------------------------------------- offline kubeconform schemas


def _swagger() -> dict:
    version = k8s_version()
    env = {**os.environ, "GOFLAGS": "", "GOTOOLCHAIN": "local"}
    try:
        proc = subprocess.run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
                              capture_output=True, text=True, cwd=bin_dir(), env=env)
    except FileNotFoundError:
        pytest.fail("go is needed to locate k8s.io/kubernetes in the module cache (scripts/k8s-bin.sh needs it too)",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"k8s.io/kubernetes@{version} is not in the Go module cache (k8s-bin.sh puts it there): "
                    f"{proc.stderr or proc.stdout}", pytrace=False)
    path = Path(json.loads(proc.stdout)["Dir"]) / "api" / "openapi-spec" / "swagger.json"
    return json.loads(path.read_text())


def _strict(node: Any) -> Any:
    """kubeconform's `-strict` schema flavour: objects with properties allow nothing else."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("format") == "int-or-string":
        return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory) -> Path:
    """`<dir>/<group>/<kind>-<version>.json` for every kind of the Kubernetes release."""
    definitions = _swagger()["definitions"]
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
        "oneOf": [{"type": "string"}, {"type": "number"}]}
    out = tmp_path_factory.mktemp("kubeconform-schemas")
    for definition in definitions.values():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if gvk["kind"].endswith("List") or gvk["version"] == "__internal":
                continue
            closure, todo = {}, _refs(definition)
            while todo:
                ref = todo.pop()
                if ref not in closure:
                    closure[ref] = _strict(definitions[ref])
                    todo |= _refs(definitions[ref])
            schema = {**_strict(definition), "definitions": closure}
            group = gvk["group"] or gvk["version"]  # kubeconform's {{ .Group }} for core is "v1"
            path = out / group / f"{gvk['kind'].lower()}-{gvk['version']}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(schema))
    return out


def kubeconform(manifests: str, schema_dir: Path, skip: tuple[str, ...] = ()) -> str:
    location = f"{schema_dir}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}-{{{{ .ResourceAPIVersion }}}}.json"
    cmd = [str(bin_dir() / "kubeconform"), "-strict", "-summary", "-output", "text",
           "-schema-location", location]
    if skip:
        cmd += ["-skip", ",".join(skip)]
    proc = subprocess.run(cmd, input=manifests, capture_output=True, text=True)
    assert proc.returncode == 0, f"kubeconform rejected the chart's output:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


# ---------------------------------------------------------------- tests


def test_chart_crd_is_the_generated_crd():
    chart_crd = (CHART / "crds" / CRD_FILE).read_text()
    assert chart_crd == crd_yaml(), (
        f"helm/sft-operator/crds/{CRD_FILE} is stale: run `sftctl crd -o helm/sft-operator/crds/{CRD_FILE}`")


@pytest.mark.parametrize("values", [None, EVERYTHING], ids=["defaults", "everything"])
def test_helm_lint(values):
    proc = helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, values=values, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_render_is_strictly_valid(schema_dir):
    manifests = render(None, "--include-crds")
    summary = kubeconform(manifests, schema_dir)
    assert "Invalid: 0, Errors: 0, Skipped: 0" in summary, summary
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(manifests) if d)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "Secret", "ClusterRole",
                            "ClusterRoleBinding", "Service", "Deployment", "NetworkPolicy",
                            "ConfigMap", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])


def test_everything_enabled_render_is_strictly_valid(schema_dir):
    manifests = render(EVERYTHING, "--include-crds")
    summary = kubeconform(manifests, schema_dir, skip=SKIPPED_KINDS)
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    skipped = sum(d["kind"] in SKIPPED_KINDS for d in docs)
    assert f"Invalid: 0, Errors: 0, Skipped: {skipped}" in summary, summary
    assert {d["kind"] for d in docs} >= {"Role", "RoleBinding", "ConfigMap", "ResourceQuota", *SKIPPED_KINDS}


def test_kubeconform_catches_a_bad_manifest(schema_dir):
    """The offline schemas are strict: a misspelled field in a Deployment fails."""
    docs = objects()
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        kubeconform(yaml.safe_dump(deployment), schema_dir)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "/replicaCount': value must be 1"),
        ({"imag": {"tag": "1.0"}}, "additional properties 'imag' not allowed"),
        ({"prometheus": {"serviceMonitor": {"enable": True}}}, "additional properties 'enable' not allowed"),
        ({"replicaCount": "1"}, "/replicaCount': got string, want integer"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces': got string, want array"),
        ({"service": {"progressPort": 70000}}, "/service/progressPort'"),
        ({"watchNamespaces": ["team-*"]}, "/watchNamespaces/0'"),
    ],
    ids=["replicas-2", "typo-top-level", "typo-nested", "wrong-type", "wrong-type-list", "port-range", "glob"],
)
def test_values_schema_rejects(values, message):
    proc = helm("template", RELEASE, str(CHART), values=values, check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert message in proc.stderr, proc.stderr


def test_tls_choices_are_exclusive():
    proc = helm("template", RELEASE, str(CHART), values={
        "tls": {"existingSecret": "mine", "certManager": {"enabled": True}}}, check=False)
    assert proc.returncode != 0 and "not both" in proc.stderr


def test_deployment_is_one_restricted_replica():
    deployment = one(objects(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["tcpSocket"] == {"port": "progress"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {
        "tls": f"{FULLNAME}-tls"}


def test_operator_env_is_what_settings_read():
    """Every SFT_* variable the chart sets is one the operator reads, and the ports agree."""
    settings = (ROOT / "operator" / "sft_operator" / "runtime" / "settings.py").read_text()
    read = set(re.findall(r'env\("(SFT_[A-Z_]+)"', settings))
    container = one(objects(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= read, f"the chart sets variables the operator ignores: {set(env) - read}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": int(env["SFT_METRICS_PORT"]), "health": int(env["SFT_HEALTH_PORT"]),
                     "progress": int(env["SFT_PROGRESS_PORT"])}
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
    for var, key in (("SFT_PROGRESS_TLS_CERT", "tls.crt"), ("SFT_PROGRESS_TLS_KEY", "tls.key"),
                     ("SFT_PROGRESS_CA_FILE", "ca.crt")):
        assert env[var] == f"{mount}/{key}"


def test_progress_url_reaches_the_service_and_the_certificate_covers_it(tmp_path):
    docs = objects()
    env = {e["name"]: e.get("value")
           for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    service = one(docs, "Service")
    host, port = re.fullmatch(r"https://([^:/]+):(\d+)", env["SFT_PROGRESS_URL"]).groups()
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    progress = next(p for p in service["spec"]["ports"] if p["name"] == "progress")
    assert int(port) == progress["port"] and progress["targetPort"] == "progress"

    import base64

    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    pem = tmp_path / "tls.crt"
    pem.write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    cert = ssl._ssl._test_decode_cert(str(pem))  # stdlib's PEM decoder; no extra dependency
    sans = {value for kind, value in cert["subjectAltName"] if kind == "DNS"}
    assert host in sans


def _rules(doc: dict) -> list[dict]:
    return doc.get("rules", [])


@pytest.mark.parametrize("values", [None, EVERYTHING], ids=["cluster-wide", "namespaced"])
def test_rbac_is_least_privilege(values):
    docs = objects(values)
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    granted = {(d["kind"], d["metadata"].get("namespace"), group, resource, verb)
               for d in roles for rule in _rules(d) for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert not [g for g in granted if "*" in g], "wildcards in RBAC"
    resources = {(g[2], g[3]) for g in granted}
    for forbidden in [("", "secrets"), ("", "pods/exec"), ("rbac.authorization.k8s.io", "roles"),
                      ("rbac.authorization.k8s.io", "clusterroles"), ("rbac.authorization.k8s.io", "rolebindings")]:
        assert forbidden not in resources
    assert not [g for g in granted if g[3] == "pods" and g[4] not in ("get", "list", "watch")]
    cluster = {g[2:] for g in granted if g[0] == "ClusterRole"}
    if values is None:
        assert ("sft.dev", "sftjobs", "watch") in cluster and ("batch", "jobs", "create") in cluster
        assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    else:
        # Namespaced mode: only what is cluster-scoped stays in the ClusterRole.
        assert cluster == {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
            ("authentication.k8s.io", "tokenreviews", "create"), ("", "namespaces", "list"), ("", "namespaces", "watch")}
        for ns in values["watchNamespaces"]:
            role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == ns)
            assert {(g, r) for rule in _rules(role) for g in rule["apiGroups"] for r in rule["resources"]} >= {
                ("sft.dev", "sftjobs"), ("sft.dev", "sftjobs/status"), ("batch", "jobs")}
            binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == ns)
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_every_object_carries_the_recommended_labels():
    for doc in objects(EVERYTHING):
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{doc['kind']} {doc['metadata']['name']} lacks {key}"


def test_optional_kinds_fit_the_chart():
    """What kubeconform skips: the ServiceMonitor scrapes the Service's metrics port; the
    cert-manager Certificate writes the Secret the Deployment mounts, for the progress host."""
    docs = objects(EVERYTHING)
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"

    deployment = one(docs, "Deployment")
    mounted = {v["secret"]["secretName"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    serving = one(docs, "Certificate", f"{FULLNAME}-tls")
    assert {serving["spec"]["secretName"]} == mounted
    assert f"{FULLNAME}.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    ca_issuer = one(docs, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca_cert = one(docs, "Certificate", f"{FULLNAME}-ca")
    assert ca_cert["spec"]["isCA"] is True and ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert not [d for d in docs if d["kind"] == "Secret"], "cert-manager mode must not also render a Secret"

    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"SFTJobFailed", "SFTJobProgressStalled", "SFTJobPendingTooLong"} <= set(alerts)
    for alert in alerts.values():
        assert alert["expr"].strip() and alert["labels"]["severity"] and alert["annotations"]["summary"]

    dashboard = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


METRIC = re.compile(r"\b(sft_[a-z0-9_]+)")


def _exported_metric_names() -> set[str]:
    from sft_operator.runtime.metrics import metric_names

    return metric_names()


def test_dashboard_shows_what_a_platform_team_asks_for_with_exported_metrics():
    docs = objects(EVERYTHING)
    dashboard = json.loads(one(docs, "ConfigMap", f"{FULLNAME}-dashboard")["data"]["sft-operator.json"])
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    wanted = {
        "Training loss": "sft_job_train_loss",
        "Eval loss": "sft_job_eval_loss",
        "Progress": "sft_job_progress_ratio",
        "Tokens per second": "sft_job_tokens_per_second",
        "Queue time (creation to running)": "sft_job_time_to_running_seconds_bucket",
        "Failures by reason": "sft_jobs_finished_total",
        "GPU-hours by namespace": "sft_gpu_seconds_total",
    }
    for title, metric in wanted.items():
        assert metric in METRIC.findall(exprs.get(title, "")), f"panel {title!r} should chart {metric}"
    used = set(METRIC.findall(json.dumps(dashboard)))
    unknown = used - _exported_metric_names()
    assert not unknown, f"the dashboard queries metrics the operator does not export: {sorted(unknown)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_reference_exported_metrics():
    rule = one(objects(EVERYTHING), "PrometheusRule")
    used = {name for g in rule["spec"]["groups"] for r in g["rules"] for name in METRIC.findall(r["expr"])}
    assert used, "no metric in the alert expressions"
    unknown = used - _exported_metric_names()
    assert not unknown, f"alerts query metrics the operator does not export: {sorted(unknown)}"


def test_every_value_is_documented():
    """Each key in values.yaml has a `# --` comment, itself or on the block it belongs to
    (e.g. `resources`), so `values.yaml` reads as the chart's reference."""
    undocumented, blocks = [], []  # blocks: (indent, documented) of the enclosing keys
    comments: list[str] = []  # the comment lines right above the current line
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if match:
            indent = len(match.group(1))
            while blocks and blocks[-1][0] >= indent:
                blocks.pop()
            documented = any(c.startswith("# --") for c in comments)
            is_parent = stripped.endswith(":")
            if not (documented or is_parent or any(doc for _, doc in blocks)):
                undocumented.append(f"{number}: {stripped}")
            blocks.append((indent, documented))
        comments = []
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def test_schema_closes_every_object_with_known_keys():
    """`additionalProperties: false` wherever the schema lists properties, so no level accepts a typo."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path or "/")
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}/{name}")
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{path}/{key}")
        for key in ("anyOf", "oneOf", "allOf"):
            for i, sub in enumerate(node.get(key, [])):
                walk(sub, f"{path}/{key}/{i}")

    walk(schema, "")
    assert not open_objects, f"objects that accept unknown keys: {open_objects}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}, "values.yaml and the schema list different keys"


def test_existing_secret_and_service_account_are_used_as_given():
    docs = objects({"tls": {"existingSecret": "corp-tls"}, "serviceAccount": {"create": False, "name": "ops-sa"}})
    assert not [d for d in docs if d["kind"] in ("Secret", "ServiceAccount", "Certificate")]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops-sa"
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {"corp-tls"}
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "ops-sa"
    proc = helm("template", RELEASE, str(CHART), values={"serviceAccount": {"create": False}}, check=False)
    assert proc.returncode != 0 and "serviceAccount.name is required" in proc.stderr


def test_image_digest_pins_the_operator_image():
    digest = "sha256:" + "a" * 64
    container = one(objects({"image": {"digest": digest}}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/sft-operator/operator@{digest}"


# ---------------------------------------------------------------- RBAC == what the code calls

# The operator and sftctl have one client, sft_operator.runtime.client, whose PERMISSIONS table lists every
# call the operator can make (it refuses anything else; sftctl reads with its own table); no module may reach
# the API through the kubernetes library.
LIBRARY_IMPORT = re.compile(r"^\s*(from kubernetes\b|import kubernetes\b)", re.MULTILINE)
# What Kopf itself does (kopf docs, "Deployment" / RBAC): list+watch every watched resource; scan
# CRDs at start-up; in namespaced mode also list+watch namespaces. Event watchers patch nothing.
KOPF_EVENT_HANDLER = re.compile(r'@kopf\.on\.(event|create|update|resume|delete)\(\s*(GROUP|"[^"]*")\s*,\s*(?:VERSION|"[^"]*")\s*,\s*(PLURAL|"[^"]*")')


def _needed_permissions(namespaced: bool) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the operator's own code and Kopf use (sftctl's reads are the user's, not the chart's)."""
    from sft_operator.api import GROUP, PLURAL
    from sft_operator.runtime.client import OWNER_REFERENCE_PERMISSIONS, PERMISSIONS

    needed = {(group, resource, verb) for verb, group, resource in PERMISSIONS | OWNER_REFERENCE_PERMISSIONS}
    package = ROOT / "operator" / "sft_operator"
    sources = list(package.rglob("*.py"))
    assert any(p.parent == package / "cli" for p in sources)  # sftctl too
    for path in sources:
        text = path.read_text()
        assert not LIBRARY_IMPORT.search(text), f"{path.name} uses a client other than client.py"
        for kind, group, plural in KOPF_EVENT_HANDLER.findall(text):
            group = GROUP if group == "GROUP" else group.strip('"')
            plural = PLURAL if plural == "PLURAL" else plural.strip('"')
            needed |= {(group, plural, "list"), (group, plural, "watch")}
            if kind != "event":  # change handlers store their progress on the object
                needed.add((group, plural, "patch"))
    needed |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    if namespaced:
        needed |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    return needed


@pytest.mark.parametrize("values", [None, EVERYTHING], ids=["cluster-wide", "namespaced"])
def test_rbac_grants_exactly_what_the_operator_calls(values):
    needed = _needed_permissions(namespaced=values is not None)
    assert ("", "events", "list") in needed and ("sft.dev", "sftjobs", "delete") in needed  # the table is read
    assert ("", "pods", "watch") in needed and ("sft.dev", "sftjobs/finalizers", "update") in needed  # and the watches
    docs = objects(values)
    per_namespace = {}
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            scope = doc["metadata"].get("namespace", "*")
            per_namespace.setdefault(scope, set()).update(
                (g, r, v) for rule in _rules(doc) for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"])
    cluster = per_namespace.pop("*")
    for scope in (values or {}).get("watchNamespaces", [None]):
        granted = cluster | per_namespace.get(scope, set())
        assert not needed - granted, f"missing in {scope or 'the ClusterRole'}: {sorted(needed - granted)}"
        assert not granted - needed, f"granted but never used ({scope or 'cluster'}): {sorted(granted - needed)}"


def _trainer_pod_labels() -> dict[str, str]:
    """The labels of a trainer pod as the operator renders it."""
    from sft_operator.core.render import render_children

    from .helpers import manifest

    job = next(c for c in render_children(manifest()) if c["kind"] == "Job")
    return job["spec"]["template"]["metadata"]["labels"]


def _admits(rule: dict, labels: dict[str, str], namespace: str) -> bool:
    """Whether one ingress rule's `from` admits a pod with these labels in this namespace."""
    if not rule.get("from"):
        return True
    for peer in rule["from"]:
        pods = peer.get("podSelector", {}).get("matchLabels", {})
        spaces = peer.get("namespaceSelector")
        in_space = spaces == {} or any(
            e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "In" and namespace in e["values"]
            for e in (spaces or {}).get("matchExpressions", []))
        if spaces is not None and in_space and pods.items() <= labels.items():
            return True
    return False


def _rules_for(policy: dict, port: str) -> list[dict]:
    return [r for r in policy["spec"]["ingress"] if port in [p["port"] for p in r["ports"]]]


def test_network_policy_admits_progress_only_from_trainer_pods_and_metrics_from_the_chosen_sources():
    docs = objects()
    policy = one(docs, "NetworkPolicy")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # the operator still reaches the API server
    trainer = _trainer_pod_labels()
    (progress,) = _rules_for(policy, "progress")
    assert _admits(progress, trainer, "any-team")
    assert not _admits(progress, {"app": "curl"}, "any-team")
    assert not _admits(progress, {k: v for k, v in trainer.items() if k != "app.kubernetes.io/name"}, "any-team")
    (metrics,) = _rules_for(policy, "metrics")
    assert _admits(metrics, {"app": "prometheus"}, "monitoring")  # default: any scraper
    container_ports = {p["name"] for p in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"progress", "metrics"} <= container_ports

    prometheus = [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    narrowed = one(objects({"watchNamespaces": ["team-a"], "networkPolicy": {"metricsFrom": prometheus}}),
                   "NetworkPolicy")
    (metrics,) = _rules_for(narrowed, "metrics")
    assert _admits(metrics, {"app.kubernetes.io/name": "prometheus"}, "monitoring")
    assert not _admits(metrics, {"app.kubernetes.io/name": "prometheus"}, "team-a")
    (progress,) = _rules_for(narrowed, "progress")
    assert _admits(progress, trainer, "team-a") and not _admits(progress, trainer, "team-b")  # watched ones only

    assert not [d for d in objects({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]


def test_the_chart_promises_the_certificate_reload_the_operator_does():
    """A renewed serving certificate is picked up within --reload-seconds, without a restart
    (tests/unit/test_progress_endpoint.py serves one); values.yaml and the schema say so to the person
    choosing `renewBefore`."""
    from sft_operator.runtime.settings import OperatorSettings

    seconds = int(OperatorSettings().reload_seconds)
    lines = (CHART / "values.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("renewBefore:"))
    comment = " ".join(line.strip().lstrip("#").strip() for line in lines[at - 4:at] if line.strip().startswith("#"))
    schema = json.loads((CHART / "values.schema.json").read_text())
    described = schema["properties"]["tls"]["properties"]["certManager"]["properties"]["renewBefore"]["description"]
    for text in (comment, described):
        assert f"every {seconds} s" in text and "without a restart" in text, text
    assert "next restart" not in (ROOT / "docs" / "helm.md").read_text()
