"""The management plane: DefaultAzureCredential, the ComputeManagementClient, and typed errors.

Credentials come from ``DefaultAzureCredential`` (azure-identity): environment (service
principal), workload identity, managed identity, then the Azure CLI / PowerShell / azd logins.
Nothing secret is ever an option of the source URL. ``management_url`` points the client at
another Resource Manager (a sovereign cloud, or the tests' fake); ``ca_file`` is a PEM bundle
to trust for it (``connection_verify``); ``authority`` the Entra ID host (AZURE_AUTHORITY_HOST).

Access SAS URLs are credentials: this module installs a filter on the HTTP libraries' loggers
(httpx, urllib3, azure-core's request logging) that blanks every ``sig=`` value, so a debug log
never carries one; our own messages never name a SAS URL at all.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from hypersdk.errors import (
    CredentialsError,
    EndpointUnreachableError,
    HyperSDKError,
    InvalidParameterError,
    SourceError,
    VMNotFoundError,
)

DEFAULT_MANAGEMENT_URL = "https://management.azure.com"
_SIG = re.compile(r"(?i)(sig(?:=|%3D))[^&\s\"'<>]+")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_RG = re.compile(r"^[-\w._()]{1,90}$")


def redact_sas(text: str) -> str:
    """``text`` with every SAS signature blanked."""
    return _SIG.sub(r"\1***", text)


class _SasFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        if "sig" in message.lower():
            record.msg, record.args = redact_sas(message), None
        return True


class _ChainSummaryFilter(logging.Filter):
    """Drops DefaultAzureCredential's many-line "failed to retrieve a token" warning: the
    source raises it as one CredentialsError line instead (the per-credential reasons stay
    at their DEBUG/INFO records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("DefaultAzureCredential failed to retrieve")


logging.getLogger("azure.identity._credentials.chained").addFilter(_ChainSummaryFilter())
_FILTER = _SasFilter()
for _name in (
    "httpx",
    "httpcore",
    "urllib3.connectionpool",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.storage.blob",
):
    logging.getLogger(_name).addFilter(_FILTER)


@dataclass(frozen=True)
class Settings:
    """Where the management plane is and how to trust it (no secrets: they never get here)."""

    subscription: str
    resource_group: str
    management_url: str = DEFAULT_MANAGEMENT_URL
    ca_file: str | None = None
    authority: str | None = None
    client_id: str | None = None  # a user-assigned managed identity's client id
    poll_interval: float = 2.0

    def __post_init__(self) -> None:
        if not _GUID.match(self.subscription):
            raise InvalidParameterError(
                f"azure source: subscription {self.subscription[:60]!r} is not a subscription id "
                "(azure://SUBSCRIPTION-GUID/RESOURCE_GROUP)"
            )
        if not _RG.match(self.resource_group) or self.resource_group.endswith("."):
            raise InvalidParameterError(
                f"azure source: {self.resource_group[:100]!r} is not a resource group name"
            )
        if not self.management_url.startswith("https://"):
            raise InvalidParameterError(
                "azure source: management_url must be https:// (bearer tokens never go in clear)"
            )
        if not 0 < self.poll_interval <= 60:
            raise InvalidParameterError("azure source: poll_interval must be in (0, 60] seconds")


def compute_client(settings: Settings):
    """A ComputeManagementClient for the subscription, with DefaultAzureCredential."""
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.compute import ComputeManagementClient

    cred_kwargs: dict = {}
    if settings.authority:
        cred_kwargs["authority"] = settings.authority
    if settings.client_id:
        cred_kwargs["managed_identity_client_id"] = settings.client_id
    try:
        credential = DefaultAzureCredential(**cred_kwargs)
    except ValueError as exc:  # e.g. an AZURE_TOKEN_CREDENTIALS value it does not know
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CredentialsError(f"Azure credentials: DefaultAzureCredential: {first}") from None
    base = settings.management_url.rstrip("/")
    kwargs: dict = {"polling_interval": settings.poll_interval}
    if settings.ca_file:
        kwargs["connection_verify"] = settings.ca_file
    return ComputeManagementClient(
        credential,
        settings.subscription,
        base_url=base,
        credential_scopes=[f"{base}/.default"],
        **kwargs,
    ), credential


def _arm_code(exc) -> str:
    code = getattr(exc, "error", None)
    code = getattr(code, "code", None) or getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or getattr(exc, "status_code", "") or "error")


@contextlib.contextmanager
def arm_errors(settings: Settings, what: str, vm: str | None = None) -> Iterator[None]:
    """Azure SDK exceptions -> one-line typed errors (never a SAS, never a token)."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    where = f"azure://{settings.subscription}/{settings.resource_group}"
    try:
        yield
    except HyperSDKError:
        raise
    except ClientAuthenticationError as exc:
        if getattr(exc, "status_code", None) in (401, 403):
            raise CredentialsError(
                f"{where}: {what}: Azure refused the credentials ({_arm_code(exc)})"
            ) from None
        raise CredentialsError(
            f"{where}: {what}: no Azure credentials found (DefaultAzureCredential: set "
            "AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, use a managed identity, or "
            "run `az login`)"
        ) from None
    except ResourceNotFoundError as exc:
        code = _arm_code(exc)
        if code == "SubscriptionNotFound":
            raise SourceError(f"{where}: subscription {settings.subscription} not found") from None
        if code == "ResourceGroupNotFound":
            raise SourceError(
                f"{where}: resource group {settings.resource_group!r} not found"
            ) from None
        if vm is not None:
            raise VMNotFoundError(f"VM {vm!r} not found in {where}") from None
        raise SourceError(f"{where}: {what}: not found ({code})") from None
    except HttpResponseError as exc:
        code = _arm_code(exc)
        if exc.status_code in (401, 403):
            raise CredentialsError(f"{where}: {what}: access denied ({code})") from None
        if exc.status_code in (429,) or (exc.status_code or 0) >= 500:
            raise EndpointUnreachableError(f"{where}: {what}: Azure answered {code}") from None
        raise SourceError(f"{where}: {what}: {code}") from None
    except (ServiceRequestError, ServiceResponseError) as exc:
        text = str(exc)
        hint = (
            " (TLS certificate not trusted: see the ca_file option)"
            if "CERTIFICATE_VERIFY_FAILED" in text
            else ""
        )
        raise EndpointUnreachableError(
            f"{where}: {what}: cannot reach {settings.management_url}{hint}"
        ) from None
    except AzureError as exc:
        raise SourceError(f"{where}: {what}: {type(exc).__name__}") from None
