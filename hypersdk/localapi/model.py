"""The vocabulary of the local Prefect server: what the environment variables are called, what
an API choice and a server record hold, and the error. Shared by the other modules here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from hypersdk.errors import HyperSDKError

How = Literal["user", "managed", "existing", "ephemeral"]
Echo = Callable[[str], None]

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
MODE_VAR = "HYPERSDK_PREFECT_SERVER"  # "off": never start a server, use ephemeral mode
PORT_VAR = "HYPERSDK_PREFECT_PORT"  # use exactly this port (default: 4200, else a free one)
TIMEOUT_VAR = "HYPERSDK_PREFECT_START_TIMEOUT"  # seconds to wait for a new server's health
# A fresh SQLite migration takes ~20 s on an idle 2-core machine, 30-60 s on a loaded one and
# over 100 s on an overloaded one. Giving up early gains nothing: the ephemeral fallback would
# migrate the same database again. So wait long for a server that is alive.
START_TIMEOUT = 300.0
EPHEMERAL_TIMEOUT = 300  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS in the fallback
MAX_CONFIG_BYTES = 1 << 20  # profiles.toml, state file: bigger is not ours to parse


class LocalServerError(HyperSDKError):
    """The local Prefect server could not be started (or is not there to stop)."""


@dataclass(frozen=True)
class ApiInfo:
    """The API the flows of this process talk to; ``url`` is None in ephemeral mode."""

    url: str | None
    ui_url: str | None
    how: How
    pid: int | None = None  # the managed server's process
    started: bool = False  # started by this call
    detail: str = ""  # where the configuration came from, or why we fell back


@dataclass(frozen=True)
class ServerState:
    """What ``server.json`` records about the server this tool started."""

    pid: int
    port: int
    url: str
    ui_url: str
    prefect_home: str
    database: str
    log: str
    started: float  # epoch seconds
    started_by: str
    proc_start: str | None  # /proc/PID/stat start time: tells our server from a reused pid
    ready_after: float | None = None  # seconds from start to a healthy answer (None: starting)


def urls(port: int) -> tuple[str, str]:
    """(API url, UI url) of a server on ``port`` of HOST."""
    return f"http://{HOST}:{port}/api", f"http://{HOST}:{port}"
