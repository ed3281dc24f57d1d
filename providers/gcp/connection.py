"""Options, credentials and API clients of the GCP source, and its errors as typed ones.

Credentials come from Application Default Credentials only (``google.auth.default``: the
GOOGLE_APPLICATION_CREDENTIALS file, ``gcloud auth application-default login``, or the metadata
server of a GCE/GKE worker). No credential is ever taken from the URL (providers.split_options
refuses secret options) nor written anywhere: the clients hold them in memory.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    HyperSDKError,
    InvalidParameterError,
    SourceError,
    VMNotFoundError,
)
from hypersdk.options import reject_unknown_options

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
COMPUTE_API = "https://compute.googleapis.com"
STORAGE_API = "https://storage.googleapis.com"
CLOUDBUILD_API = "https://cloudbuild.googleapis.com"
# the builder `gcloud compute images export` runs (compute-image-import's gce_vm_image_export)
EXPORT_BUILDER = "gcr.io/compute-image-import/gce_vm_image_export:release"
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|[a-z0-9.:-]{1,63}")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


@dataclass(frozen=True)
class GcpOptions:
    """What a ``gcp://PROJECT/ZONE?...`` URL carries (no secrets: those are refused)."""

    project: str
    zone: str
    export_bucket: str | None = None
    export_prefix: str = "hypersdk-gcp"
    compute_endpoint: str = COMPUTE_API
    storage_endpoint: str = STORAGE_API
    cloudbuild_endpoint: str = CLOUDBUILD_API
    export_builder: str = EXPORT_BUILDER
    export_timeout: float = 7200.0  # seconds a Cloud Build export may take (gcloud: 2h)
    poll_seconds: float = 2.0
    stale_after: float = 86400.0  # leftovers of a killed run older than this are removed
    chunk_size: int = 16 * 1024 * 1024  # bytes per ranged GET of the exported image

    @classmethod
    def parse(cls, project: str, zone: str, options: dict[str, Any]) -> GcpOptions:
        if not _PROJECT.fullmatch(project or ""):
            raise InvalidParameterError(f"gcp source: {project[:80]!r} is not a project id")
        if not _ZONE.fullmatch(zone or ""):
            raise InvalidParameterError(
                f"gcp source: {zone[:80]!r} is not a zone (gcp://PROJECT/ZONE, e.g. "
                "gcp://my-project/europe-west1-b)"
            )
        known = set(cls.__dataclass_fields__) - {"project", "zone"}
        reject_unknown_options("gcp source", options, known)
        values: dict[str, Any] = {}
        for name, value in options.items():
            kind = cls.__dataclass_fields__[name].type
            if kind in ("float", "int"):
                try:
                    value = float(value) if kind == "float" else int(value)
                except (TypeError, ValueError):
                    raise InvalidParameterError(f"gcp source: {name} must be a number") from None
                if value <= 0:
                    raise InvalidParameterError(f"gcp source: {name} must be positive")
            else:
                value = str(value)
            if name.endswith("_endpoint"):
                if not re.fullmatch(r"https?://[^\s/?#@]+", value.rstrip("/")):
                    raise InvalidParameterError(
                        f"gcp source: {name} must be http(s)://host[:port], got {value[:80]!r}"
                    )
                value = value.rstrip("/")
            values[name] = value
        bucket = values.get("export_bucket")
        if bucket is not None and not _BUCKET.fullmatch(bucket):
            raise InvalidParameterError(f"gcp source: {bucket[:80]!r} is not a bucket name")
        prefix = values.get("export_prefix")
        if prefix is not None and not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", prefix):
            raise InvalidParameterError("gcp source: export_prefix must be a/b/c of plain names")
        return cls(project=project, zone=zone, **values)


def default_credentials():
    """Application Default Credentials, or one CredentialsError line saying how to set them."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        creds, _ = google.auth.default(scopes=SCOPES)
    except (DefaultCredentialsError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        first = first.split(". To set up", 1)[0]  # google-auth's own advice: ours follows
        if len(first) > 160:  # a long reason ends at a word, not mid-word
            first = first[:160].rsplit(" ", 1)[0] + "..."
        raise CredentialsError(
            f"GCP: no usable Application Default Credentials ({first}): set "
            "GOOGLE_APPLICATION_CREDENTIALS to a credentials file, or run "
            "'gcloud auth application-default login'"
        ) from None
    return creds


class Clients:
    """The REST clients one source uses, built lazily on one set of credentials."""

    def __init__(self, opts: GcpOptions):
        self.opts = opts
        self._creds = None
        self._built: dict[str, Any] = {}

    @property
    def credentials(self):
        if self._creds is None:
            self._creds = default_credentials()
        return self._creds

    def compute(self, name: str):
        """``instances``, ``machine_types``, ``disks``, ``snapshots``, ``images``."""
        if name not in self._built:
            credentials = self.credentials  # first: no credentials fails before the slow import
            from google.api_core.client_options import ClientOptions
            from google.cloud import compute_v1

            cls = {
                "instances": compute_v1.InstancesClient,
                "machine_types": compute_v1.MachineTypesClient,
                "disks": compute_v1.DisksClient,
                "snapshots": compute_v1.SnapshotsClient,
                "images": compute_v1.ImagesClient,
                "global_operations": compute_v1.GlobalOperationsClient,
            }[name]
            self._built[name] = cls(
                credentials=credentials,
                client_options=ClientOptions(api_endpoint=self.opts.compute_endpoint),
            )
        return self._built[name]

    @property
    def storage(self):
        if "storage" not in self._built:
            from google.cloud import storage

            self._built["storage"] = storage.Client(
                project=self.opts.project,
                credentials=self.credentials,
                client_options={"api_endpoint": self.opts.storage_endpoint},
            )
        return self._built["storage"]

    @property
    def session(self):
        """An authorized HTTP session (Cloud Build's REST API: no client library needed)."""
        if "session" not in self._built:
            from google.auth.transport.requests import AuthorizedSession

            self._built["session"] = AuthorizedSession(self.credentials)
        return self._built["session"]

    def bucket(self):
        if not self.opts.export_bucket:
            raise InvalidParameterError(
                "gcp source: an export needs ?export_bucket=BUCKET (a GCS bucket in the project "
                "the image export writes to)"
            )
        return self.storage.bucket(self.opts.export_bucket)

    def close(self) -> None:
        for client in self._built.values():
            with contextlib.suppress(Exception):
                (getattr(client, "close", None) or (lambda: None))()
            transport = getattr(client, "_transport", None)
            with contextlib.suppress(Exception):
                transport.close()
        self._built.clear()


def _message(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:200]


@contextlib.contextmanager
def api_errors(
    what: str, endpoint: str, missing: type[HyperSDKError] = SourceError
) -> Iterator[None]:
    """Google API failures as typed one-line errors: 404 is ``missing`` (VMNotFoundError for a
    VM), 401/403 CredentialsError, unreachable endpoints EndpointUnreachableError."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError, RefreshError

    try:
        yield
    except HyperSDKError:
        raise
    except gexc.NotFound as exc:
        raise missing(f"{what}: not found ({_message(exc)})") from None
    except (gexc.Unauthorized, gexc.Forbidden) as exc:
        raise CredentialsError(f"{what}: credentials rejected ({_message(exc)})") from None
    except (RefreshError, GoogleAuthError) as exc:
        raise CredentialsError(
            f"{what}: cannot get an access token ({type(exc).__name__})"
        ) from None
    except (requests.ConnectionError, requests.Timeout, gexc.RetryError) as exc:
        raise EndpointUnreachableError(
            f"{what}: cannot reach {endpoint} ({type(exc).__name__})"
        ) from None
    except (gexc.ServiceUnavailable, gexc.TooManyRequests, gexc.InternalServerError) as exc:
        raise EndpointUnreachableError(f"{what}: {endpoint} answered {_message(exc)}") from None
    except gexc.GoogleAPICallError as exc:
        raise SourceError(f"{what}: {_message(exc)}") from None


def wait_operation(clients: Clients, op: Any, what: str, timeout: float) -> None:
    """Wait for a global Compute operation (``insert_unary``/``delete_unary``'s answer) by
    ``globalOperations.wait``, which returns when it is DONE or after about two minutes.

    Not the ExtendedOperation the plain ``insert`` returns: its poller is a second client built
    without our client options, so it always asks compute.googleapis.com (an emulator, a
    private endpoint or a regional one would never be asked)."""
    from google.api_core import exceptions as gexc

    deadline = time.monotonic() + timeout
    ops = clients.compute("global_operations")
    try:
        while op.status != op.Status.DONE:
            if time.monotonic() > deadline:
                raise SourceError(f"{what}: not done after {timeout:.0f} s")
            op = ops.wait(project=clients.opts.project, operation=op.name)
            if op.status != op.Status.DONE:
                time.sleep(clients.opts.poll_seconds)
    except gexc.GoogleAPICallError as exc:
        raise SourceError(f"{what} failed: {_message(exc)}") from None
    if op.error and op.error.errors:
        first = op.error.errors[0]
        code = op.http_error_status_code
        message = f"{first.code}: {first.message}"[:200]
        if code == 404:
            raise gexc.NotFound(message)
        raise SourceError(f"{what} failed: {message}")


__all__ = [
    "Clients",
    "GcpOptions",
    "VMNotFoundError",
    "api_errors",
    "default_credentials",
    "wait_operation",
]
