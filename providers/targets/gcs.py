"""Google Cloud Storage (and fake-gcs-server) via google-cloud-storage and its auth session.

Exports stream through a resumable upload session fed chunk by chunk (chunks are multiples of
256 KiB, 16 MiB by default): one chunk uploads while the next fills, so memory stays at a few
chunks. The object appears only when the session is finalized; an aborted run cancels the session
(DELETE on the session URI) so nothing becomes visible. A killed run's session is not an object,
cannot be listed (only its URI, which died with the run, names it) and expires one week after it
began: ``pending_uploads`` has nothing to find here. (XML API multipart uploads and compose parts,
which would be listable or real objects, are not used.)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from urllib.parse import quote

from pydantic import SecretStr

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    HyperSDKError,
    InvalidParameterError,
    ObjectNotFoundError,
    TargetError,
)
from hypersdk.models import ObjectInfo
from providers.base import ObjectWriter, PendingUpload, Target
from providers.targets._common import (
    MiB,
    PartUploadWriter,
    RangedObjectReader,
    choose,
    join_key,
    split_url,
    strip_prefix,
)

STORAGE_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
CHUNK_ALIGN = 256 * 1024
DEFAULT_CHUNK = 16 * MiB
GOOGLE_API = "https://storage.googleapis.com"


class _HTTPError(Exception):
    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"HTTP {status}: {text[:200]}")


class GCSResumableWriter(PartUploadWriter):
    """Chunks go up in order (one worker); the session is finalized by ``bytes */TOTAL``."""

    def __init__(self, target: GCSTarget, name: str, chunk: int):
        super().__init__(
            target.location(strip_prefix(target.prefix, name)), chunk, workers=1, max_inflight=2
        )
        self._t = target
        self._key = name
        self._session_uri: str | None = None
        self._sent = 0

    def _begin(self) -> None:
        meta = {"name": self._key}
        if self._t.storage_class:
            meta["storageClass"] = self._t.storage_class
        url = (
            f"{self._t.endpoint}/upload/storage/v1/b/{quote(self._t.bucket, safe='')}/o"
            f"?uploadType=resumable&name={quote(self._key, safe='')}"
        )
        with self._t.errors(self._key, upload=True):
            resp = self._t.http(
                "POST",
                url,
                data=json.dumps(meta),
                headers={
                    "Content-Type": "application/json; charset=UTF-8",
                    "X-Upload-Content-Type": "application/octet-stream",
                },
                ok=(200, 201),
            )
        self._session_uri = resp.headers["Location"]

    def _upload_part(self, number: int, data: bytes) -> int:
        start = self._sent
        end = start + len(data) - 1
        with self._t.errors(self._key, upload=True):
            self._t.http(
                "PUT",
                self._session_uri,
                data=data,
                headers={"Content-Range": f"bytes {start}-{end}/*"},
                ok=(308, 200, 201),
            )
        self._sent = end + 1
        return len(data)

    def _complete(self, results: list) -> None:
        total = sum(results)
        with self._t.errors(self._key, upload=True):
            self._t.http(
                "PUT",
                self._session_uri,
                data=b"",
                headers={"Content-Range": f"bytes */{total}"},
                ok=(200, 201),
            )

    def _put_single(self, data: bytes) -> None:
        blob = self._t.bucket_obj.blob(self._key)
        if self._t.storage_class:
            blob.storage_class = self._t.storage_class
        with self._t.errors(self._key, upload=True):
            blob.upload_from_string(
                data,
                content_type="application/octet-stream",
                timeout=self._t.timeout,
                retry=self._t.retry,
            )

    def _cancel(self) -> None:
        if self._session_uri:
            # GCS answers 499 to a cancelled session; an error here only means it expires in 7 days
            with contextlib.suppress(Exception):
                self._t.session.request("DELETE", self._session_uri, timeout=self._t.timeout)


class GCSRangeReader(RangedObjectReader):
    def __init__(self, target: GCSTarget, name: str, size: int):
        super().__init__(target.location(strip_prefix(target.prefix, name)), size)
        self._t = target
        self._key = name
        self._blob = target.bucket_obj.blob(name)

    def _fetch(self, offset: int, end: int) -> bytes:
        with self._t.errors(self._key):
            return self._blob.download_as_bytes(
                start=offset,
                end=end - 1,
                checksum=None,
                timeout=self._t.timeout,
                retry=self._t.retry,
            )


class GCSTarget(Target):
    """``gs://bucket/prefix`` (or ``gcs://``). Options: endpoint (API endpoint, e.g. an emulator;
    default STORAGE_EMULATOR_HOST, else Google), anonymous (default True for an emulator),
    credentials_file / credentials_json (service account; else GOOGLE_APPLICATION_CREDENTIALS or
    ADC), project, storage_class, chunk_size, connect_timeout, read_timeout, retry_seconds."""

    schemes = ("gs", "gcs")

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        anonymous: bool | None = None,
        credentials_file: str | None = None,
        credentials_json: SecretStr | str | None = None,
        project: str | None = None,
        storage_class: str | None = None,
        chunk_size: int | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        retry_seconds: float = 20,
    ):
        from google.api_core.retry import Retry
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.bucket = bucket
        self.prefix = prefix
        self.storage_class = choose(storage_class, STORAGE_CLASSES, "GCS storage class")
        chunk = chunk_size or DEFAULT_CHUNK
        if chunk <= 0 or chunk % CHUNK_ALIGN:
            raise InvalidParameterError(
                f"GCS chunk_size must be a multiple of 256 KiB, got {chunk}"
            )
        self.chunk_size = chunk
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = endpoint or emulator or GOOGLE_API
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        self.endpoint = endpoint.rstrip("/")
        self.is_emulator = self.endpoint != GOOGLE_API
        if anonymous is None:
            anonymous = self.is_emulator and not (credentials_file or credentials_json)
        creds, project = self._credentials(anonymous, credentials_file, credentials_json, project)
        self.timeout = (connect_timeout, read_timeout)
        self.retry: Retry = DEFAULT_RETRY.with_timeout(retry_seconds)
        self._retry_seconds = retry_seconds
        self.client = storage.Client(
            project=project or "hypersdk",
            credentials=creds,
            client_options={"api_endpoint": self.endpoint},
        )
        self.bucket_obj = self.client.bucket(bucket)
        self.session = AuthorizedSession(creds)

    @staticmethod
    def _credentials(anonymous, credentials_file, credentials_json, project):
        import google.auth
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.oauth2 import service_account

        scopes = ["https://www.googleapis.com/auth/devstorage.read_write"]
        if anonymous:
            return AnonymousCredentials(), project
        try:
            if credentials_json is not None:
                raw = (
                    credentials_json.get_secret_value()
                    if isinstance(credentials_json, SecretStr)
                    else credentials_json
                )
                info = json.loads(raw)
                creds = service_account.Credentials.from_service_account_info(info, scopes=scopes)
                return creds, project or info.get("project_id")
            if credentials_file:
                creds = service_account.Credentials.from_service_account_file(
                    credentials_file, scopes=scopes
                )
                return creds, project or creds.project_id
            creds, default_project = google.auth.default(scopes=scopes)
            return creds, project or default_project
        except (DefaultCredentialsError, ValueError, KeyError, OSError) as exc:
            source = credentials_file or (
                "credentials_json" if credentials_json is not None else "application default"
            )
            raise CredentialsError(
                f"GCS: cannot load credentials from {source}: {type(exc).__name__} (set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON file, or run "
                "'gcloud auth application-default login')"
            ) from None

    @classmethod
    def from_url(cls, url: str, **options) -> GCSTarget:
        bucket, prefix = split_url(url, cls.schemes)
        return cls(bucket, prefix, **options)

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}".rstrip("/")

    def http(self, method: str, url: str, ok: tuple[int, ...], **kwargs):
        """One request on the authorized session, retried on 429/5xx/connection errors
        within ``retry_seconds``."""
        import requests

        deadline = time.monotonic() + self._retry_seconds
        delay = 0.5
        while True:
            try:
                resp = self.session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.ConnectionError:
                if time.monotonic() + delay > deadline:
                    raise
            else:
                if resp.status_code in ok:
                    return resp
                if resp.status_code not in (408, 429, 500, 502, 503, 504) or (
                    time.monotonic() + delay > deadline
                ):
                    raise _HTTPError(resp.status_code, resp.text)
            time.sleep(delay)
            delay = min(delay * 2, 4)

    @contextlib.contextmanager
    def errors(self, name: str | None = None, upload: bool = False) -> Iterator[None]:
        import requests
        from google.api_core import exceptions as gexc
        from google.auth.exceptions import GoogleAuthError

        what = f"gs://{self.bucket}/{name}" if name else f"gs://{self.bucket}"
        where = f" (endpoint {self.endpoint})"
        try:
            yield
        except HyperSDKError:
            raise
        except (_HTTPError, gexc.GoogleAPICallError) as exc:
            status = exc.status if isinstance(exc, _HTTPError) else exc.code
            if status == 404:
                if upload or name is None or not self._bucket_exists():
                    raise TargetError(f"gs://{self.bucket}: bucket does not exist{where}") from None
                raise ObjectNotFoundError(f"{what}: no such object{where}") from None
            if status in (401, 403):
                raise CredentialsError(
                    f"{what}: credentials rejected (HTTP {status}){where}"
                ) from None
            raise TargetError(f"{what}: {exc}{where}") from None
        except GoogleAuthError as exc:
            raise CredentialsError(f"{what}: credentials rejected ({type(exc).__name__})") from None
        except (requests.ConnectionError, requests.Timeout, gexc.RetryError) as exc:
            raise EndpointUnreachableError(
                f"{what}: cannot reach GCS endpoint {self.endpoint}: {type(exc).__name__}"
            ) from None

    def _bucket_exists(self) -> bool:
        try:
            return self.bucket_obj.exists(timeout=self.timeout, retry=self.retry)
        except Exception:
            return True  # cannot tell: let the caller report the original error

    def check(self) -> None:
        with self.errors():
            self.client.get_bucket(self.bucket, timeout=self.timeout, retry=self.retry)

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        return GCSResumableWriter(self, join_key(self.prefix, key), self.chunk_size)

    def blob_info(self, key: str):
        """The object's metadata (size, storage_class...) as the server reports it."""
        name = join_key(self.prefix, key)
        with self.errors(name):
            blob = self.bucket_obj.get_blob(name, timeout=self.timeout, retry=self.retry)
            if blob is None:
                raise gexc_not_found()
        return blob

    def open_reader(self, key: str) -> GCSRangeReader:
        blob = self.blob_info(key)
        return GCSRangeReader(self, blob.name, blob.size)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Upload with ``ifGenerationMatch=0`` (only if no live object has the name): GCS
        answers 412 Precondition Failed when one exists."""
        from google.api_core.exceptions import PreconditionFailed

        name = join_key(self.prefix, key)
        blob = self.bucket_obj.blob(name)
        if self.storage_class:
            blob.storage_class = self.storage_class
        with self.errors(name, upload=True):
            try:
                blob.upload_from_string(
                    data,
                    content_type="application/octet-stream",
                    if_generation_match=0,
                    timeout=self.timeout,
                    retry=self.retry,
                )
            except PreconditionFailed:
                return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self.errors():
            for b in self.client.list_blobs(
                self.bucket, prefix=base + prefix, timeout=self.timeout, retry=self.retry
            ):
                yield ObjectInfo(
                    key=b.name[len(base) :],
                    size=b.size or 0,
                    modified=b.updated,
                    storage_class=b.storage_class,
                )

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Always empty: an unfinished resumable session is no object and no listing shows it
        (see the module); GCS drops it a week after it began."""
        return []

    def abort_upload(self, upload: PendingUpload) -> None:
        raise InvalidParameterError(
            f"{self.location(upload.key)}: GCS lists no unfinished uploads to abort (resumable "
            "sessions expire by themselves)"
        )

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        name = join_key(self.prefix, key)
        with self.errors(name), contextlib.suppress(NotFound):
            self.bucket_obj.delete_blob(name, timeout=self.timeout, retry=self.retry)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
            self.client.close()


def gexc_not_found():
    from google.api_core.exceptions import NotFound

    return NotFound("object not found")


TARGET = GCSTarget
