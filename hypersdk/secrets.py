"""Prefect Secret blocks: the one place that loads them (the engine imports without Prefect, so
Prefect is imported only when a block is really asked for)."""

from __future__ import annotations

from typing import Any

from hypersdk.errors import CredentialsError


def load_secret_block(name: str, what: str = "") -> Any:
    """The value of the Prefect Secret block ``name`` (a str, or a dict for JSON secrets);
    CredentialsError with one line naming the block (never its value) if it cannot be read or
    is empty. ``what`` prefixes the message ("Azure", "vSphere", ...)."""
    prefix = f"{what}: " if what else ""
    try:
        from prefect.blocks.system import Secret
    except ImportError:
        raise CredentialsError(
            f"{prefix}Prefect Secret block {name!r} asked for, but Prefect is not installed"
        ) from None
    try:
        value = Secret.load(name).get()
    except Exception as exc:  # noqa: BLE001 - any lookup failure means the same thing here
        raise CredentialsError(
            f"{prefix}cannot load Prefect Secret block {name!r}: {exc}"
        ) from None
    if value is None or value == "" or value == {}:
        raise CredentialsError(f"{prefix}Prefect Secret block {name!r} is empty")
    return value
