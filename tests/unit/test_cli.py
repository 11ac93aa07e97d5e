"""sftctl as a user runs it."""

import subprocess
import sys

import pytest
import yaml

from .helpers import EXAMPLES, INVALID, ROOT, broken_field


def sftctl(*args):
    return subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", *args], capture_output=True, text=True, cwd=ROOT)


def test_validate_examples_exits_zero():
    out = sftctl("validate", *map(str, EXAMPLES))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": valid") == len(EXAMPLES)


def test_validate_invalid_corpus_exits_one_with_a_line_per_problem_naming_the_field():
    out = sftctl("validate", *map(str, INVALID))
    assert out.returncode == 1
    for path in INVALID:
        lines = [line for line in out.stderr.splitlines() if line.startswith(str(path))]
        assert any(broken_field(path) in line for line in lines), (path.name, lines)


def test_validate_reports_unreadable_files(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("spec: [unclosed")
    out = sftctl("validate", str(bad), str(tmp_path / "missing.yaml"))
    assert out.returncode == 1
    assert "broken.yaml: cannot read" in out.stderr and "missing.yaml: cannot read" in out.stderr


def test_validate_prints_advice_as_warnings():
    out = sftctl("validate", str(ROOT / "examples" / "minimal.yaml"))
    assert out.returncode == 0 and "warning: spec.dataset.general" in out.stdout


def test_render_prints_the_children_in_creation_order():
    out = sftctl("render", str(ROOT / "examples" / "multi-node-lora.yaml"))
    assert out.returncode == 0, out.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.stdout)]
    assert kinds == ["ConfigMap", "Service", "PersistentVolumeClaim", "Job"]  # a hub model: the fetch cache


def test_render_refuses_an_invalid_manifest():
    out = sftctl("render", str(INVALID[0]))
    assert out.returncode == 1 and broken_field(INVALID[0]) in out.stderr


def test_explain_documents_a_field_and_rejects_unknown_ones():
    out = sftctl("explain", "spec.hyperparameters.learningRate")
    assert out.returncode == 0
    assert "<number>" in out.stdout and "DEFAULT: 2e-05" in out.stdout and "1e-5..2e-5" in out.stdout
    out = sftctl("explain", "spec.hyperparameters")
    assert "warmupRatio" in out.stdout and "lrScheduler" in out.stdout
    out = sftctl("explain", "spec.learningrate")
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_help_lists_every_command():
    out = sftctl("--help")
    for command in ("validate", "render", "crd", "explain", "run", "example-assets", "status", "watch", "operator"):
        assert command in out.stdout


def test_operator_run_help_shows_the_operator_flags():
    out = sftctl("operator", "run", "--help")
    assert out.returncode == 0, out.stderr
    assert "--trainer-image" in out.stdout and "--progress-url" in out.stdout


def test_validate_refuses_credentials_in_a_url_naming_the_field_and_the_secret_reference(tmp_path):
    doc = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    doc["spec"]["tracking"] = {"mlflow": {"trackingUri": "https://me:hunter2@mlflow.example.com"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = sftctl("validate", str(path))
    assert out.returncode == 1
    assert f"{path}: spec.tracking.mlflow.trackingUri: must not carry credentials" in out.stderr
    assert "tokenSecretRef" in out.stderr and "hunter2" not in out.stderr + out.stdout


def test_commands_of_packages_that_are_not_installed_are_listed_and_say_what_to_install(monkeypatch, capsys):
    """sftctl finds run, example-assets and dev-cluster through entry points; without those packages
    (e.g. the operator image) --help still lists them and running one names what to install."""
    from sft_operator.cli import sftctl as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert all(command in listed for command in ("run", "example-assets", "dev-cluster"))
    assert cli.main(["run", "examples/local-tiny.yaml"]) == 1
    assert capsys.readouterr().err.strip() == "sftctl run needs the trainer: pip install 'sft-operator[trainer]'"
    assert cli.main(["dev-cluster", "up"]) == 1
    assert "in a source checkout run `bash scripts/setup.sh`" in capsys.readouterr().err
    doc = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    assert not cli.check_data("job.yaml", doc)
    assert "job.yaml: --data needs the trainer: pip install 'sft-operator[trainer]'" in capsys.readouterr().err


def test_the_checkouts_packages_contribute_their_commands():
    assert "--output" in sftctl("run", "--help").stdout  # the trainer's command, not the placeholder
    assert "--gpu-nodes" in sftctl("dev-cluster", "--help").stdout
