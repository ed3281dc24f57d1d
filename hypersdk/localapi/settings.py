"""What the user configured: an API of their own (PREFECT_API_URL, Prefect's profiles.toml,
``.env``/``prefect.toml``/``pyproject.toml`` here), opting out, the port, where Prefect keeps
its home and database. Read without importing Prefect (unless something imported it already)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hypersdk.localapi.model import (
    DEFAULT_PORT,
    MAX_CONFIG_BYTES,
    MODE_VAR,
    PORT_VAR,
    LocalServerError,
)


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def database(home: Path) -> str:
    """The server's database, for ``status``: a path, or a URL without its credentials."""
    from urllib.parse import urlsplit, urlunsplit

    for var in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        if url := os.environ.get(var):
            parts = urlsplit(url)
            if parts.username or parts.password:
                host = parts.hostname or ""
                netloc = f"{host}:{parts.port}" if parts.port else host
                url = urlunsplit(parts._replace(netloc=netloc))
            return url
    return str(home / "prefect.db")


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return {}
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}  # Prefect warns about a broken file itself


def _profiles_path() -> Path:
    """Where Prefect reads profiles from (prefect.settings.sources._get_profiles_path)."""
    if env := os.environ.get("PREFECT_PROFILES_PATH"):
        return Path(env).expanduser()
    return prefect_home() / "profiles.toml"


def _dotenv_api_url(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == "PREFECT_API_URL":
            return value.strip().strip("'\"") or None
    return None


def configured_api() -> tuple[str, str] | None:
    """(url, where it is set) of an API the user configured, else None."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url, "PREFECT_API_URL"
    if "prefect.context" in sys.modules:  # already imported: ask Prefect (test harness, plugins)
        from prefect.settings import get_current_settings

        if url := get_current_settings().api.url:
            return url, "the current Prefect settings"
    cwd = Path.cwd()
    if url := _dotenv_api_url(cwd / ".env"):
        return url, str(cwd / ".env")
    for name, keys in (
        ("prefect.toml", ("api", "url")),
        ("pyproject.toml", ("tool", "prefect", "api", "url")),
    ):
        data: Any = _read_toml(cwd / name)
        for key in keys:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, str) and data:
            return data, str(cwd / name)
    path = _profiles_path()
    data = _read_toml(path)
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profiles = data.get("profiles")
    profile = profiles.get(active) if isinstance(profiles, dict) and active else None
    if isinstance(profile, dict) and isinstance(url := profile.get("PREFECT_API_URL"), str) and url:
        return url, f"profile {active!r} in {path}"
    return None


def mode_off() -> bool:
    """The user opted out of the local server (HYPERSDK_PREFECT_SERVER=off)."""
    return os.environ.get(MODE_VAR, "").strip().lower() in ("off", "0", "false", "no", "ephemeral")


def choose_port() -> tuple[int, bool]:
    """(port to use, forced by PORT_VAR?)."""
    raw = os.environ.get(PORT_VAR)
    if not raw:
        return DEFAULT_PORT, False
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise LocalServerError(f"{PORT_VAR}={raw!r} is not a port number")
    return int(raw), True
