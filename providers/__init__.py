"""Sources and storage targets, found by URL scheme.

Every module in providers/sources/ that defines ``SOURCE`` (a Source subclass) and every module in
providers/targets/ that defines ``TARGET`` (a Target subclass) is registered under the schemes it
declares. Adding a provider or a target means adding one module and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from urllib.parse import urlsplit

from hypersdk.errors import InvalidParameterError
from providers.base import Source, Target


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
def target_classes() -> dict[str, type[Target]]:
    return _discover("providers.targets", "TARGET")


def _scheme(url: str, default: str) -> str:
    scheme = urlsplit(url).scheme
    # a bare path (or a Windows drive letter) is a local path
    return default if len(scheme) <= 1 else scheme.lower()


def open_source(url: str, **options) -> Source:
    """A Source for ``url`` (``local:///dir``, ``vsphere://host/DC/vm/...``, a bare path...)."""
    scheme = _scheme(url, "local")
    try:
        cls = source_classes()[scheme]
    except KeyError:
        known = ", ".join(sorted(source_classes()))
        raise InvalidParameterError(
            f"unknown source scheme {scheme!r} in {url!r} (known: {known})"
        ) from None
    return cls.from_url(url, **options)


def open_target(url: str, **options) -> Target:
    """A Target for ``url`` (``file:///dir``, a bare path, ``s3://bucket/prefix``...)."""
    scheme = _scheme(url, "file")
    try:
        cls = target_classes()[scheme]
    except KeyError:
        known = ", ".join(sorted(target_classes()))
        raise InvalidParameterError(
            f"unknown target scheme {scheme!r} in {url!r} (known: {known})"
        ) from None
    return cls.from_url(url, **options)
