"""qemu-img as the test oracle: check, compare, info, convert."""

from __future__ import annotations

import json
import subprocess

from tests.fixtures.tools import need_tool


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need_tool("qemu-img"), *args], capture_output=True, text=True, timeout=600
    )


def check(path, fmt: str) -> None:
    """qemu-img check must report no errors and no leaks."""
    res = run("check", "-f", fmt, str(path))
    assert res.returncode == 0, (
        f"qemu-img check failed ({res.returncode}): {res.stdout}{res.stderr}"
    )


def compare(a, b, fmt_a: str, fmt_b: str, strict: bool = False) -> None:
    """qemu-img compare must find identical contents (with -s, identical allocation too)."""
    args = ["compare", "-f", fmt_a, "-F", fmt_b]
    if strict:
        args.append("-s")
    res = run(*args, str(a), str(b))
    assert res.returncode == 0, f"qemu-img compare: {res.stdout}{res.stderr}"


def info(path, fmt: str | None = None) -> dict:
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    res = run(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def convert(src, dst, src_fmt: str, dst_fmt: str, *opts: str) -> None:
    res = run("convert", "-f", src_fmt, "-O", dst_fmt, *opts, str(src), str(dst))
    assert res.returncode == 0, res.stderr
