"""Webhook endpoints: where events go and where each endpoint's secret is (never the secret).

From a TOML file (``$HYPERSDK_WEBHOOKS``, else ``$HYPERSDK_HOME/webhooks.toml``)::

    [[endpoint]]
    name = "ops"                                   # the outbox's key: keep it stable
    url = "https://hooks.example.com/hypersdk"
    secret_env = "HYPERSDK_WEBHOOK_OPS_SECRET"     # or: secret_block = "webhook-ops"
    events = ["job.started", "job.completed", "job.failed"]   # default: all four

or from a Prefect JSON block holding the same list (``{"endpoint": [...]}``) named by
``$HYPERSDK_WEBHOOKS_BLOCK``. A ``secret`` in the file, or a credential in the URL, is refused:
files are copied around and URLs are logged.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypersdk import config
from hypersdk.errors import CredentialsError, InvalidParameterError
from hypersdk.smallfile import UnreadableFile, read_small_file
from hypersdk.urls import check_url

ENV_FILE = "HYPERSDK_WEBHOOKS"
ENV_BLOCK = "HYPERSDK_WEBHOOKS_BLOCK"
MAX_CONFIG_BYTES = 1 << 20  # a few endpoints: a larger file is not a configuration
EVENTS = ("job.started", "job.progress", "job.completed", "job.failed")
_KEYS = {"name", "url", "secret_env", "secret_block", "events", "timeout"}


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    secret_env: str | None = None
    secret_block: str | None = None
    events: frozenset[str] = frozenset(EVENTS)
    timeout: float = 10.0

    def wants(self, event: str) -> bool:
        return event in self.events

    def secret(self) -> str:
        """The signing secret, from the environment or a Prefect Secret block, read when a
        delivery is signed (never stored in the outbox)."""
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if not value:
                raise CredentialsError(
                    f"webhook {self.name!r}: environment variable {self.secret_env} is not set"
                )
            return value
        from hypersdk.secrets import load_secret_block

        value = load_secret_block(str(self.secret_block), f"webhook {self.name!r}")
        if not isinstance(value, str):
            raise CredentialsError(f"webhook {self.name!r}: secret block must hold a string")
        return value


def parse_endpoints(data: Mapping[str, Any], where: str) -> list[Endpoint]:
    """Endpoints from the file's (or block's) content; InvalidParameterError naming ``where``."""
    items = data.get("endpoint", [])
    if not isinstance(items, list):
        raise InvalidParameterError(f"{where}: 'endpoint' must be a list of tables")
    out: list[Endpoint] = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, Mapping):
            raise InvalidParameterError(f"{where}: endpoint {i} is not a table")
        unknown = set(item) - _KEYS
        if unknown & {"secret", "token", "key", "password"}:
            raise InvalidParameterError(
                f"{where}: endpoint {i} holds a secret; name an environment variable "
                "(secret_env) or a Prefect Secret block (secret_block) instead"
            )
        if unknown:
            raise InvalidParameterError(f"{where}: endpoint {i}: unknown {sorted(unknown)}")
        name, url = item.get("name"), item.get("url")
        if not isinstance(name, str) or not name or not isinstance(url, str):
            raise InvalidParameterError(f"{where}: endpoint {i} needs a name and a url")
        check_url(url, f"{where}: webhook URL")
        if not url.startswith(("http://", "https://")):
            raise InvalidParameterError(f"{where}: endpoint {name!r}: url must be http(s)")
        if bool(item.get("secret_env")) == bool(item.get("secret_block")):
            raise InvalidParameterError(
                f"{where}: endpoint {name!r} needs exactly one of secret_env, secret_block"
            )
        events = item.get("events", list(EVENTS))
        if not isinstance(events, list) or not set(events) <= set(EVENTS) or not events:
            raise InvalidParameterError(
                f"{where}: endpoint {name!r}: events must be a list of {', '.join(EVENTS)}"
            )
        out.append(
            Endpoint(
                name=name,
                url=url,
                secret_env=item.get("secret_env"),
                secret_block=item.get("secret_block"),
                events=frozenset(events),
                timeout=float(item.get("timeout", 10.0)),
            )
        )
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"{where}: endpoint names must be unique")
    return out


def default_file() -> Path:
    if env := os.environ.get(ENV_FILE):
        return Path(env).expanduser()
    return config.home() / "webhooks.toml"


def load_endpoints(path: str | os.PathLike[str] | None = None) -> list[Endpoint]:
    """The configured endpoints: the Prefect block named by $HYPERSDK_WEBHOOKS_BLOCK, else the
    file; none (webhooks off) when neither exists."""
    block = os.environ.get(ENV_BLOCK)
    if path is None and block:
        return parse_endpoints(_load_block(block), f"Prefect block {block!r}")
    file = Path(path) if path is not None else default_file()
    try:
        data = tomllib.loads(read_small_file(file, MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        if path is not None:
            raise InvalidParameterError(f"{file}: no such webhooks file") from None
        return []
    except (UnreadableFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidParameterError(f"{file}: not a webhooks TOML file ({exc})") from None
    return parse_endpoints(data, str(file))


def _load_block(name: str) -> Mapping[str, Any]:
    try:
        from prefect.blocks.system import JSON
    except ImportError:
        raise InvalidParameterError(f"webhooks block {name!r} asked for without Prefect") from None
    try:
        value = JSON.load(name).value
    except Exception as exc:  # noqa: BLE001 - any lookup failure means the same thing
        raise InvalidParameterError(f"cannot load Prefect JSON block {name!r}: {exc}") from None
    if isinstance(value, list):
        value = {"endpoint": value}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"Prefect block {name!r}: not a webhooks configuration")
    return value


def by_name(endpoints: Iterable[Endpoint]) -> dict[str, Endpoint]:
    return {e.name: e for e in endpoints}
