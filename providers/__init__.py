"""Sources and storage targets, found by URL scheme.

Every module in providers/sources/ that defines ``SOURCE`` (a Source subclass) and every module in
providers/targets/ that defines ``TARGET`` (a Target subclass) is registered under the schemes it
declares. Adding a provider or a target means adding one module and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from hypersdk.errors import InvalidParameterError
from hypersdk.io import RangeReader
from hypersdk.urls import SECRET_OPTIONS, check_url, is_secret_option, redact_url
from providers.base import Source, Target

__all__ = [
    "SECRET_OPTIONS",
    "open_image_url",
    "open_source",
    "open_target",
    "source_classes",
    "split_options",
    "target_classes",
]


def _discover(package: str, attr: str) -> dict[str, type]:
    pkg = importlib.import_module(package)
    found: dict[str, type] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{package}.{mod.name}"), attr, None)
        if cls is not None:
            for scheme in cls.schemes:
                found[scheme] = cls
    return found


@cache
def source_classes() -> dict[str, type[Source]]:
    return _discover("providers.sources", "SOURCE")


@cache
def image_openers() -> dict[str, Callable[..., RangeReader]]:
    """Image URL schemes (``ebs://``) a source module opens as raw guest bytes: its
    ``IMAGE_OPENERS``, a dict of scheme -> ``opener(url, **options) -> RangeReader``."""
    pkg = importlib.import_module("providers.sources")
    found: dict[str, Callable[..., RangeReader]] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            module = importlib.import_module(f"providers.sources.{mod.name}")
            found.update(getattr(module, "IMAGE_OPENERS", {}))
    return found


def open_image_url(url: str) -> RangeReader | None:
    """A reader of the image ``url`` names when a source declares its scheme (``ebs://REGION/
    SNAPSHOT_ID?endpoint_url=...``); None for a path or any other URL (a local image)."""
    scheme = _scheme(url, "")
    opener = image_openers().get(scheme) if scheme else None
    if opener is None:
        return None
    check_url(url, "image URL")
    url, options = split_options(url)
    return opener(url, **options)


@cache
def target_classes() -> dict[str, type[Target]]:
    return _discover("providers.targets", "TARGET")


def _scheme(url: str, default: str) -> str:
    scheme = urlsplit(url).scheme
    # a bare path (or a Windows drive letter) is a local path
    return default if len(scheme) <= 1 else scheme.lower()


def _coerce(value: str) -> str | int | float | bool:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def split_options(url: str) -> tuple[str, dict]:
    """``s3://b/p?storage_class=GLACIER&endpoint_url=...`` -> (``s3://b/p``, options).

    Options in the URL let one string carry a target's settings through flows and tasks; the
    secrets among them are refused (they belong in env vars, files or Prefect Secret blocks;
    hypersdk.urls.check_url, which ``_open`` runs first, says so for the whole URL).
    """
    parts = urlsplit(url)
    if len(parts.scheme) <= 1 or not parts.query:
        return url, {}
    options = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if is_secret_option(name):
            raise InvalidParameterError(
                f"{name} must not be given in a URL: use the environment or a Prefect Secret block"
            )
        options[name] = _coerce(value)
    return urlunsplit(parts._replace(query="")), options


def _open(url: str, options: dict, kind: str, default: str, classes: dict[str, type]):
    """The provider ``classes`` registers for ``url``'s scheme, built from the URL and options
    (explicit options win over those in the URL's query). A URL carrying a secret is refused
    before anything else looks at it."""
    check_url(url, f"{kind} URL")
    scheme = _scheme(url, default)
    url, from_url = split_options(url)
    try:
        cls = classes[scheme]
    except KeyError:
        known = ", ".join(sorted(classes))
        raise InvalidParameterError(
            f"unknown {kind} scheme {scheme!r} in {redact_url(url)!r} (known: {known})"
        ) from None
    return cls.from_url(url, **{**from_url, **options})


def open_source(url: str, **options) -> Source:
    """A Source for ``url`` (``local:///dir``, ``vsphere://host/DC/vm/...``, a bare path...)."""
    return _open(url, options, "source", "local", source_classes())


def open_target(url: str, **options) -> Target:
    """A Target for ``url`` (``file:///dir``, a bare path, ``s3://bucket/prefix``...)."""
    return _open(url, options, "target", "file", target_classes())
