"""Amazon S3 and S3-compatible stores (MinIO, Ceph RGW, OCI, Alibaba OSS) via boto3.

Exports stream as a multipart upload straight from the pipeline (no staging file): parts are
uploaded in parallel with a bound on parts in memory; a failed or interrupted run aborts the
upload so no orphan parts are billed. Objects smaller than one part use a single PutObject.
A killed run cannot abort its upload: ``pending_uploads`` lists what such runs left
(ListMultipartUploads) and ``abort_upload`` removes it; a bucket lifecycle rule
AbortIncompleteMultipartUpload is the safety net for uploads nobody cleans up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

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

log = logging.getLogger(__name__)

STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")
SSE_MODES = ("AES256", "aws:kms")
CHECKSUMS = ("CRC32", "CRC32C", "SHA1", "SHA256")
MIN_PART = 5 * MiB
DEFAULT_PART = 8 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
CONFLICT_RETRY_SECONDS = 30  # a concurrent conditional write of the same key settles in that

_CRED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "403",
}


def choose_part_size(expected_size: int | None, part_size: int | None = None) -> int:
    """Parts of at least 5 MiB (8 MiB default), large enough to fit in 10,000 parts."""
    size = part_size or DEFAULT_PART
    if expected_size:
        size = max(size, math.ceil(expected_size / MAX_PARTS))
    size = math.ceil(size / MiB) * MiB  # whole MiB: aligned, readable in logs
    if not MIN_PART <= size <= MAX_PART:
        raise InvalidParameterError(f"S3 part size must be 5 MiB..5 GiB, got {size}")
    return size


class S3ObjectWriter(PartUploadWriter):
    def __init__(self, target: S3Target, key: str, part_size: int, grow: bool):
        super().__init__(
            target.location(key),
            part_size,
            workers=target.workers,
            max_inflight=target.max_inflight,
        )
        self._t = target
        self._key = key
        self._grow = grow  # size unknown: double the part size every 1000 parts
        self._upload_id: str | None = None

    def _next_part_size(self, number: int) -> int:
        if not self._grow:
            return self.part_size
        return min(MAX_PART, self.part_size * 2 ** ((number - 1) // 1000))

    def _begin(self) -> None:
        with self._t.errors(self._key):
            resp = self._t.client.create_multipart_upload(**self._t.put_args(self._key))
        self._upload_id = resp["UploadId"]

    def _upload_part(self, number: int, data: bytes) -> dict:
        args: dict[str, Any] = {
            "Bucket": self._t.bucket,
            "Key": self._key,
            "UploadId": self._upload_id,
            "PartNumber": number,
            "Body": data,
        }
        if self._t.checksum:
            args["ChecksumAlgorithm"] = self._t.checksum
        with self._t.errors(self._key):
            resp = self._t.client.upload_part(**args)
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if self._t.checksum:
            field = f"Checksum{self._t.checksum}"
            if resp.get(field):
                part[field] = resp[field]
        return part

    def _complete(self, results: list) -> None:
        with self._t.errors(self._key):
            self._t.client.complete_multipart_upload(
                Bucket=self._t.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": results},
            )

    def _put_single(self, data: bytes) -> None:
        args = self._t.put_args(self._key)
        args["Body"] = data
        with self._t.errors(self._key):
            self._t.client.put_object(**args)

    def _cancel(self) -> None:
        if self._upload_id is None:
            return
        try:
            self._t.client.abort_multipart_upload(
                Bucket=self._t.bucket, Key=self._key, UploadId=self._upload_id
            )
        except Exception as exc:  # the original error matters more; say what is left behind
            log.warning(
                "%s: could not abort multipart upload %s (%s); a bucket lifecycle rule "
                "AbortIncompleteMultipartUpload will remove its parts",
                self.name,
                self._upload_id,
                type(exc).__name__,
            )


class S3RangeReader(RangedObjectReader):
    """Each read is a GET with a Range header."""

    def __init__(self, target: S3Target, key: str, size: int):
        super().__init__(target.location(strip_prefix(target.prefix, key)), size)
        self._t = target
        self._key = key

    def _fetch(self, offset: int, end: int) -> bytes:
        with self._t.errors(self._key):
            resp = self._t.client.get_object(
                Bucket=self._t.bucket, Key=self._key, Range=f"bytes={offset}-{end - 1}"
            )
            return resp["Body"].read()


class S3Target(Target):
    """``s3://bucket/prefix``. Options: region, endpoint_url, addressing_style ("path" for
    MinIO/Ceph), access_key_id/secret_access_key/session_token (else the boto3 chain),
    profile, storage_class, sse, kms_key_id, checksum, part_size, workers, max_inflight,
    connect_timeout, read_timeout, max_attempts."""

    schemes = ("s3",)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        addressing_style: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: SecretStr | str | None = None,
        session_token: SecretStr | str | None = None,
        profile: str | None = None,
        storage_class: str | None = None,
        sse: str | None = None,
        kms_key_id: str | None = None,
        checksum: str | None = "CRC32",
        part_size: int | None = None,
        workers: int = 4,
        max_inflight: int = 4,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 3,
    ):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.storage_class = choose(storage_class, STORAGE_CLASSES, "S3 storage class")
        if sse is not None and sse not in SSE_MODES:
            raise InvalidParameterError(f"S3 sse must be AES256 or aws:kms, got {sse!r}")
        if kms_key_id and sse != "aws:kms":
            raise InvalidParameterError("kms_key_id needs sse='aws:kms'")
        self.sse, self.kms_key_id = sse, kms_key_id
        if checksum is not None:
            checksum = checksum.upper()
            if checksum not in CHECKSUMS:
                raise InvalidParameterError(
                    f"S3 checksum must be one of {', '.join(CHECKSUMS)} or None, got {checksum!r}"
                )
        self.checksum = checksum
        if addressing_style not in (None, "path", "virtual", "auto"):
            raise InvalidParameterError("addressing_style must be path, virtual or auto")
        self.part_size = choose_part_size(None, part_size)  # validates
        self._part_size_opt = part_size
        if workers < 1 or max_inflight < 1:
            raise InvalidParameterError("workers and max_inflight must be >= 1")
        self.workers, self.max_inflight = workers, max_inflight

        secret = (
            secret_access_key.get_secret_value()
            if isinstance(secret_access_key, SecretStr)
            else secret_access_key
        )
        token = (
            session_token.get_secret_value()
            if isinstance(session_token, SecretStr)
            else session_token
        )
        if bool(access_key_id) != bool(secret):
            raise CredentialsError("S3: give both access_key_id and secret_access_key, or neither")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing_style} if addressing_style else None,
            max_pool_connections=max(10, workers + 2),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(profile_name=profile)
        except Exception as exc:
            raise CredentialsError(f"S3: cannot load AWS profile {profile!r}: {exc}") from None
        self.client = session.client(
            "s3",
            region_name=region or session.region_name or "us-east-1",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret or None,
            aws_session_token=token or None,
            config=config,
        )

    @classmethod
    def from_url(cls, url: str, **options) -> S3Target:
        bucket, prefix = split_url(url, cls.schemes)
        return cls(bucket, prefix, **options)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    @contextlib.contextmanager
    def errors(self, key: str | None = None) -> Iterator[None]:
        """Turn botocore exceptions into one-line typed errors (no traceback, no secrets)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        what = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"
        try:
            yield
        except HyperSDKError:
            raise
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = err.get("Message") or code
            if code in ("NoSuchBucket",) or (code == "404" and key is None):
                raise TargetError(
                    f"s3://{self.bucket}: bucket does not exist{self._where()}"
                ) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFoundError(f"{what}: no such object{self._where()}") from None
            if code in _CRED_CODES:
                raise CredentialsError(
                    f"{what}: credentials rejected ({code}: {msg}){self._where()}"
                ) from None
            raise TargetError(f"{what}: {code}: {msg}{self._where()}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise CredentialsError(
                f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile, or pass access_key_id/secret_access_key)"
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError) as exc:
            raise EndpointUnreachableError(
                f"{what}: cannot reach S3 endpoint {self.endpoint_url or 'AWS'}: "
                f"{type(exc).__name__}"
            ) from None
        except ReadTimeoutError:
            raise EndpointUnreachableError(
                f"{what}: S3 endpoint timed out{self._where()}"
            ) from None
        except BotoCoreError as exc:
            raise TargetError(f"{what}: {exc}{self._where()}") from None

    def put_args(self, key: str) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        if self.checksum:
            args["ChecksumAlgorithm"] = self.checksum
        return args

    def check(self) -> None:
        """Fail fast (bucket missing, credentials rejected, endpoint down) before streaming."""
        with self.errors():
            self.client.head_bucket(Bucket=self.bucket)

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        full = join_key(self.prefix, key)
        part = choose_part_size(expected_size, self._part_size_opt)
        return S3ObjectWriter(self, full, part, grow=expected_size is None)

    def head(self, key: str) -> dict:
        full = join_key(self.prefix, key)
        with self.errors(full):
            return self.client.head_object(Bucket=self.bucket, Key=full)

    def open_reader(self, key: str) -> S3RangeReader:
        full = join_key(self.prefix, key)
        with self.errors(full):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=full)
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("404", "NoSuchKey", "NotFound"):
                    self.check()  # a missing bucket says so, not "no such object"
                raise
        return S3RangeReader(self, full, head["ContentLength"])

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """PutObject with ``If-None-Match: *``: S3 answers 412 PreconditionFailed when the key
        exists, and 409 ConditionalRequestConflict while another conditional write of the same
        key is under way (retried here, as S3 asks, until that one has settled). Needs a store
        that honours conditional writes (AWS S3 since 2024, MinIO): one that ignores the
        header would overwrite."""
        from botocore.exceptions import ClientError

        full = join_key(self.prefix, key)
        args = self.put_args(full)
        args.update(Body=data, IfNoneMatch="*")
        deadline, delay = time.monotonic() + CONFLICT_RETRY_SECONDS, 0.05
        while True:
            with self.errors(full):
                try:
                    self.client.put_object(**args)
                    return True
                except ClientError as exc:
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    if code in ("PreconditionFailed", "412"):
                        return False
                    if code != "ConditionalRequestConflict" or time.monotonic() > deadline:
                        raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with self.errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=obj["Key"][len(base) :],
                        size=obj["Size"],
                        modified=obj.get("LastModified"),
                        storage_class=obj.get("StorageClass"),
                    )

    def delete(self, key: str) -> None:
        full = join_key(self.prefix, key)
        with self.errors(full):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Multipart uploads begun under ``prefix`` and never completed nor aborted: their
        parts are stored (and billed) though no object shows them."""
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[PendingUpload] = []
        with self.errors():
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            ):
                for up in page.get("Uploads", []):
                    out.append(
                        PendingUpload(
                            key=up["Key"][len(base) :],
                            upload_id=up["UploadId"],
                            started=up.get("Initiated"),
                        )
                    )
        return out

    def abort_upload(self, upload: PendingUpload) -> None:
        """AbortMultipartUpload: its parts are freed; an upload already gone is no error."""
        from botocore.exceptions import ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        full = base + upload.key
        with self.errors(full):
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload.upload_id
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


TARGET = S3Target
