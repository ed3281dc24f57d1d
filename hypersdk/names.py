"""Names from sources (VM names, disk names, export ids) made safe to use as one path component
or one segment of an object key.

Sources are not trusted to name things sensibly: a disk named ``../../victim/ID/disk0`` must not
become a key that overwrites another VM's export, nor a path that leaves the state directory. A
name is therefore percent-encoded into a single component (reversibly: ``component_name`` gives
the original back), and the manifests keep the original names for people to read.
"""

from __future__ import annotations

import hashlib
import re

from hypersdk.errors import InvalidParameterError

# Room for an extension (".qcow2.hsenc") and the ".<name>.partial-<random>" temp name of atomic
# output within the 255 bytes most filesystems allow per component.
MAX_COMPONENT = 200
_HASH_CHARS = 16  # hex digits of SHA-256 kept when a name is shortened
# "%" followed by something that is not two hex digits never comes out of the encoder, so it
# marks a shortened component unambiguously.
_SHORTENED = "%~"

_ALWAYS = frozenset("%/\\")
_EXPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _escape(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def safe_component(name: str, what: str = "name") -> str:
    """``name`` as a single path component / key segment.

    Encoded as ``%XX`` (UTF-8 bytes): ``%``, ``/``, ``\\``, every non-printable character
    (NUL, control and format characters, line separators) and a leading ``.`` (so ``.``, ``..``
    and hidden names cannot occur). Printable text, non-ASCII included, stays readable. A result
    longer than MAX_COMPONENT bytes is cut and suffixed with ``%~`` and a hash of the whole
    name: still unique, no longer reversible (the manifest keeps the original).
    """
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(f"{what} is empty: it cannot name a file or an object")
    out = []
    for i, char in enumerate(name):
        if char in _ALWAYS or not char.isprintable() or (i == 0 and char == "."):
            out.append(_escape(char))
        else:
            out.append(char)
    encoded = "".join(out)
    if len(encoded.encode("utf-8", "surrogatepass")) <= MAX_COMPONENT:
        return encoded
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    budget = MAX_COMPONENT - len(_SHORTENED) - _HASH_CHARS
    kept, used = [], 0
    for piece in out:  # whole pieces only: never half of a %XX escape or of a UTF-8 sequence
        size = len(piece.encode("utf-8", "surrogatepass"))
        if used + size > budget:
            break
        kept.append(piece)
        used += size
    return "".join(kept) + _SHORTENED + digest


def component_name(component: str) -> str:
    """The original name of a ``safe_component`` result (InvalidParameterError when it was
    shortened or is not one)."""
    if _SHORTENED in component:
        raise InvalidParameterError(
            f"{component!r} is a shortened name: its original is only in the manifest"
        )
    raw = bytearray()
    i = 0
    while i < len(component):
        char = component[i]
        if char == "%":
            pair = component[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise InvalidParameterError(f"{component!r} is not an encoded name")
            raw.append(int(pair, 16))
            i += 3
        else:
            raw += char.encode("utf-8", "surrogatepass")
            i += 1
    return raw.decode("utf-8", "surrogatepass")


def is_export_id(value: object) -> bool:
    """Does ``value`` look like an id this project makes (``20261128T163952Z-b513c4cf``,
    ``ova-0123456789ab``): letters, digits, ``-`` and ``_``, at most 128, no dots or slashes?"""
    return isinstance(value, str) and _EXPORT_ID.fullmatch(value) is not None


def check_export_id(value: object, what: str = "export id") -> str:
    """``value`` if it is a well-formed export (or change) id, else InvalidParameterError."""
    if not is_export_id(value):
        shown = repr(value)[:80]
        raise InvalidParameterError(
            f"{what} {shown} is malformed (expected letters, digits, '-' and '_' such as "
            "20261128T163952Z-b513c4cf)"
        )
    return value  # type: ignore[return-value]
