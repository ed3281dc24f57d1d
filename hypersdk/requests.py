"""Validated parameters of an export run (shared by flows and the CLI; no Prefect here)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hypersdk import config
from hypersdk.errors import InvalidParameterError
from hypersdk.extents import ExtentMap
from hypersdk.formats import get_driver, output_driver
from hypersdk.urls import check_url


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(default_factory=config.default_source_url, description="Source URL")
    target: str = Field(default_factory=config.default_target_url, description="Target URL")
    vm: str = Field(min_length=1, max_length=255, description="VM name or id on the source")
    format: str = "qcow2"
    format_options: dict[str, str] = Field(default_factory=dict)
    incremental: bool = True
    full_every: int | None = Field(
        default=None, ge=1, description="Force a full after this many deltas"
    )
    encryption: Any | None = None
    verify: bool = True

    @field_validator("format")
    @classmethod
    def _known_writable_format(cls, value: str) -> str:
        try:
            return output_driver(value).name
        except InvalidParameterError as exc:  # unknown, read-only, or not an output
            raise ValueError(str(exc)) from None

    @field_validator("source", "target")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("source", "target", mode="after")
    @classmethod
    def _no_secrets(cls, value: str, info) -> str:
        # URLs end up in parameters, logs, manifests and the Prefect database: a password or a
        # secret option in one is refused before anything runs (the message never shows it)
        return check_url(value, f"{info.field_name} URL")


def validate_request(**params: Any) -> ExportRequest:
    """ExportRequest from keyword parameters, or InvalidParameterError with one readable line."""
    params = {k: v for k, v in params.items() if v is not None or k == "encryption"}
    if not params.get("vm"):
        raise InvalidParameterError("name the VM to export (vm=NAME)")
    try:
        req = ExportRequest(**params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidParameterError(f"invalid {where}: {msg}") from None
    driver = get_driver(req.format)
    driver.check_options(req.format_options)
    if driver.can_write and driver.kind == "disk":
        # plan a tiny disk: catches values the names check cannot (and outputs that need side
        # files) before any snapshot is taken
        probe = driver.plan(1 << 20, ExtentMap.full(1 << 20), req.format_options)
        if probe.not_streamable:
            raise InvalidParameterError(probe.not_streamable)
    if req.encryption is not None:
        from hypersdk.crypto import KeySpec

        if not isinstance(req.encryption, KeySpec):
            try:
                req.encryption = KeySpec.model_validate(req.encryption)
            except ValidationError as exc:
                raise InvalidParameterError(
                    f"invalid encryption: {exc.errors()[0]['msg']}"
                ) from None
    return req
