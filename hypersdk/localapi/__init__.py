"""Which Prefect API a run command uses, starting a local server on first use.

Without a configured API, Prefect starts an *ephemeral* server per process: ~20 s of database
migration on a fresh machine (long enough to time out on a loaded one), 10-20 s of overhead on
every later run, and runs nobody sees in the UI. So the run commands call :func:`ensure_api`
first, which picks, in order:

1. ``user``: an API the user configured (PREFECT_API_URL in the environment, the active profile
   of Prefect's profiles.toml, ``.env``/``prefect.toml``/``pyproject.toml`` here);
2. ``managed``: the server this tool started earlier (``<home>/prefect/server.json``), if that
   process is still alive and answers ``/api/health``;
3. ``existing``: a Prefect server already answering on 127.0.0.1:4200 (``make server``);
4. ``managed``: a new ``prefect server start`` in the background, detached, under a file lock so
   concurrent CLIs start one; it outlives the CLI and is stopped by ``hyperctl server stop``;
5. ``ephemeral``: Prefect's own mode, with a longer start-up timeout, if all of that fails or
   HYPERSDK_PREFECT_SERVER=off.

Modules: ``model`` (names, records, the error), ``settings`` (the user's configuration),
``process`` (pids, health, termination, ports), ``state`` (the state file and its lock),
``server`` (start, stop, status), ``ensure`` (the choice above).

Nothing here imports Prefect: this runs before the flow modules are imported.
"""

from hypersdk.localapi.ensure import ensure_api
from hypersdk.localapi.model import (
    DEFAULT_PORT,
    EPHEMERAL_TIMEOUT,
    HOST,
    MODE_VAR,
    PORT_VAR,
    START_TIMEOUT,
    TIMEOUT_VAR,
    ApiInfo,
    Echo,
    How,
    LocalServerError,
    ServerState,
)
from hypersdk.localapi.process import healthy, is_ours
from hypersdk.localapi.server import Status, server_status, start_server, stop_server
from hypersdk.localapi.settings import choose_port, configured_api, mode_off
from hypersdk.localapi.state import log_path, read_state, state_dir, state_path

__all__ = [
    "DEFAULT_PORT",
    "EPHEMERAL_TIMEOUT",
    "HOST",
    "MODE_VAR",
    "PORT_VAR",
    "START_TIMEOUT",
    "TIMEOUT_VAR",
    "ApiInfo",
    "Echo",
    "How",
    "LocalServerError",
    "ServerState",
    "Status",
    "choose_port",
    "configured_api",
    "ensure_api",
    "healthy",
    "is_ours",
    "log_path",
    "mode_off",
    "read_state",
    "server_status",
    "start_server",
    "state_dir",
    "state_path",
    "stop_server",
]
