"""Running ``hyperctl`` on hostile input in a child process under a memory limit and a timeout:
a parser whose memory or time follows a header field instead of the file shows up as a
MemoryError, a traceback or a timeout instead of taking the test run down with it."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

MEMORY = 1 << 30  # RLIMIT_AS of the child: 1 GiB


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _run(argv: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still ran after {timeout} s")


def hyperctl(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """``hyperctl ARGS`` in a child under RLIMIT_AS and ``timeout``; a timeout fails the test."""
    argv = [sys.executable, "-m", "hypersdk.cli.main", *map(str, args)]
    return _run(argv, f"hyperctl {' '.join(map(str, args))}", timeout)


def python(code: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` in a child under the same limits (``sys.argv[1:]`` are ARGS)."""
    return _run([sys.executable, "-c", code, *map(str, args)], "the child", timeout)


def refused(res: subprocess.CompletedProcess, *words: str, code: int = 1) -> str:
    """The command failed with exit ``code`` and one line naming each of ``words``; the line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1, (res.returncode, res.stdout, res.stderr)
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in line, line
    for word in words:
        assert word in line, (word, line)
    return line


def succeeded(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout
