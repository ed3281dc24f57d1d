"""``ensure_api``: point this process's flow runs at a Prefect API that is up (the user's, the
managed server, one already on the port) or, failing all of them, at Prefect's ephemeral mode."""

from __future__ import annotations

import os
import sys

from hypersdk.localapi.model import EPHEMERAL_TIMEOUT, MODE_VAR, ApiInfo, Echo
from hypersdk.localapi.server import start_server
from hypersdk.localapi.settings import configured_api, mode_off

_current: ApiInfo | None = None  # what this process chose, so a second call is free


def _export(info: ApiInfo) -> ApiInfo:
    """Point this process's Prefect at ``info`` (env vars: flow runs started later read them)."""
    global _current
    if info.url:
        os.environ["PREFECT_API_URL"] = info.url
        if info.ui_url:
            os.environ["PREFECT_UI_URL"] = info.ui_url
    else:
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
        raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "")
        if not raw.isdigit() or int(raw) < EPHEMERAL_TIMEOUT:
            os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(EPHEMERAL_TIMEOUT)
        # each process has its own temporary server: concurrency leases kept in its memory die
        # with it, a killed run's slot with them; in files under PREFECT_HOME (shared like the
        # database) the next run finds and frees it (flows/repo_slot.py)
        os.environ.setdefault(
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
            "prefect.server.concurrency.lease_storage.filesystem",
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "prefect.context" in sys.modules:  # Prefect caches its settings at import
        sys.modules["prefect.context"].refresh_global_settings_context()
    _current = info
    return info


def _ephemeral(reason: str) -> ApiInfo:
    from hypersdk.ephemeral_guard import guard_ephemeral_server

    guard_ephemeral_server()  # a SIGKILLed CLI must not leave Prefect's server behind
    return _export(ApiInfo(None, None, "ephemeral", detail=reason))


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ensure_api(echo: Echo | None = None) -> ApiInfo:
    """Make this process's flow runs use a Prefect API that is up, starting the local server on
    first use; never raises. ``echo`` gets one line when a server starts (a slow first run) and
    one when we fall back to ephemeral mode, else nothing. Call before Prefect runs a flow: it
    reads PREFECT_API_URL from the environment."""
    say = echo or (lambda _msg: None)
    if _current is not None and os.environ.get("PREFECT_API_URL") == _current.url:
        return _current  # this process chose already (and nobody changed it since)
    if mode_off():
        return _ephemeral(f"{MODE_VAR}=off")
    try:
        if found := configured_api():
            url, where = found
            ui_url = os.environ.get("PREFECT_UI_URL") or (
                url.removesuffix("/api") if url.endswith("/api") else None
            )
            return ApiInfo(url, ui_url, "user", detail=where)
        return _export(start_server(say))
    except Exception as exc:  # whatever it was, the run goes on in ephemeral mode, as before
        reason = _one_line(str(exc) or type(exc).__name__)
        say(
            f"no local Prefect server ({reason}); this run uses a temporary Prefect API "
            "and will not show in the UI"
        )
        return _ephemeral(reason)
