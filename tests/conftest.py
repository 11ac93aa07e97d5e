"""Shared pytest setup. The `cluster`, `trainer` and `images` markers are declared in pyproject.toml;
the real control plane fixture lives in tests/integration/conftest.py; the container images come
from tests/container_images.py (scripts/build-images.sh)."""

import pytest

import container_images


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds even on a warm machine")


_images: dict = {}


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
