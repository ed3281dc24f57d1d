"""Test session setup: isolate Prefect state, load fixture plugins from tests/fixtures/.

Each tests/fixtures/<name>.py is a pytest plugin (emulators, servers, images); adding one needs
no change here.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

_STATE = tempfile.mkdtemp(prefix="hypersdk-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _STATE)
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", os.path.join(_STATE, "storage"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# A test that runs a flow through the CLI without PREFECT_API_URL must not leave a managed
# Prefect server behind (tests of the managed server set this themselves).
os.environ.setdefault("HYPERSDK_PREFECT_SERVER", "off")
# Runs append to the audit log (hypersdk.audit): the session's own, never the user's.
os.environ.setdefault("HYPERSDK_AUDIT_LOG", os.path.join(_STATE, "audit.log"))

# tools first: the other plugins import it.
pytest_plugins = ["tests.fixtures.tools"] + sorted(
    f"tests.fixtures.{p.stem}"
    for p in (pathlib.Path(__file__).parent / "fixtures").glob("*.py")
    if not p.name.startswith("_") and p.stem != "tools"
)
