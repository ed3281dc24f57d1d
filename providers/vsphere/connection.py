"""vSphere connections: credentials, TLS, and one pooled session per host and user.

Credentials come, first match wins, from explicit options, the source URL's user info, a Prefect
Secret block (``secret="block-name"``), then the environment as govc documents it: GOVC_URL (may
embed ``user:pass@``; used only when its host is the source's host, so a password is never sent to
another server), GOVC_USERNAME, GOVC_PASSWORD, GOVC_INSECURE, GOVC_TLS_CA_CERTS.

TLS certificates are verified unless ``insecure`` is asked for explicitly. Flows open a Source per
task; the pool keeps one logged-in session per (host, port, user) for the whole process, checks it
is still alive before handing it out, and logs everything out at exit (or ``logout_all()``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    InvalidParameterError,
    SourceError,
)

if TYPE_CHECKING:  # httpx loads when a vSphere source connects, not at discovery
    import httpx


DEFAULT_PORT = 443
CONNECT_TIMEOUT = 30.0
_TRUE = {"1", "true", "yes", "on"}


class Credentials(BaseModel):
    """Where and how to log in. ``password`` never appears in repr, logs or URLs."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int = DEFAULT_PORT
    user: str
    password: SecretStr
    insecure: bool = False
    ca_file: str | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{self.host}:{self.port}/sdk"


