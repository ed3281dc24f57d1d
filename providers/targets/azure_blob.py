"""Azure Blob Storage (and Azurite) via azure-storage-blob.

Exports stream as a staged block blob: blocks are staged in parallel (bounded in memory) and the
blob appears only when ``commit_block_list`` runs. An aborted run simply never commits: staged
blocks are invisible, yet stored and billed until Azure discards them, 7 days after the last
block was staged. A killed run leaves them as an *uncommitted blob*: ``pending_uploads`` lists
those and ``abort_upload`` discards one at once (an empty block list committed only if no blob
is there, then that empty blob deleted).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
from collections.abc import Iterator

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

TIERS = ("Hot", "Cool", "Cold", "Archive")
DEFAULT_BLOCK = 8 * MiB
MAX_BLOCK = 4000 * MiB
MAX_BLOCKS = 50_000


def _secret(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def choose_block_size(expected_size: int | None, block_size: int | None = None) -> int:
    size = block_size or DEFAULT_BLOCK
    if expected_size:
        size = max(size, math.ceil(expected_size / MAX_BLOCKS))
    size = math.ceil(size / MiB) * MiB
    if not MiB <= size <= MAX_BLOCK:
        raise InvalidParameterError(f"Azure block size must be 1 MiB..4000 MiB, got {size}")
    return size


class AzureBlockWriter(PartUploadWriter):
    def __init__(self, target: AzureBlobTarget, name: str, block_size: int):
        super().__init__(
            target.location(strip_prefix(target.prefix, name)),
            block_size,
            workers=target.workers,
            max_inflight=target.max_inflight,
        )
        self._t = target
        self._blob = target.container.get_blob_client(name)
        self._key = name
        self._tag = os.urandom(6).hex()

    def _begin(self) -> None:
        pass  # a block blob needs no session: staged blocks are keyed by the blob name

    def _upload_part(self, number: int, data: bytes) -> str:
        # same-length ids (Azure requires it); the random tag keeps a retry's blocks apart
        block_id = base64.b64encode(f"{self._tag}-{number:06d}".encode()).decode()
        with self._t.errors(self._key):
            self._blob.stage_block(block_id, data, length=len(data))
        return block_id

    def _complete(self, results: list) -> None:
        from azure.storage.blob import BlobBlock

        with self._t.errors(self._key):
            self._blob.commit_block_list(
                [BlobBlock(block_id=b) for b in results], standard_blob_tier=self._t.tier
            )

    def _put_single(self, data: bytes) -> None:
        with self._t.errors(self._key):
            self._blob.upload_blob(data, overwrite=True, standard_blob_tier=self._t.tier)

    def _cancel(self) -> None:
        pass  # nothing was committed: uncommitted blocks are never visible and expire


class AzureRangeReader(RangedObjectReader):
    def __init__(self, target: AzureBlobTarget, name: str, size: int):
        super().__init__(target.location(strip_prefix(target.prefix, name)), size)
        self._t = target
        self._key = name
        self._blob = target.container.get_blob_client(name)

    def _fetch(self, offset: int, end: int) -> bytes:
        with self._t.errors(self._key):
            return self._blob.download_blob(
                offset=offset, length=end - offset, max_concurrency=1
            ).readall()


class AzureBlobTarget(Target):
    """``az://container/prefix`` (or ``azure://``). Credentials, first found wins: options
    connection_string / account_url+account_key / account_url+sas_token / secret_block (a Prefect
    Secret block holding a connection string), then env AZURE_STORAGE_CONNECTION_STRING,
    AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN. Other options: account,
    account_url (custom endpoint, e.g. Azurite), tier, block_size, workers, max_inflight,
    connect_timeout, read_timeout, max_attempts."""

    schemes = ("az", "azure")

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        account: str | None = None,
        account_url: str | None = None,
        account_key: SecretStr | str | None = None,
        sas_token: SecretStr | str | None = None,
        connection_string: SecretStr | str | None = None,
        secret_block: str | None = None,
        tier: str | None = None,
        block_size: int | None = None,
        workers: int = 4,
        max_inflight: int = 4,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 3,
    ):
        from azure.storage.blob import BlobServiceClient, LinearRetry

        self.container_name = container
        self.prefix = prefix
        tier = choose(tier, TIERS, "Azure access tier")
        self.tier_name = tier
        self.tier = None
        if tier is not None:
            from azure.storage.blob import StandardBlobTier

            self.tier = StandardBlobTier(tier)
        self._block_opt = block_size
        choose_block_size(None, block_size)  # validates
        if workers < 1 or max_inflight < 1:
            raise InvalidParameterError("workers and max_inflight must be >= 1")
        self.workers, self.max_inflight = workers, max_inflight

        conn = _secret(connection_string)
        if secret_block:
            conn = self._load_secret_block(secret_block)
        key, sas = _secret(account_key), _secret(sas_token)
        env = os.environ
        if not (conn or key or sas):
            conn = env.get("AZURE_STORAGE_CONNECTION_STRING")
            if not conn:
                account = account or env.get("AZURE_STORAGE_ACCOUNT")
                key = env.get("AZURE_STORAGE_KEY")
                sas = env.get("AZURE_STORAGE_SAS_TOKEN")
        account = account or env.get("AZURE_STORAGE_ACCOUNT")
        if not account_url and account and not conn:
            account_url = f"https://{account}.blob.core.windows.net"
        retry = LinearRetry(backoff=0.5, random_jitter_range=0.2, retry_total=max_attempts - 1)
        kwargs = {
            "retry_policy": retry,
            "connection_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_single_put_size": 64 * MiB,
        }
        if conn:
            try:
                svc = BlobServiceClient.from_connection_string(conn, **kwargs)
            except ValueError:
                raise CredentialsError("Azure: the connection string is malformed") from None
        elif account_url and key:
            from azure.core.credentials import AzureNamedKeyCredential

            name = account or _account_from_url(account_url)
            svc = BlobServiceClient(
                account_url, credential=AzureNamedKeyCredential(name, key), **kwargs
            )
        elif account_url and sas:
            from azure.core.credentials import AzureSasCredential

            svc = BlobServiceClient(
                account_url, credential=AzureSasCredential(sas.lstrip("?")), **kwargs
            )
        else:
            raise CredentialsError(
                "Azure: no credentials (set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT"
                " with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, or pass connection_string / "
                "account_key / sas_token / secret_block)"
            )
        self.service = svc
        self.endpoint = svc.url.rstrip("/")
        self.container = svc.get_container_client(container)

    @staticmethod
    def _load_secret_block(name: str) -> str:
        from hypersdk.secrets import load_secret_block

        value = load_secret_block(name, "Azure")
        return value if isinstance(value, str) else str(value)

    @classmethod
    def from_url(cls, url: str, **options) -> AzureBlobTarget:
        container, prefix = split_url(url, cls.schemes)
        return cls(container, prefix, **options)

    @property
    def url(self) -> str:
        return f"az://{self.container_name}/{self.prefix}".rstrip("/")

    @contextlib.contextmanager
    def errors(self, name: str | None = None) -> Iterator[None]:
        """Azure SDK exceptions -> one-line typed errors naming the container/blob and endpoint."""
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        what = f"az://{self.container_name}/{name}" if name else f"az://{self.container_name}"
        where = f" (endpoint {self.endpoint})"
        try:
            yield
        except HyperSDKError:
            raise
        except ResourceNotFoundError as exc:
            if exc.error_code == "ContainerNotFound":
                raise TargetError(
                    f"az://{self.container_name}: container does not exist{where}"
                ) from None
            raise ObjectNotFoundError(f"{what}: no such blob{where}") from None
        except (ClientAuthenticationError, HttpResponseError) as exc:
            code = getattr(exc.error_code, "value", exc.error_code) or exc.status_code
            if isinstance(exc, ClientAuthenticationError) or exc.status_code in (401, 403):
                raise CredentialsError(f"{what}: credentials rejected ({code}){where}") from None
            raise TargetError(f"{what}: {code}{where}") from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise EndpointUnreachableError(
                f"{what}: cannot reach Azure endpoint {self.endpoint}: {type(exc).__name__}"
            ) from None
        except AzureError as exc:
            raise TargetError(f"{what}: {type(exc).__name__}{where}") from None

    def check(self) -> None:
        with self.errors():
            self.container.get_container_properties()

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        name = join_key(self.prefix, key)
        return AzureBlockWriter(self, name, choose_block_size(expected_size, self._block_opt))

    def properties(self, key: str):
        name = join_key(self.prefix, key)
        with self.errors(name):
            return self.container.get_blob_client(name).get_blob_properties()

    def open_reader(self, key: str) -> AzureRangeReader:
        name = join_key(self.prefix, key)
        from azure.core.exceptions import ResourceNotFoundError

        with self.errors(name):
            try:
                props = self.container.get_blob_client(name).get_blob_properties()
            except ResourceNotFoundError:
                self.check()  # HEAD has no error code: tell a missing container apart
                raise
        return AzureRangeReader(self, name, props.size)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Put Blob with ``If-None-Match: *`` (``overwrite=False``): Azure answers 409
        BlobAlreadyExists (or 412 when another write of the blob races), both
        ResourceExistsError here."""
        from azure.core.exceptions import ResourceExistsError

        name = join_key(self.prefix, key)
        blob = self.container.get_blob_client(name)
        with self.errors(name):
            try:
                blob.upload_blob(data, overwrite=False, standard_blob_tier=self.tier)
            except ResourceExistsError:
                return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self.errors():
            for b in self.container.list_blobs(name_starts_with=base + prefix):
                yield ObjectInfo(
                    key=b.name[len(base) :],
                    size=b.size,
                    modified=b.last_modified,
                    storage_class=str(b.blob_tier) if b.blob_tier else None,
                )

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Uncommitted blobs under ``prefix``: names that have staged blocks and no committed
        blob (the listing with ``uncommittedblobs`` less the plain one). Blocks staged onto a
        name that has a committed blob show in no listing; our writers stage only under keys
        that have none, and Azure discards such blocks after its week anyway."""
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[PendingUpload] = []
        with self.errors():
            committed = {b.name for b in self.container.list_blobs(name_starts_with=base + prefix)}
            for b in self.container.list_blobs(
                name_starts_with=base + prefix, include=["uncommittedblobs"]
            ):
                if b.name in committed:
                    continue
                out.append(
                    PendingUpload(
                        key=b.name[len(base) :],
                        upload_id=b.name,
                        started=b.creation_time or b.last_modified,
                        size=self._staged_bytes(b.name),
                    )
                )
        return out

    def _staged_bytes(self, name: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            _, staged = self.container.get_blob_client(name).get_block_list("uncommitted")
        except ResourceNotFoundError:
            return None
        return sum(b.size for b in staged)

    def abort_upload(self, upload: PendingUpload) -> None:
        """Discard an uncommitted blob's staged blocks: Put Block List with no block and
        ``If-None-Match: *`` (refused if a committed blob is there, which is left as it is)
        turns the name into an empty blob and drops every uncommitted block; that blob is then
        deleted if it is still the one we made."""
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        name = (f"{self.prefix}/" if self.prefix else "") + upload.key
        blob = self.container.get_blob_client(name)
        with self.errors(name):
            try:
                made = blob.commit_block_list([], match_condition=MatchConditions.IfMissing)
            except (ResourceExistsError, ResourceModifiedError):
                return  # a committed blob has this name: not an unfinished upload any more
            with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
                blob.delete_blob(etag=made["etag"], match_condition=MatchConditions.IfNotModified)

    def delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        name = join_key(self.prefix, key)
        with self.errors(name), contextlib.suppress(ResourceNotFoundError):
            self.container.delete_blob(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.service.close()


def _account_from_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.endswith(".blob.core.windows.net"):
        return host.split(".", 1)[0]
    return parts.path.strip("/").split("/", 1)[0]  # Azurite style: http://host:port/account


TARGET = AzureBlobTarget
