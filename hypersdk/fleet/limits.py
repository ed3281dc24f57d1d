"""Names of the Prefect global concurrency limits that bound how many exports read one source
endpoint (a vCenter, an AWS region, a VM directory) and write one target at once.

A name must carry no secret and no path an operator would rather not show: it is
``hypersdk-source:<scheme>:<sha256(endpoint)[:12]>`` (``hypersdk-target:...`` for targets), the
endpoint being the URL reduced to what identifies the endpoint: scheme, host and port (no user
info, no query) for network URLs, the path for local ones. The same endpoint gives the same name
however its URL was spelled (query options, trailing slash, a different VM path on the same
vCenter), so every deployment and worker shares one limit.
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import unquote, urlsplit

from hypersdk.errors import InvalidParameterError

SOURCE_PREFIX = "hypersdk-source"
TARGET_PREFIX = "hypersdk-target"
# schemes whose URL names a place on this machine: the endpoint is the directory
_LOCAL = {"local", "file", "ova", ""}


def endpoint_key(url: str) -> str:
    """The endpoint a URL talks to, normalised (see the module doc); never user info."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise InvalidParameterError("an endpoint URL must be a non-empty string")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _LOCAL:
        path = unquote(parts.netloc + parts.path) if scheme else url
        path = os.path.normpath(path)
        if scheme == "ova":  # one file: its directory is the endpoint (the disk it sits on)
            path = os.path.dirname(path) or "/"
        return f"{scheme or 'local'}://{path}"
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    # a vCenter, an AWS region, a bucket, a storage account: the netloc names it
    return f"{scheme}://{host}{port}"


def _name(prefix: str, url: str) -> str:
    key = endpoint_key(url)
    scheme = key.split("://", 1)[0]
    return f"{prefix}:{scheme}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def source_limit_name(url: str) -> str:
    """The limit bounding exports that read the source endpoint of ``url``."""
    return _name(SOURCE_PREFIX, url)


def target_limit_name(url: str) -> str:
    """The limit bounding exports that write the target endpoint of ``url``."""
    return _name(TARGET_PREFIX, url)
