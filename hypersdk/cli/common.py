"""Shared CLI helpers: progress bars and option parsing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from hypersdk.errors import InvalidParameterError


def parse_options(pairs: list[str] | None) -> dict[str, str]:
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
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress display (bytes, speed, ETA) on stderr; disabled when not a terminal."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar


def byte_counter(bar: Progress, description: str, total: int | None):
    """A progress callback (bytes done) bound to a new bar task."""
    task = bar.add_task(description, total=total)
    return lambda n: bar.advance(task, n)
