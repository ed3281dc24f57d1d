"""Shared CLI helpers: click classes, progress bars and option parsing.

Nothing here imports rich at module level: a quiet or piped ``hyperctl convert`` must start as fast
as possible (the target is qemu-img's wall time), so rich loads only when a bar is really drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click

from hypersdk.errors import InvalidParameterError


class Group(click.Group):
    """Commands listed in registration order (sub-groups last), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands, key=lambda n: isinstance(self.commands[n], click.Group))


Group.group_class = Group


def key_reference(
    key_file: str | None,
    passphrase_file: str | None,
    passphrase_env: str | None,
    gpg_recipient: str | None,
) -> dict[str, str] | None:
    """Where the key is (``method``/``ref`` of a KeySpec), never the key itself; None if no key
    option was given. ``gpg_recipient=""`` means GPG with the default key (decrypt --gpg)."""
    given = [x for x in (key_file, passphrase_file, passphrase_env, gpg_recipient) if x]
    if len(given) > 1:
        raise InvalidParameterError(
            "give only one of --key-file, --passphrase-file, --passphrase-env, --gpg-recipient"
        )
    for method, ref in (
        ("keyfile", key_file),
        ("passphrase", passphrase_file),
        ("env", passphrase_env),
    ):
        if ref:
            return {"method": method, "ref": ref}
    if gpg_recipient is not None:
        return {"method": "gpg", "ref": gpg_recipient}
    return None


def parse_options(pairs: Iterable[str] | None) -> dict[str, str]:
    """``-o key=value`` pairs into a dict, with a clear error for a malformed one."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        for item in pair.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidParameterError(f"option {item!r} is not key=value")
            out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A rich progress display (bytes, speed, ETA) on stderr, or None when disabled (quiet, or
    stderr is not a terminal): then rich is never imported."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),  # stdout carries only results (--json)
    )
    with bar:
        yield bar


def byte_counter(bar: Any, description: str, total: int | None) -> Callable[[int], None] | None:
    """A progress callback (bytes done) bound to a new bar task; None without a bar."""
    if bar is None:
        return None
    task = bar.add_task(description, total=total)
    return lambda n: bar.advance(task, n)
