"""The Prefect API the doctor talks to, and what it reads there, over plain HTTP (httpx, each
request bounded in time and every answer in size): no Prefect import, no client retries that
would turn a dead server into minutes of waiting.

Which API: the same order run commands use (hypersdk.localapi): the user's (PREFECT_API_URL,
a profile, .env ...), else the server hyperctl started, else a Prefect server on the local
port. Authentication, when the API wants it: PREFECT_API_KEY (Bearer) or
PREFECT_API_AUTH_STRING (Basic), from the environment or the active profile.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from hypersdk.errors import HyperSDKError

WORK_POOL = "hypersdk-local"  # deployments/bootstrap.py WORK_POOL
QUEUES = ("urgent", "default", "bulk")  # agreed priority queues; every deployment uses default
ZOMBIE_AUTOMATION = "hypersdk-crashed-runs"  # deployments/limits.py ZOMBIE_AUTOMATION
MAX_BODY = 32 << 20  # no answer of these reads is anywhere near: a bigger one is not Prefect's
PAGE = 200  # Prefect's default page limit
MAX_PAGES = 10


class ApiError(HyperSDKError):
    """A request to the Prefect API failed: one line, no secret (the URL has none)."""


@dataclass(frozen=True)
class Api:
    """The API to check: its URL, where it came from, and the headers it wants."""

    url: str
    where: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)


def _profile_setting(name: str) -> str | None:
    """``name`` from the active profile of Prefect's profiles.toml (as localapi reads it)."""
    from hypersdk.localapi.settings import _profiles_path, _read_toml

    data = _read_toml(_profiles_path())
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profiles = data.get("profiles")
    profile = profiles.get(active) if isinstance(profiles, dict) and active else None
    value = profile.get(name) if isinstance(profile, dict) else None
    return value if isinstance(value, str) and value else None


def _headers() -> dict[str, str]:
    if key := os.environ.get("PREFECT_API_KEY") or _profile_setting("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {key}"}
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or _profile_setting("PREFECT_API_AUTH_STRING")
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {}


def resolve_api(probe_timeout: float = 2.0) -> tuple[Api | None, str]:
    """(the API runs would use, or None; why none). Never starts a server."""
    from hypersdk import localapi
    from hypersdk.localapi.model import urls

    if found := localapi.configured_api():
        url, where = found
        return Api(url, where, _headers()), ""
    state = localapi.read_state()
    if state is not None and localapi.is_ours(state):
        return Api(state.url, f"the local server hyperctl started (pid {state.pid})"), ""
    try:
        port = localapi.choose_port()[0]
    except localapi.LocalServerError as exc:
        return None, str(exc)
    url = urls(port)[0]
    if localapi.healthy(url, probe_timeout):
        return Api(url, f"a Prefect server on port {port} (not started by hyperctl)"), ""
    if localapi.mode_off():
        return None, f"{localapi.MODE_VAR}=off: runs use Prefect's ephemeral mode"
    return None, "no PREFECT_API_URL, no local server started by hyperctl, none on port " + str(
        port
    )


class ApiClient:
    """GET/POST of JSON on one API, each request bounded by ``timeout``, each answer by
    MAX_BODY; every failure an ApiError with one line."""

    def __init__(self, api: Api, timeout: float):
        import httpx

        self.api = api
        self._http = httpx.Client(
            base_url=api.url.rstrip("/") + "/",
            headers=api.headers,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """The JSON answer of ``method path``; None for a 404 when ``missing_ok``."""
        import httpx

        where = f"{method} {self.api.url.rstrip('/')}/{path}"
        try:
            with self._http.stream(method, path, json=body) as resp:
                if resp.status_code == 404 and missing_ok:
                    return None
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > MAX_BODY:
                        raise ApiError(f"{where}: answer larger than {MAX_BODY >> 20} MiB")
                if resp.status_code in (401, 403):
                    raise ApiError(
                        f"{where}: HTTP {resp.status_code} (the API wants credentials: "
                        "PREFECT_API_KEY or PREFECT_API_AUTH_STRING)"
                    )
                if resp.status_code >= 400:
                    raise ApiError(f"{where}: HTTP {resp.status_code}")
        except httpx.TimeoutException:
            raise ApiError(f"{where}: no answer in time") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError(f"{where}: the answer is not JSON (not a Prefect API?)") from None

    def pages(self, path: str, body: dict[str, Any]) -> list[Any]:
        """Every item of a paged ``/filter`` read (at most MAX_PAGES pages)."""
        out: list[Any] = []
        for page in range(MAX_PAGES):
            got = self.call("POST", path, {**body, "limit": PAGE, "offset": page * PAGE})
            if not isinstance(got, list):
                raise ApiError(f"POST {path}: expected a list")
            out.extend(got)
            if len(got) < PAGE:
                break
        return out


@dataclass
class Facts:
    """What the server says about our setup; ``errors`` names the parts that could not be read."""

    pool: dict[str, Any] | None = None
    queues: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)  # with "flow_name"
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    automations: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def read_facts(client: ApiClient) -> Facts:
    """Read the pool, its queues and workers, our deployments, the global concurrency limits
    and the crashed-runs automation. A part that fails is recorded, the others still read."""
    facts = Facts()
    pool = quote(WORK_POOL, safe="")

    def part(name: str, read) -> None:
        try:
            read()
        except ApiError as exc:
            facts.errors[name] = str(exc)

    def read_pool() -> None:
        got = client.call("GET", f"work_pools/{pool}", missing_ok=True)
        facts.pool = got if isinstance(got, dict) else None
        if facts.pool is not None:
            facts.queues = _dicts(client.pages(f"work_pools/{pool}/queues/filter", {}))
            facts.workers = _dicts(client.pages(f"work_pools/{pool}/workers/filter", {}))

    def read_deployments() -> None:
        found = _dicts(
            client.pages("deployments/filter", {"work_pools": {"name": {"any_": [WORK_POOL]}}})
        )
        ids = sorted({str(d.get("flow_id")) for d in found if d.get("flow_id")})
        names: dict[str, str] = {}
        for start in range(0, len(ids), PAGE):
            flows = client.call(
                "POST",
                "flows/filter",
                {"flows": {"id": {"any_": ids[start : start + PAGE]}}, "limit": PAGE},
            )
            names.update({str(f.get("id")): str(f.get("name")) for f in _dicts(flows)})
        for d in found:
            d["flow_name"] = names.get(str(d.get("flow_id")), "?")
        facts.deployments = found

    def read_limits() -> None:
        got = _dicts(client.pages("v2/concurrency_limits/filter", {}))
        facts.limits = {str(g.get("name")): g for g in got}

    def read_automations() -> None:
        facts.automations = _dicts(
            client.call(
                "POST",
                "automations/filter",
                {"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}, "limit": PAGE},
            )
        )

    part("pool", read_pool)
    part("deployments", read_deployments)
    part("limits", read_limits)
    part("automations", read_automations)
    return facts
