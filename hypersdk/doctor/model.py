"""What a doctor check answers (a Result), and how checks run: side by side in daemon threads,
each bounded by a timeout, so one that hangs (a dead endpoint, a stuck NFS mount) turns into a
fail line instead of a hung command. Nothing a check says may carry a secret: ``scrub``."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")
MAX_DETAIL = 300  # one readable line


@dataclass(frozen=True)
class Result:
    """One line of the doctor's table: what was checked, how it went, why, and what to do."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


Check = Callable[[], "Result | list[Result]"]


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """Whitespace folded to single spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """An exception as one line: our typed errors already are one; others get their type."""
    from hypersdk.errors import HyperSDKError

    message = str(exc) or type(exc).__name__
    if not isinstance(exc, HyperSDKError):
        message = f"{type(exc).__name__}: {message}"
    return one_line(message)


def inner(timeout: float) -> float:
    """The time a check gives its own requests: a little less than the runner waits, so a slow
    endpoint is reported by the check itself, with what it was waiting for."""
    return max(0.2, timeout * 0.8)


def run_bounded(
    checks: list[tuple[str, Check]], timeout: float, waiting_for: dict[str, str] | None = None
) -> list[Result]:
    """Run every check at once, each in a daemon thread; collect in the given order. A check
    still running ``timeout`` seconds after the start is a fail (its thread is left behind: a
    daemon thread never holds up the exit), with ``waiting_for[name]`` saying on what. A check that
    raises is a fail with one line."""
    slots: list[list[Result] | None] = [None] * len(checks)

    def work(i: int, name: str, check: Check) -> None:
        try:
            got = check()
            slots[i] = got if isinstance(got, list) else [got]
        except Exception as exc:  # a check's bug or an SDK's surprise: still one line
            slots[i] = [Result(name, "fail", describe(exc))]

    threads = []
    for i, (name, check) in enumerate(checks):
        t = threading.Thread(target=work, args=(i, name, check), name=f"doctor:{name}")
        t.daemon = True
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    out: list[Result] = []
    for (name, _), got in zip(checks, slots, strict=True):
        if got is None:
            out.append(
                Result(
                    name,
                    "fail",
                    f"no answer within {timeout:g} s"
                    + (f" from {waiting_for[name]}" if waiting_for and name in waiting_for else ""),
                    "the service or path hangs; raise --timeout if it is only slow",
                )
            )
        else:
            out.extend(got)
    return out


# environment variables whose values are secrets (never shown, whatever prints them)
_SECRET_VAR = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCOUNT_KEY|STORAGE_KEY|AUTH_STRING|"
    r"CONNECTION_STRING|CREDENTIALS?_JSON|PRIVATE_KEY|SAS)",
    re.IGNORECASE,
)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of secret-looking variables of the environment (long enough to matter)."""
    env = os.environ if environ is None else environ
    return sorted(
        {v for k, v in env.items() if _SECRET_VAR.search(k) and len(v) >= 6},
        key=len,
        reverse=True,
    )


def scrub(results: Iterable[Result], urls: Iterable[str], secrets: Iterable[str]) -> list[Result]:
    """Results with every URL given shown redacted and every secret value replaced by ***: a
    belt to the braces of our one-line errors, which never carry secrets on purpose."""
    from hypersdk.references import printable
    from hypersdk.urls import redact_url

    pairs = [(u, redact_url(u)) for u in urls if u]
    pairs = [(u, r) for u, r in pairs if u != r]
    hidden = [s for s in secrets if s]

    def clean(text: str) -> str:
        for url, red in pairs:
            text = text.replace(url, red)
        for value in hidden:
            text = text.replace(value, "***")
        # names from the server (workers, deployments) reach the terminal: one line, no escapes
        return printable(" ".join(text.split()))

    return [Result(clean(r.name), r.status, clean(r.detail), clean(r.hint)) for r in results]
