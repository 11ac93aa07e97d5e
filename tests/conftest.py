"""Shared pytest setup. The `cluster`, `trainer` and `images` markers are declared in pyproject.toml;
the real control plane fixture lives in tests/integration/conftest.py; the container images come
from tests/container_images.py (scripts/build-images.sh)."""

import os
import subprocess
import sys
from pathlib import Path

# Test the checkout these tests are in, whichever checkout `pip install -e` last pointed at, and hand
# the same packages to what the tests start (sftctl, the operator, the trainer) through PYTHONPATH.
_CHECKOUT = [str(Path(__file__).resolve().parents[1] / d) for d in ("contract", "operator", "trainer_image", "tools")]
sys.path[:0] = [p for p in _CHECKOUT if p not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join(_CHECKOUT + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and p not in _CHECKOUT])

import pytest  # noqa: E402

import container_images  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds even on a warm machine")


_images: dict = {}


# trylast: after `-m`/`-k` deselection, so that a selection without such tests builds nothing.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Build (or reuse) the images before any test starts, so that a cold build (about ten minutes)
    counts against no test's timeout."""
    if _images or not any(item.get_closest_marker("images") for item in items):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"container images: scripts/build-images.sh (log {container_images.build_log()})")
    try:
        _images["built"] = container_images.ensure_images()
    except (container_images.ImageBuildError, OSError) as exc:
        _images["error"] = str(exc)


@pytest.fixture(scope="session")
def images() -> dict[str, container_images.Image]:
    """{"operator": Image, "trainer": Image}, built before the session's first test."""
    if "error" in _images:
        pytest.fail(f"the container images could not be built: {_images['error']}", pytrace=False)
    if "built" not in _images:  # a test that uses the fixture without the `images` marker
        pytest.fail("tests that use the `images` fixture need @pytest.mark.images", pytrace=False)
    return _images["built"]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The offline tiny model and data (`python -m sft_trainer.tiny DIR`, what `sftctl example-assets`
    writes; readable by every user, so a trainer pod, UID 1000, can read them from a volume)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    result = subprocess.run([sys.executable, "-m", "sft_trainer.tiny", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"sft_trainer.tiny failed:\n{result.stdout}\n{result.stderr}"
    assert (out / "model" / "config.json").exists() and (out / "data" / "train.jsonl").exists()
    return out


# ---- real servers on loopback for object storage and tracking (tests/storage_servers.py)

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (any credentials accepted); ``s3_server.env()`` holds the variables a pod would get."""
    from storage_servers import start_s3, stop

    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory):
    """moto's S3 server checking signatures and IAM policies; ``env()`` holds an admin's keys."""
    from storage_servers import start_s3, stop

    server = start_s3(tmp_path_factory.mktemp("s3-auth"), auth=True)
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and a local artifact root."""
    from storage_servers import start_mlflow, stop

    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop(server.proc)


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket per test."""
    import uuid

    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
