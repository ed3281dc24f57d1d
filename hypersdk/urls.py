"""Source and target URLs never carry secrets.

A URL travels everywhere: flow parameters (the Prefect database), manifests, logs, error
messages. So a password in its user info (``vsphere://user:PASS@host``, ``s3://KEY:SECRET@b``)
or a credential in its query (``?secret_access_key=``, an Azure SAS ``?sv=...&sig=...``) is
refused before anything runs, and messages show URLs through ``redact_url``. Secrets belong in
the environment, files, or Prefect Secret blocks. A bare user name is allowed where the scheme
has logins (``vsphere://admin@vc/...``).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from hypersdk.errors import InvalidParameterError

# Query option names that carry a credential (compared case-insensitively): our providers'
# secret options, the names other tools use for the same things, and the parameters of signed
# URLs (Azure SAS ``sig``, S3 and GCS presigned signatures and tokens).
SECRET_OPTIONS = frozenset(
    {
        # our providers' options
        "password",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "account_key",
        "sas_token",
        "connection_string",
        "credentials_json",
        # common spellings elsewhere
        "pass",
        "passwd",
        "pwd",
        "passphrase",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "security_token",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "auth_token",
        "authorization",
        "api_key",
        "apikey",
        "key",
        "private_key",
        "client_secret",
        "credential",
        "credentials",
        "sas",
        # signed URLs: Azure SAS, S3 (SigV4 / SigV2) and GCS (V4 / V2) presigned
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
    }
)
# Schemes whose user info may hold a user name (never a password).
LOGIN_SCHEMES = frozenset({"vsphere"})
_MAX_DEPTH = 3  # URLs nested in option values (endpoint_url=...) are checked this deep
REDACTED = "***"
_NORMALIZED = frozenset(n.replace("-", "_") for n in SECRET_OPTIONS)


def is_secret_option(name: str) -> bool:
    """Does a query option of this name carry a credential (any case, ``-`` or ``_``)?"""
    return name.strip().lower().replace("-", "_") in _NORMALIZED


def _parse(url: str):
    """urlsplit, or None for a bare path or an unparsable address."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced IPv6 bracket and the like
        return None
    return parts if len(parts.scheme) > 1 else None  # one letter: a Windows drive


def _hidden_password_end(url: str, netloc: str) -> int:
    """Index of the ``@`` ending a password that holds ``/``, ``?`` or ``#``, or -1.

    urlsplit cuts ``s3://KEY:SEC/RET@bucket`` at the slash: the "netloc" ``KEY:SEC`` then has a
    port that is no number, and an ``@`` follows later."""
    if "@" in netloc or netloc.endswith("]"):
        return -1
    _, colon, port = netloc.rpartition(":")
    if not colon or not port or port.isdigit():
        return -1
    return url.find("@", url.find("//") + 2)


def _problem(url: str, depth: int = 0) -> str | None:
    """What secret ``url`` carries, or None."""
    parts = _parse(url)
    if parts is None:
        return None
    if _hidden_password_end(url, parts.netloc) >= 0:
        return "a password in its user info"
    if "@" in parts.netloc:
        if ":" in parts.netloc.rpartition("@")[0]:
            return "a password in its user info"
        if parts.scheme.lower() not in LOGIN_SCHEMES:
            return f"user info ({parts.scheme}:// URLs take no login)"
    for text in (parts.query, parts.fragment):
        pairs = parse_qsl(text, keep_blank_values=True)
        found = sorted({name for name, _ in pairs if is_secret_option(name)})
        if found:
            return f"the secret option {', '.join(found)}"
        if depth < _MAX_DEPTH:
            for _, value in pairs:
                inner = _problem(value, depth + 1)
                if inner:
                    return f"a URL in its options with {inner}"
    return None


def check_url(url: str, what: str) -> str:
    """``url`` unchanged, or InvalidParameterError (naming ``what``, e.g. "source URL") when it
    carries a secret. The message shows the URL redacted: never the secret."""
    if not isinstance(url, str):
        raise InvalidParameterError(f"{what} must be a string")
    try:
        urlsplit(url)
    except ValueError:
        raise InvalidParameterError(f"{what} is not a valid URL (unbalanced brackets?)") from None
    problem = _problem(url)
    if problem:
        raise InvalidParameterError(
            f"{what} {redact_url(url)} carries {problem}: secrets must not be given in a URL "
            "(URLs end up in logs, flow parameters and manifests); use the environment, a file "
            "or a Prefect Secret block"
        )
    return url


def _redact_query(query: str, depth: int) -> str:
    pairs = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if is_secret_option(name):
            value = REDACTED
        elif depth < _MAX_DEPTH:
            value = redact_url(value, depth + 1)
        pairs.append(f"{name}={value}" if value else name)
    return "&".join(pairs)


def redact_url(url: str, depth: int = 0) -> str:
    """``url`` for messages and logs: a password in its user info (the whole user info where
    the scheme has no logins) and every secret option's value replaced by ``***``. A bare path
    comes back as is."""
    try:
        urlsplit(url)
    except ValueError:
        return "<unparsable URL>"  # show nothing that could be a secret
    parts = _parse(url)
    if parts is None or _problem(url, depth) is None:
        return url  # nothing to hide: shown exactly as given
    end = _hidden_password_end(url, parts.netloc)
    if end >= 0:
        start = url.find("//") + 2
        parts = urlsplit(f"{url[:start]}{REDACTED}:{REDACTED}{url[end:]}")
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if parts.scheme.lower() not in LOGIN_SCHEMES:
            user, colon = REDACTED, ""  # no logins here: the user part may be a key id
        netloc = f"{user}{':' + REDACTED if colon else ''}@{host}"
    text = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        text += "?" + _redact_query(parts.query, depth)
    if parts.fragment:
        text += "#" + _redact_query(parts.fragment, depth)
    return text
