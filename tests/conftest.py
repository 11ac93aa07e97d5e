"""Shared pytest setup. The `cluster` and `trainer` markers are declared in pyproject.toml;
the real control plane fixture lives in tests/integration/conftest.py."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds even on a warm machine")


# ---- real servers on loopback for object storage and tracking (tests/storage_servers.py)

import pytest  # noqa: E402


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
