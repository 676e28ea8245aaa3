"""Flow tests share one Prefect test server (a temp SQLite database) per session."""

import os
import tempfile

import pytest

# Before Prefect is imported: keep its home (profiles, local storage) out of the developer's and
# out of the project's .prefect/, and never talk to a real server that happens to be configured.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mft-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        # The heartbeat thread costs ~1 s per flow run; it is only settable to None in code.
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
