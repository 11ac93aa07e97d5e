"""scripts/build-images.sh's interface, checked without building: the refs it tags are the ones the
chart and the renderer deploy, its stdout is one "<ref> <tar>" line per image, bad input is named.
(The builds themselves: tests/integration/test_images.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from sft_operator.core.render import RenderOptions

from .helpers import ROOT

SCRIPT = ROOT / "scripts" / "build-images.sh"


def script(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SFT_CACHE": str(cache)})


def test_images_are_tagged_as_the_chart_and_the_renderer_deploy_them(tmp_path):
    listed = script("--list", cache=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split() for line in listed.stdout.splitlines()]
    values = yaml.safe_load((ROOT / "helm" / "sft-operator" / "values.yaml").read_text())
    app_version = yaml.safe_load((ROOT / "helm" / "sft-operator" / "Chart.yaml").read_text())["appVersion"]
    assert [ref for ref, _ in lines] == [f"{values['image']['repository']}:{app_version}", values["trainer"]["image"]]
    assert values["trainer"]["image"] == RenderOptions.default_image
    assert [Path(tar) for _, tar in lines] == [tmp_path / "images" / f"{name}-{app_version}.tar"
                                              for name in ("operator", "trainer")]


def test_one_target_lists_one_image_and_the_base_lists_its_root_filesystem(tmp_path):
    trainer = script("--list", "trainer", cache=tmp_path).stdout.splitlines()
    assert len(trainer) == 1 and trainer[0].startswith(RenderOptions.default_image + " ")
    (base,) = script("--list", "base", cache=tmp_path).stdout.splitlines()
    ref, tar = base.split()
    assert ref.startswith("localhost/") and Path(tar).parent == tmp_path / "images" and tar.endswith(".tar")


def test_an_unknown_target_is_named_and_nothing_is_printed_on_stdout(tmp_path):
    bad = script("operater", cache=tmp_path)
    assert bad.returncode != 0 and bad.stdout == ""
    assert "unknown argument: operater" in bad.stderr and not (tmp_path / "images").exists()
    usage = script("--help", cache=tmp_path)
    assert usage.returncode == 0 and "build-images.sh [base|operator|trainer|all]" in usage.stdout
