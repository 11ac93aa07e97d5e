"""The operator and trainer images, built here by scripts/build-images.sh (podman on a Debian base),
run the way a Pod Security "restricted" pod runs them: the image's non-root user, a read-only root,
no capabilities, no privilege escalation, /tmp as a scratch volume, no network.

The session builds (or reuses) both images before the first test (tests/conftest.py); if the build
fails, every test here fails with the build's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tomllib

import pytest
from packaging.requirements import Requirement

from container_images import ROOT, Image, podman, run_restricted
from sft_operator import __version__
from sft_operator.core.render import CONFIG_DIR, PVC_ROOT, TRAINER_UID, render_children

pytestmark = [pytest.mark.images, pytest.mark.slow]

OPERATOR_UID = 10001  # helm/sft-operator/values.yaml podSecurityContext.runAsUser


def in_image(image: Image, code: str) -> subprocess.CompletedProcess:
    return run_restricted(image, "-c", code, options=("--entrypoint=python",))


def installed(image: Image) -> dict[str, str]:
    """Distribution name (normalized) -> version, as pip in the image's venv sees them."""
    proc = run_restricted(image, "-m", "pip", "list", "--format=json", "--disable-pip-version-check",
                          options=("--entrypoint=python",))
    assert proc.returncode == 0, proc.stderr
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(proc.stdout)}


def test_operator_image_starts_as_its_non_root_user_on_a_read_only_root(images):
    help_ = run_restricted(images["operator"], "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--progress-url" in help_.stdout and "--namespace" in help_.stdout
    version = run_restricted(images["operator"], "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sft-operator {__version__}", version
    ids = in_image(images["operator"], "import os; print(os.getuid(), os.getgid())")
    assert ids.stdout.split() == [str(OPERATOR_UID)] * 2, ids


def test_operator_image_carries_neither_torch_nor_the_dev_cluster(images):
    probe = in_image(images["operator"], (
        "import importlib.util, pathlib, sft_operator\n"
        "print([m for m in ('torch', 'transformers', 'sft_devcluster') if importlib.util.find_spec(m)])\n"
        "print([str(p) for p in pathlib.Path('/opt').rglob('*devcluster*')])\n"
    ))
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == ["[]", "[]"], probe.stdout
    assert not {"torch", "transformers", "sft-devtools"} & installed(images["operator"]).keys()


def test_trainer_image_holds_what_pyproject_and_the_constraints_ask_for(images):
    """The dependency layer follows pyproject.toml (base dependencies + the `trainer` extra) and the
    exact versions of trainer_image/constraints.txt, so an added dependency reaches the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    have = installed(images["trainer"])
    for spec in project["dependencies"] + project["optional-dependencies"]["trainer"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in have, f"{req.name} (pyproject.toml) is missing from the trainer image"
        assert req.specifier.contains(have[name], prereleases=True), f"{req.name} {have[name]} breaks {spec!r}"
    for line in (ROOT / "trainer_image" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            name = name.strip().lower().replace("_", "-")  # as pip list names it (huggingface_hub -> huggingface-hub)
            assert have.get(name) == version.strip(), f"{line}: image has {have.get(name)}"


@pytest.mark.trainer
def test_trainer_image_fine_tunes_the_tiny_model_like_a_trainer_pod(images, tiny_assets, tmp_path):
    """The renderer's ConfigMap, command, args and env, the pod's mounts (config read-only, the
    assets claim read-only, the output claim writable), as UID 1000 with nothing else writable."""
    sftjob = {
        "apiVersion": "sft.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "image-tiny", "namespace": "team-a"},
        "spec": {
            "model": {"source": "pvc://assets/model"},
            "dataset": {"train": {"source": "pvc://assets/data/train.jsonl"}, "validationSplit": 0.1,
                        "maxSeqLength": 128},
            "hyperparameters": {"learningRate": 3e-3, "maxSteps": 20, "perDeviceBatchSize": 8,
                                "gradientAccumulationSteps": 1, "precision": "fp32"},
            "output": {"destination": "pvc://models/image-tiny"},
            "resources": {"gpusPerNode": 0},
        },
    }
    config_map, _service, job = render_children(sftjob)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == images["trainer"].ref  # what the operator schedules by default

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, value in config_map["data"].items():
        (config_dir / key).write_text(value)
    models = tmp_path / "models"
    models.mkdir()
    os.chown(models, TRAINER_UID, TRAINER_UID)  # what fsGroup does for the output claim
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env |= {"SFT_JOB_NAMESPACE": "team-a", "SFT_POD_NAME": "image-tiny-0-abcde", "OMP_NUM_THREADS": "1"}
    options = (
        f"--volume={config_dir}:{CONFIG_DIR}:ro",
        f"--volume={tiny_assets}:{PVC_ROOT}/assets:ro",
        f"--volume={models}:{PVC_ROOT}/models:rw",
        *(f"--env={k}={v}" for k, v in env.items()),
        f"--entrypoint={json.dumps(container['command'])}",
    )
    proc = run_restricted(images["trainer"], *container["args"], options=options, timeout=600)
    assert proc.returncode == 0, f"trainer exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    out = models / "image-tiny"
    assert (out / "model" / "config.json").exists() and list((out / "model").glob("*.safetensors")), \
        sorted(p.name for p in out.rglob("*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["evalLoss"] > 0, metrics
    progress = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "progress"')]
    assert progress and progress[-1]["step"] == 20, proc.stdout[-2000:]  # what `kubectl logs` shows
    assert all(p.stat().st_uid == TRAINER_UID for p in out.rglob("*")), "files not written by the pod's user"


def test_saved_tars_are_docker_archives_tagged_with_the_image_ref(images):
    """What the node loads with `ctr -n k8s.io images import`: one image, tagged, with the same
    config (image ID) podman built."""
    for image in images.values():
        with tarfile.open(image.tar) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        assert len(manifest) == 1 and manifest[0]["RepoTags"] == [image.ref], manifest
        image_id = podman("image", "inspect", "--format", "{{.Id}}", image.ref, check=True).stdout.strip()
        assert manifest[0]["Config"].removesuffix(".json").removeprefix("sha256:").endswith(image_id), manifest


def test_images_carry_nothing_of_the_build_machine(images):
    """The build sees this machine's CA bundle (for a TLS-inspecting proxy) and runs next to its pip
    settings; neither may end up in an image: the bundle is the base's, no PIP_* variable is set."""
    listed = subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh"), "--list", "base"],
                            capture_output=True, text=True, check=True)
    base_ref = listed.stdout.split()[0]
    bundle = "/etc/ssl/certs/ca-certificates.crt"

    def digest(ref: str) -> str:
        proc = podman("run", "--rm", "--network=none", "--entrypoint=sha256sum", ref, bundle)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()[0]

    for image in images.values():
        assert digest(image.ref) == digest(base_ref), f"{image.ref} carries another {bundle} than its base"
        env = podman("image", "inspect", "--format", "{{json .Config.Env}}", image.ref, check=True).stdout
        assert not [e for e in json.loads(env) if e.startswith("PIP_")], env
