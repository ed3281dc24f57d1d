"""Sources and targets: which ones are configured (the deployments' parameters, the command
line, hypersdk.config's defaults), whether their credentials work (one cheap real call through
our providers: a source lists its VMs, a target passes its preflight and, for cloud stores, a
HEAD of the bucket or container), and the free space of the local places runs write to."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from hypersdk.doctor.model import Result, describe

Kind = Literal["source", "target"]
MAX_ENDPOINTS = 40  # a server with more distinct URLs gets the first ones checked, and a note
MAX_URL = 4096
GiB = 1 << 30
MIN_FREE_GIB = 10.0  # below: a warning (an export of a large disk may not fit)
FAIL_FREE_GIB = 1.0  # below: a fail (the audit log, manifests, a small export do not fit)
_RANK = {"given": 0, "deployment": 1, "default": 2}


@dataclass(frozen=True)
class Endpoint:
    """A URL runs read from (source) or write to (target), and who names it: ``given`` (the
    command line), a deployment (``deployment flow/name``), or ``default`` (hypersdk.config)."""

    kind: Kind
    url: str
    origin: str

    @property
    def rank(self) -> int:
        return _RANK[self.origin.split(" ")[0]]


def collect_endpoints(
    deployments: list[dict[str, Any]], sources: list[str], targets: list[str]
) -> tuple[list[Endpoint], int]:
    """Distinct (kind, URL) pairs, each with its strongest origin; (the first MAX_ENDPOINTS,
    how many more were left out)."""
    from hypersdk import config

    found: dict[tuple[str, str], Endpoint] = {}

    def add(kind: Kind, url: object, origin: str) -> None:
        if not isinstance(url, str) or not url or len(url) > MAX_URL:
            return
        ep = Endpoint(kind, url, origin)
        old = found.get((kind, url))
        if old is None or ep.rank < old.rank:
            found[(kind, url)] = ep

    for url in sources:
        add("source", url, "given")
    for url in targets:
        add("target", url, "given")
    for d in deployments:
        params = d.get("parameters") if isinstance(d.get("parameters"), dict) else {}
        origin = f"deployment {d.get('flow_name', '?')}/{d.get('name', '?')}"
        add("source", params.get("source"), origin)
        add("target", params.get("target"), origin)
    add("source", config.default_source_url(), "default")
    add("target", config.default_target_url(), "default")
    ordered = sorted(found.values(), key=lambda e: (e.rank, e.kind, e.url))
    return ordered[:MAX_ENDPOINTS], max(0, len(ordered) - MAX_ENDPOINTS)


def label(ep: Endpoint) -> str:
    from hypersdk.urls import redact_url

    return f"{ep.kind} {redact_url(ep.url)}"


def _failed(ep: Endpoint, exc: BaseException) -> Result:
    """A default nobody asked for is a warning (runs given a URL never use it); else a fail."""
    status = "warn" if ep.origin == "default" else "fail"
    hint = {
        "CredentialsError": "set the credentials where the workers run (docs/targets.md)",
        "EndpointUnreachableError": "check the endpoint URL and the network",
    }.get(type(exc).__name__, "")
    if ep.origin == "default":
        hint = "runs without a source/target parameter use it; " + (hint or "create it or ignore")
    return Result(label(ep), status, f"{describe(exc)} (used by {ep.origin})", hint)


def check_source(ep: Endpoint) -> Result:
    """The source's inventory: the call every export makes first."""
    from providers import open_source

    try:
        with open_source(ep.url) as source:
            vms = source.list_vms()
    except Exception as exc:
        return _failed(ep, exc)
    return Result(label(ep), "ok", f"{len(vms)} VM(s) listed (used by {ep.origin})")


def check_target(ep: Endpoint) -> Result:
    """The target's preflight, and for cloud stores ``check`` (a HEAD of the bucket: endpoint,
    credentials and bucket in one request). Nothing is written."""
    from providers import open_target

    try:
        with open_target(ep.url) as target:
            target.preflight()
            probe = getattr(target, "check", None)
            if callable(probe):
                probe()
                what = "reachable, credentials accepted"
            else:
                what = "writable"
    except Exception as exc:
        return _failed(ep, exc)
    return Result(label(ep), "ok", f"{what} (used by {ep.origin})")


def local_path(url: str) -> str | None:
    """The directory a local target URL names (file:///dir or a bare path), else None."""
    parts = urlsplit(url)
    if len(parts.scheme) <= 1:
        return url
    if parts.scheme.lower() == "file":
        return unquote(parts.netloc + parts.path) or None
    return None


def _existing(path: str) -> str:
    """``path``, or the nearest directory above it that exists (what a first write fills)."""
    place = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(place):
        parent = os.path.dirname(place)
        if parent == place:
            break
        place = parent
    return place


def space_places(endpoints: list[Endpoint]) -> list[tuple[str, str]]:
    """(what, path) of the places to measure: HYPERSDK_HOME, the temporary directory (TMPDIR:
    compressed qcow2 packing, GCP maps), and every local target."""
    from hypersdk import config

    places = [("HYPERSDK_HOME", str(config.home())), ("TMPDIR", tempfile.gettempdir())]
    for ep in endpoints:
        if ep.kind == "target" and (path := local_path(ep.url)):
            places.append((f"target {ep.origin}", path))
    seen, out = set(), []
    for what, path in places:
        if path not in seen:
            seen.add(path)
            out.append((what, path))
    return out


def check_space(
    what: str, path: str, warn_gib: float = MIN_FREE_GIB, fail_gib: float = FAIL_FREE_GIB
) -> Result:
    name = f"free space {what}"
    place = _existing(path)
    try:
        free = shutil.disk_usage(place).free
    except OSError as exc:
        return Result(name, "fail", f"{place}: {exc.strerror or exc}")
    shown = f"{free / GiB:.1f} GiB free at {place}"
    if free < fail_gib * GiB:
        return Result(name, "fail", shown, f"free space there (under {fail_gib:g} GiB)")
    if free < warn_gib * GiB:
        return Result(name, "warn", shown, f"under {warn_gib:g} GiB: a large export may not fit")
    return Result(name, "ok", shown)