def _split_host(netloc: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:  # the message names the host only: user info may hold a password
        host = netloc.rpartition("@")[2]
        raise InvalidParameterError(f"invalid host or port in {host!r}") from None
    return parts.hostname or "", port


def _govc_url(env) -> tuple[str, int | None, str | None, str | None]:
    """(host, port, user, password) from GOVC_URL, which may be a bare host or a full URL."""
    raw = env.get("GOVC_URL", "").strip()
    if not raw:
        return "", None, None, None
    try:  # messages never quote GOVC_URL: it may hold a password
        parts = urlsplit(raw if "://" in raw else f"https://{raw}")
        port = parts.port
    except ValueError:
        raise InvalidParameterError("GOVC_URL has an invalid host or port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname or "", port, user, password


def _secret_block(name: str) -> tuple[str | None, str | None]:
    """(user, password) from a Prefect Secret block holding a dict/JSON or a bare password."""
    from hypersdk.secrets import load_secret_block

    value = load_secret_block(name, "vSphere")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, value
    if isinstance(value, dict):
        return value.get("username") or value.get("user"), value.get("password")
    raise CredentialsError(f"Secret block {name!r} must hold a password or {{username, password}}")


def resolve_credentials(
    host: str,
    port: int | None = None,
    *,
    user: str | None = None,
    password: str | SecretStr | None = None,
    insecure: bool | None = None,
    ca_file: str | None = None,
    secret: str | None = None,
    env=None,
) -> Credentials:
    env = os.environ if env is None else env
    g_host, g_port, g_user, g_pass = _govc_url(env)
    if not host:
        host, port = g_host, port or g_port
    if not host:
        raise InvalidParameterError("no vSphere host: use vsphere://HOST/... or set GOVC_URL")
    same_host = g_host.lower() == host.lower() and (g_port in (None, port or DEFAULT_PORT))
    if isinstance(password, SecretStr):
        password = password.get_secret_value()
    if secret and (user is None or password is None):
        s_user, s_pass = _secret_block(secret)
        user = user or s_user
        password = password if password is not None else s_pass
    user = user or env.get("GOVC_USERNAME") or (g_user if same_host else None)
    if password is None:
        password = env.get("GOVC_PASSWORD") or (g_pass if same_host else None)
    if not user or password is None:
        raise CredentialsError(
            f"no vSphere credentials for {host}: set GOVC_USERNAME and GOVC_PASSWORD "
            "(or GOVC_URL=https://user:pass@host), or pass user=/password= or secret=BLOCK"
        )
    if insecure is None:
        insecure = env.get("GOVC_INSECURE", "").strip().lower() in _TRUE
    ca_file = ca_file or env.get("GOVC_TLS_CA_CERTS") or None
    return Credentials(
        host=host,
        port=port or DEFAULT_PORT,
        user=user,
        password=SecretStr(password),
        insecure=bool(insecure),
        ca_file=ca_file,
    )


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    if creds.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=creds.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load CA file {creds.ca_file}: {exc}") from None


def _cert_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def connect_error(creds: Credentials, exc: BaseException) -> Exception:
    """Turn a low-level connect failure into one actionable error."""
    from pyVmomi import vim

    cert = _cert_problem(exc)
    if cert is not None:
        return CredentialsError(
            f"TLS certificate of {creds.host}:{creds.port} is not trusted "
            f"({cert.verify_message or cert}): give its CA with GOVC_TLS_CA_CERTS (ca_file=...), "
            "or set GOVC_INSECURE=1 (insecure=True) to skip verification"
        )
    if isinstance(exc, vim.fault.InvalidLogin):
        return CredentialsError(
            f"vSphere login to {creds.host} as {creds.user!r} failed: wrong user name or password"
        )
    if isinstance(exc, vim.fault.NoPermission | vim.fault.NotAuthenticated):
        return CredentialsError(f"vSphere at {creds.host}: {getattr(exc, 'msg', exc)}")
    if isinstance(exc, OSError | http.client.HTTPException | socket.timeout):
        return EndpointUnreachableError(f"cannot reach vSphere at {creds.endpoint}: {exc}")
    return SourceError(f"vSphere at {creds.host}: {getattr(exc, 'msg', None) or exc}")


def _pw_digest(creds: Credentials) -> bytes:
    return hashlib.sha256(creds.password.get_secret_value().encode()).digest()


class Session:
    """One logged-in vSphere API session plus a pooled HTTPS client for datastore/NFC data."""

    def __init__(self, creds: Credentials):
        from pyVim.connect import SmartConnect
        from pyVmomi import vmodl

        self.creds = creds
        self._digest = _pw_digest(creds)
        self._ssl = ssl_context(creds)
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()
        try:
            self.si = SmartConnect(
                host=creds.host,
                port=creds.port,
                user=creds.user,
                pwd=creds.password.get_secret_value(),
                sslContext=self._ssl,
                httpConnectionTimeout=CONNECT_TIMEOUT,
            )
        except (Exception, vmodl.MethodFault) as exc:  # noqa: BLE001 - mapped to typed errors
            raise connect_error(creds, exc) from None
        self.content = self.si.RetrieveContent()
        self.checked = time.monotonic()

    @property
    def cookie(self) -> str:
        """``vmware_soap_session=...`` for HTTP requests (datastore, NFC) of this session."""
        raw = self.si._stub.cookie or ""
        return raw.split(";", 1)[0].strip()

    @property
    def base_url(self) -> str:
        host = f"[{self.creds.host}]" if ":" in self.creds.host else self.creds.host
        return f"https://{host}:{self.creds.port}"

    def http(self) -> httpx.Client:
        """A thread-safe, keep-alive HTTPS client (connection pool shared by all readers)."""
        import httpx

        with self._lock:
            if self._http is None:
                self._http = httpx.Client(
                    verify=self._ssl,
                    timeout=httpx.Timeout(60.0, connect=CONNECT_TIMEOUT),
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
                    follow_redirects=False,
                )
            return self._http

    def alive(self) -> bool:
        try:
            ok = self.content.sessionManager.currentSession is not None
        except Exception:  # noqa: BLE001 - any failure means "not usable"
            ok = False
        if ok:
            self.checked = time.monotonic()
        return ok

    def matches(self, creds: Credentials) -> bool:
        return self._digest == _pw_digest(creds) and self.creds.insecure == creds.insecure

    def logout(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None
        with contextlib.suppress(Exception):  # logging out of a dead session is fine
            self.content.sessionManager.Logout()


_POOL: dict[tuple[str, int, str], Session] = {}
_POOL_LOCK = threading.Lock()


def _key(creds: Credentials) -> tuple[str, int, str]:
    return (creds.host.lower(), creds.port, creds.user)


def get_session(creds: Credentials, pooled: bool = True) -> Session:
    """The pooled live session for this host and user, logging in (again) where needed."""
    if not pooled:
        return Session(creds)
    key = _key(creds)
    with _POOL_LOCK:
        current = _POOL.get(key)
    # one cheap round trip: a dead session is replaced, never handed out
    if current is not None and current.matches(creds) and current.alive():
        return current
    fresh = Session(creds)
    with _POOL_LOCK:
        old = _POOL.get(key)
        _POOL[key] = fresh
    if old is not None and old is not fresh:
        old.logout()
    return fresh


def refresh_session(session: Session) -> Session:
    """A live session in place of ``session`` (after NotAuthenticated or an HTTP 401)."""
    with _POOL_LOCK:
        if _POOL.get(_key(session.creds)) is session:
            del _POOL[_key(session.creds)]
    return get_session(session.creds)


def logout_all() -> None:
    """Log every pooled session out (runs at interpreter exit)."""
    with _POOL_LOCK:
        sessions = list(_POOL.values())
        _POOL.clear()
    for s in sessions:
        s.logout()


atexit.register(logout_all)


def wait_task(task, what: str, timeout: float = 3600.0):
    """Wait for a vSphere task; its fault is re-raised as is (callers map it)."""
    delay = 0.05
    deadline = time.monotonic() + timeout
    while True:
        info = task.info
        if info.state == "success":
            return info.result
        if info.state == "error":
            raise info.error
        if time.monotonic() > deadline:
            raise SourceError(
                f"{what}: vSphere task {task._moId} still running after {timeout:.0f} s"
            )
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def fault_message(exc: BaseException) -> str:
    """The human part of a vSphere fault (``msg`` or the localized message)."""
    msg = getattr(exc, "msg", None)
    if not msg:
        lm = getattr(exc, "faultMessage", None) or []
        msg = "; ".join(m.message for m in lm if getattr(m, "message", None))
    return msg or type(exc).__name__.rsplit(".", 1)[-1]
