"""boto3 sessions and clients for one region, AWS errors as typed errors, and backoff.

Credentials come only from boto3's default chain (environment, shared credentials and config
files with ``profile``, container or instance role): never from a URL, an option or a log line.
One ``endpoint_url`` serves EC2 and EBS both (an emulator, a VPC endpoint).

EC2 calls retry throttling through botocore (standard mode: backoff with jitter). EBS data calls
(list and get of blocks) are retried here instead (``with_backoff``): full jitter on an
exponential step from ``backoff`` seconds, so the test suite can make the step tiny and a
throttled block never waits behind botocore's fixed base of one second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    HyperSDKError,
    InvalidParameterError,
    SourceError,
    VMNotFoundError,
)
from hypersdk.options import reject_unknown_options
from hypersdk.urls import redact_url
from providers.aws.errors import ThrottledError

log = logging.getLogger(__name__)
T = TypeVar("T")

THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalServerException",
        "InternalError",
    }
)
TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "OptInRequired",
    }
)
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
OPTIONS = frozenset(
    {
        "endpoint_url",
        "profile",
        "workers",
        "attempts",
        "backoff",
        "snapshot_timeout",
        "keep_snapshots",
        "connect_timeout",
        "read_timeout",
    }
)


# One botocore data loader for the process: it caches the parsed service models (EC2's takes a
# second or more to load) while every Settings still gets its own session, so credentials are
# resolved from the chain afresh each time a source is opened.
_LOADER: list = []
_LOADER_LOCK = threading.Lock()


def _session(profile: str | None, region: str):
    import boto3
    import botocore.loaders
    import botocore.session

    with _LOADER_LOCK:
        if not _LOADER:
            _LOADER.append(botocore.loaders.create_loader())
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER[0])
    return boto3.session.Session(botocore_session=core, profile_name=profile, region_name=region)


@functools.cache
def _known_regions() -> frozenset[str]:
    import boto3

    session = boto3.session.Session()
    known: set[str] = set()
    for partition in session.get_available_partitions():
        known.update(session.get_available_regions("ec2", partition))
    return frozenset(known)


def check_region(region: str) -> str:
    """``region`` if botocore knows it in some partition (aws, aws-cn, aws-us-gov...), else one
    InvalidParameterError line: an unknown region would only fail later as a DNS error."""
    region = (region or "").strip().lower()
    if not region:
        raise InvalidParameterError("aws:// URL names no region (aws://us-east-1)")
    known = _known_regions()
    if not _REGION.fullmatch(region) or (known and region not in known):
        raise InvalidParameterError(
            f"unknown AWS region {region[:40]!r} (e.g. us-east-1, eu-west-1; botocore knows "
            f"{len(known)} regions)"
        )
    return region


@dataclass
class Settings:
    """What an ``aws://`` or ``ebs://`` URL's query sets (no credentials ever)."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None
    workers: int = 8  # GetSnapshotBlock calls in flight per disk
    attempts: int = 8  # tries of a throttled or failed data call
    backoff: float = 0.2  # first backoff step of a data call, seconds (doubles, full jitter)
    snapshot_timeout: float = 3600.0  # how long to wait for EBS snapshots to complete
    keep_snapshots: int = 1  # committed snapshots kept per volume (besides their bases)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _session: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_options(cls, region: str, options: dict, what: str) -> Settings:
        reject_unknown_options(what, options, OPTIONS)
        s = cls(check_region(region))
        if options.get("endpoint_url"):
            s.endpoint_url = str(options["endpoint_url"])
        if options.get("profile"):
            s.profile = str(options["profile"])
        try:
            s.workers = int(options.get("workers", s.workers))
            s.attempts = int(options.get("attempts", s.attempts))
            s.backoff = float(options.get("backoff", s.backoff))
            s.snapshot_timeout = float(options.get("snapshot_timeout", s.snapshot_timeout))
            s.keep_snapshots = int(options.get("keep_snapshots", s.keep_snapshots))
            s.connect_timeout = float(options.get("connect_timeout", s.connect_timeout))
            s.read_timeout = float(options.get("read_timeout", s.read_timeout))
        except (TypeError, ValueError):
            raise InvalidParameterError(f"{what}: numeric options must be numbers") from None
        if not 1 <= s.workers <= 64:
            raise InvalidParameterError(f"{what}: workers must be 1..64 (got {s.workers})")
        if not 1 <= s.attempts <= 20 or not 0 <= s.backoff <= 60 or s.keep_snapshots < 1:
            raise InvalidParameterError(
                f"{what}: attempts must be 1..20, backoff 0..60 s, keep_snapshots at least 1"
            )
        if not 1 <= s.snapshot_timeout <= 86400:
            raise InvalidParameterError(f"{what}: snapshot_timeout must be 1..86400 s")
        return s

    def query(self) -> str:
        """The options worth showing in a URL (never a credential: there is none here)."""
        parts = []
        if self.endpoint_url:
            parts.append(f"endpoint_url={redact_url(self.endpoint_url)}")
        if self.profile:
            parts.append(f"profile={self.profile}")
        return "?" + "&".join(parts) if parts else ""

    def client(self, service: str):
        """One client per service, shared by threads (boto3 clients are thread-safe)."""
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._make(service)
            return self._clients[service]

    def _make(self, service: str):
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        if service == "ebs":  # data calls: retried by with_backoff, one pool slot per worker
            retries = {"total_max_attempts": 1}
            pool = max(10, self.workers + 4)
        else:
            retries = {"mode": "standard", "total_max_attempts": max(2, self.attempts)}
            pool = 10
        config = Config(
            retries=retries,
            max_pool_connections=pool,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            user_agent_extra="hypersdk",
        )
        try:
            if self._session is None:  # under self._lock (see client)
                self._session = _session(self.profile, self.region)
            return self._session.client(service, endpoint_url=self.endpoint_url, config=config)
        except BotoCoreError as exc:  # an unknown profile, a broken config file
            raise CredentialsError(f"AWS {service} client for {self.region}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                with contextlib.suppress(Exception):
                    c.close()
            self._clients.clear()


def error_code(exc: BaseException) -> tuple[str, int]:
    """(AWS error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_throttle(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, status = error_code(exc)
    return code in THROTTLE_CODES or status in TRANSIENT_STATUS or status == 429


def _connection_error(exc: BaseException) -> bool:
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )
    from urllib3.exceptions import ProtocolError

    return isinstance(
        exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError | ProtocolError
    )


def typed(exc: BaseException, what: str) -> HyperSDKError:
    """A boto3/botocore failure of ``what`` as one typed, readable error."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(exc, HyperSDKError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return CredentialsError(
            f"{what}: no AWS credentials found (boto3's chain: AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, the shared credentials and config files, an instance or "
            "container role)"
        )
    if isinstance(exc, ProfileNotFound):
        return CredentialsError(f"{what}: {exc}")
    if isinstance(exc, NoRegionError):
        return InvalidParameterError(f"{what}: no region")
    if _connection_error(exc):
        return EndpointUnreachableError(f"{what}: cannot reach AWS: {exc}")
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "")).strip()[:300]
        text = f"{what}: {code or status}" + (f": {message}" if message else "")
        if code in CREDENTIAL_CODES or status in (401, 403):
            return CredentialsError(text)
        if code.startswith("InvalidInstanceID"):
            return VMNotFoundError(text)
        if is_throttle(exc):
            return ThrottledError(text)
        return SourceError(text)
    if isinstance(exc, BotoCoreError):
        return SourceError(f"{what}: {exc}")
    if isinstance(exc, OSError):
        return EndpointUnreachableError(f"{what}: {exc.strerror or exc}")
    return SourceError(f"{what}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Turn boto3 failures inside the block into typed errors naming ``what``."""
    try:
        yield
    except HyperSDKError:
        raise
    except Exception as exc:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, BotoCoreError | ClientError) or _connection_error(exc):
            raise typed(exc, what) from None
        raise


def with_backoff(
    call: Callable[[], T],
    what: str,
    attempts: int,
    backoff: float,
    cap: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried again after throttling, a 5xx answer or a dropped connection, up to
    ``attempts`` times, waiting a random time up to ``backoff * 2**n`` (capped) before try
    ``n + 1`` ("full jitter": concurrent workers spread out instead of retrying in step)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for n in range(attempts):
        try:
            return call()
        except (ClientError, BotoCoreError, OSError) as exc:
            transient = is_throttle(exc) or _connection_error(exc) or isinstance(exc, OSError)
            if not transient or n == attempts - 1:
                raise typed(exc, what) from None
            delay = random.uniform(0, min(cap, backoff * 2**n))
            log.debug(
                "%s: %s, try %d of %d in %.2f s", what, error_code(exc), n + 2, attempts, delay
            )
            sleep(delay)
    raise AssertionError("unreachable")
