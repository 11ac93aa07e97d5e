"""Shared pytest setup. The `cluster` and `trainer` markers are declared in pyproject.toml;
the real control plane fixture lives in tests/integration/conftest.py."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds even on a warm machine")
