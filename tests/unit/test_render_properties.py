"""Property tests over generated valid specs: rendered children are safe, valid and deterministic."""

import copy
import json
import re
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_operator.core.render import render_children

import builders

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

names = st.from_regex(r"[a-z]([-a-z0-9]{0,46}[a-z0-9])?", fullmatch=True)
claims = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
sources = st.one_of(
    claims.map(lambda c: f"pvc://{c}/data.jsonl"),
    st.sampled_from(["org/model", "/data/train.jsonl", "./local/path"]),
)

specs = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries({"source": sources}),
        "dataset": st.fixed_dictionaries(
            {"train": st.fixed_dictionaries({"source": sources}), "packing": st.booleans()},
            optional={"general": st.fixed_dictionaries({"source": sources, "mixRatio": st.floats(0, 0.9)})},
        ),
        "output": st.fixed_dictionaries({"destination": sources}),
        "hyperparameters": st.fixed_dictionaries(
            {
                "learningRate": st.floats(1e-7, 1.0),
                "numEpochs": st.integers(1, 10),
                "perDeviceBatchSize": st.integers(1, 64),
                "precision": st.sampled_from(["auto", "bf16", "fp16", "fp32"]),
            }
        ),
        "resources": st.fixed_dictionaries(
            {"nodes": st.integers(1, 256), "gpusPerNode": st.integers(0, 16)},
            optional={"cpu": st.sampled_from(["1", "500m", "32"]), "memory": st.sampled_from(["1Gi", "512Mi"])},
        ),
        "runPolicy": st.fixed_dictionaries(
            {"suspend": st.booleans(), "backoffLimit": st.integers(0, 100)},
            optional={"activeDeadlineSeconds": st.integers(1, 10**6)},
        ),
        "scheduling": st.fixed_dictionaries(
            {}, optional={"queueName": claims, "nodeSelector": st.dictionaries(claims, claims, max_size=3)}
        ),
    },
    optional={"peft": st.fixed_dictionaries({"rank": st.integers(1, 256)}), "freezeLayers": st.integers(0, 80)},
)


sftjob = partial(builders.sftjob, namespace="ns")


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names, specs)
def test_children_never_hold_privileged_settings(name, spec):
    children = render_children(sftjob(name=name, spec=spec))
    job = next(c for c in children if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not container.get("ports") or all("hostPort" not in p for p in container["ports"])
    for node in _walk(children):
        assert "hostPath" not in node
        assert "add" not in node.get("capabilities", {})


@settings(max_examples=150, deadline=None)
@given(names, specs)
def test_children_names_are_valid_for_any_valid_sftjob_name(name, spec):
    for child in render_children(sftjob(name=name, spec=spec)):
        child_name = child["metadata"]["name"]
        assert len(child_name) <= 63 and DNS_1123_SUBDOMAIN.match(child_name)
        if child["kind"] in ("Service", "Job"):
            assert DNS_1035.match(child_name)  # Services need RFC 1035; Job names become pod label values
        for value in child["metadata"]["labels"].values():
            assert len(value) <= 63
    job = render_children(sftjob(name=name, spec=spec))[-1]
    nodes = spec["resources"]["nodes"]
    assert len(f"{job['metadata']['name']}-{nodes - 1}") <= 63  # indexed pod hostnames


@settings(max_examples=100, deadline=None)
@given(names, specs)
def test_rendering_is_deterministic(name, spec):
    first = json.dumps(render_children(sftjob(name=name, spec=spec)), sort_keys=True)
    second = json.dumps(render_children(sftjob(name=name, spec=copy.deepcopy(spec))), sort_keys=True)
    assert first == second
