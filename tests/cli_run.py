"""Running ``hyperctl`` as a user does (its own process) and checking its one-line errors:
the one copy the CLI tests share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HYPERCTL = str(Path(sys.executable).with_name("hyperctl"))


def hyperctl(
    *args: object,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    preexec_fn=None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``hyperctl ARGS`` with ``env`` (the whole environment; None inherits ours) and ``stdin``
    as its input (None: /dev/null, so a command that waits on a prompt fails instead of hanging)."""
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(
        [HYPERCTL, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=preexec_fn,
        timeout=timeout,
        **feed,
    )


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """A non-zero exit with exactly one ``error:`` line on stderr naming each of ``needles``."""
    assert res.returncode != 0, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in res.stderr
